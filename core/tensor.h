// Tensor: shared storage + shape + strides + offset + dtype + device, with autograd metadata.
// A Tensor is a cheap handle (shared_ptr to TensorImpl); views share storage.
#pragma once
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/dtype.h"

namespace ftune {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

struct Storage {
  std::shared_ptr<void> data;
  size_t bytes = 0;
  Device device;
  // Bumped by every in-place write (copy_, fill_, add_, mul_, optimizer updates). Autograd
  // records it when an op uses the storage and refuses to run a backward over a changed one.
  uint64_t version = 0;
};

class Node;
class Tensor;
using GradHook = std::function<void(const Tensor& grad)>;

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  Shape shape;
  Shape strides;  // in elements
  int64_t offset = 0;  // in elements
  DType dtype = DType::f32;
  // autograd
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;  // accumulated gradient of a leaf
  std::shared_ptr<Node> grad_fn;     // the op that made this tensor (non-leaf)
  std::vector<GradHook> ready_hooks;  // leaf: called once its gradient of a backward pass is complete
  std::string name;
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- factories
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device dev = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device dev = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device dev = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32,
                     Device dev = Device::cpu());
  static Tensor arange(int64_t n, DType dtype = DType::i64, Device dev = Device::cpu());
  template <class T>
  static Tensor from_vector(const std::vector<T>& v, const Shape& shape, Device dev = Device::cpu());
  static Tensor scalar(double v, DType dtype = DType::f32, Device dev = Device::cpu());

  // ---- metadata
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return I().shape; }
  const Shape& strides() const { return I().strides; }
  int64_t offset() const { return I().offset; }
  int64_t dim() const { return int64_t(I().shape.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return shape_numel(I().shape); }
  DType dtype() const { return I().dtype; }
  Device device() const { return I().storage->device; }
  bool is_contiguous() const;
  std::string desc() const;  // "f32[2, 3] cpu"
  const std::string& name() const { return I().name; }
  Tensor& set_name(std::string n) { I().name = std::move(n); return *this; }

  // ---- data access (CPU)
  void* raw_data() const;  // pointer to element 0 of this view
  template <class T>
  T* data() const;  // checks dtype and device
  template <class T>
  std::vector<T> to_vector() const;  // contiguous copy, converted to T
  double item() const;

  // ---- copies and conversions (not recorded by autograd unless noted)
  Tensor contiguous() const;  // differentiable; no copy when already contiguous
  Tensor clone() const;       // differentiable
  Tensor to(Device dev) const;  // differentiable
  Tensor to(DType dt) const;    // differentiable for float dtypes
  void copy_(const Tensor& src);  // same shape; any dtype/device; in place, not recorded
  void fill_(double v);           // in place, not recorded
  void zero_() { fill_(0.0); }
  // Marks an in-place write done through raw pointers (kernels, optimizers).
  void bump_version() const { ++I().storage->version; }

  // ---- views (differentiable)
  Tensor view(const Shape& shape) const;     // requires compatible strides, -1 allowed
  Tensor reshape(const Shape& shape) const;  // view when possible, else copy
  Tensor transpose(int64_t a, int64_t b) const;
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end) const;
  Tensor unsqueeze(int64_t d) const;
  Tensor squeeze(int64_t d) const;
  Tensor expand(const Shape& shape) const;  // broadcast view with zero strides

  // ---- autograd
  bool requires_grad() const { return I().requires_grad; }
  Tensor& set_requires_grad(bool r = true);
  bool is_leaf() const { return I().grad_fn == nullptr; }
  Tensor grad() const { return I().grad ? Tensor(I().grad) : Tensor(); }
  void set_grad(const Tensor& g) { I().grad = g.impl_; }
  void zero_grad() { I().grad.reset(); }
  const std::shared_ptr<Node>& grad_fn() const { return I().grad_fn; }
  Tensor detach() const;  // shares storage, no history
  void backward(const Tensor& grad = Tensor(), bool retain_graph = false) const;
  // Called when this leaf's gradient for the current backward pass is complete (the DP reducer).
  void add_ready_hook(GradHook hook) { I().ready_hooks.push_back(std::move(hook)); }

  TensorImpl* impl() const { return impl_.get(); }
  // The impl, or an ftune::Error when this tensor is undefined (never a null dereference).
  TensorImpl& I() const {
    if (!impl_) [[unlikely]]
      throw_undefined();
    return *impl_;
  }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& o) const { return impl_ == o.impl_; }

 private:
  [[noreturn]] static void throw_undefined();
  std::shared_ptr<TensorImpl> impl_;
};

// A strided view with the same storage (no autograd): used by view ops and kernels.
Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset);
Shape contiguous_strides(const Shape& shape);

template <class T>
T* Tensor::data() const {
  FTUNE_CHECK(defined(), "[tensor] data() of an undefined tensor");
  FTUNE_CHECK(dtype_of<T>::value == dtype(), "[tensor] data<", dtype_name(dtype_of<T>::value),
              ">() on a ", desc(), " tensor");
  return static_cast<T*>(raw_data());
}

template <class T>
Tensor Tensor::from_vector(const std::vector<T>& v, const Shape& shape, Device dev) {
  FTUNE_CHECK(int64_t(v.size()) == shape_numel(shape), "[tensor] from_vector: ", v.size(),
              " values for shape ", shape_str(shape));
  Tensor t = empty(shape, dtype_of<T>::value, Device::cpu());
  std::copy(v.begin(), v.end(), t.data<T>());
  return dev.is_cpu() ? t : t.to(dev);
}

}  // namespace ftune
