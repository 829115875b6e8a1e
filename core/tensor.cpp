#include "core/tensor.h"

#include <algorithm>
#include <cstring>
#include <sstream>

#include "core/allocator.h"
#include "core/autograd.h"
#include "core/ops.h"
#include "core/profiler.h"
#include "kernels/cpu/strided.h"
#ifdef FTUNE_HAVE_CUDA
#include "kernels/copy.h"
#endif

namespace ftune {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s)
    if (__builtin_mul_overflow(n, d, &n))
      FTUNE_THROW("[tensor] shape ", shape_str(s), " has more elements than int64 can count");
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t s = 1;
  for (int64_t i = int64_t(shape.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= std::max<int64_t>(shape[i], 1);
  }
  return st;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device dev) {
  for (int64_t d : shape) FTUNE_CHECK(d >= 0, "[tensor] negative dimension in shape ", shape_str(shape));
  auto st = std::make_shared<Storage>();
  int64_t bytes = 0;
  FTUNE_CHECK(!__builtin_mul_overflow(shape_numel(shape), int64_t(dtype_size(dtype)), &bytes),
              "[tensor] shape ", shape_str(shape), " of ", dtype_name(dtype), " overflows the byte count");
  st->bytes = size_t(bytes);
  st->device = dev;
  if (dev.is_cpu()) {
    DataPtr p = cpu_alloc(st->bytes);
    auto del = p.get_deleter();
    st->data = std::shared_ptr<void>(p.release(), del);
  } else {
    st->data = cuda_alloc(st->bytes, dev.index);
  }
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::move(st);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device dev) { return full(shape, 0.0, dtype, dev); }
Tensor Tensor::ones(const Shape& shape, DType dtype, Device dev) { return full(shape, 1.0, dtype, dev); }

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device dev) {
  Tensor t = empty(shape, dtype, dev);
  t.fill_(value);
  return t;
}

Tensor Tensor::scalar(double v, DType dtype, Device dev) { return full({}, v, dtype, dev); }

Tensor Tensor::arange(int64_t n, DType dtype, Device dev) {
  Tensor t = empty({n}, dtype, Device::cpu());
  dispatch_dtype(dtype, "arange", [&]<class T>() {
    T* p = t.data<T>();
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_integral_v<T>)
        p[i] = T(i);
      else
        p[i] = T(float(double(i)));  // bf16/f16 convert from float; exact below 2^24 for f32
    }
  });
  return dev.is_cpu() ? t : t.to(dev);
}

void Tensor::throw_undefined() {
  FTUNE_THROW("[tensor] use of an undefined tensor (an op returned no tensor, or it was never set)");
}

int64_t Tensor::size(int64_t d) const {
  int64_t nd = dim();
  if (d < 0) d += nd;
  FTUNE_CHECK(d >= 0 && d < nd, "[tensor] size(", d, ") of a ", nd, "-d tensor");
  return impl_->shape[d];
}

bool Tensor::is_contiguous() const {
  if (numel() == 0) return true;  // nothing to lay out (as torch says)
  int64_t s = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    if (impl_->shape[i] == 1) continue;
    if (impl_->strides[i] != s) return false;
    s *= impl_->shape[i];
  }
  return true;
}

std::string Tensor::desc() const {
  if (!defined()) return "undefined";
  return str_cat(dtype_name(dtype()), shape_str(shape()), " ", device().str());
}

void* Tensor::raw_data() const {
  FTUNE_CHECK(defined(), "[tensor] data of an undefined tensor");
  return static_cast<char*>(impl_->storage->data.get()) + impl_->offset * int64_t(dtype_size(dtype()));
}

template <class T>
std::vector<T> Tensor::to_vector() const {
  Tensor c = device().is_cpu() ? *this : to(Device::cpu());
  if (c.dtype() != dtype_of<T>::value) c = c.detach().to(dtype_of<T>::value);
  c = c.detach().contiguous();
  const T* p = c.data<T>();
  return std::vector<T>(p, p + c.numel());
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<int32_t> Tensor::to_vector<int32_t>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;

double Tensor::item() const {
  FTUNE_CHECK(numel() == 1, "[tensor] item() of a tensor with ", numel(), " elements: ", desc());
  return to_vector<double>()[0];
}

// ---------------------------------------------------------------------------- copies

namespace {

// dst and src are CPU views of the same shape.
void cpu_copy(const Tensor& dst, const Tensor& src) {
  if (dst.dtype() == src.dtype() && dst.is_contiguous() && src.is_contiguous()) {
    std::memcpy(dst.raw_data(), src.raw_data(), size_t(dst.numel()) * dtype_size(dst.dtype()));
    return;
  }
  dispatch_dtype(dst.dtype(), "copy", [&]<class D>() {
    dispatch_dtype(src.dtype(), "copy", [&]<class S>() {
      D* d = static_cast<D*>(dst.raw_data());
      const S* s = static_cast<const S*>(src.raw_data());
      kernels::cpu::strided_for<2>(
          dst.shape(), {&dst.strides(), &src.strides()},
          [&](int64_t n, const std::array<int64_t, 2>& off, const std::array<int64_t, 2>& st) {
            D* dp = d + off[0];
            const S* sp = s + off[1];
            for (int64_t i = 0; i < n; ++i) {
              if constexpr (std::is_same_v<D, bool>)
                dp[i * st[0]] = float(sp[i * st[1]]) != 0.0f;
              else if constexpr (std::is_integral_v<D> && std::is_integral_v<S>)
                dp[i * st[0]] = D(sp[i * st[1]]);  // exact (an i64 above 2^53 too)
              else if constexpr (std::is_same_v<D, double> || std::is_same_v<S, double> ||
                                 std::is_integral_v<D> || std::is_integral_v<S>)
                dp[i * st[0]] = D(double(sp[i * st[1]]));
              else
                dp[i * st[0]] = D(float(sp[i * st[1]]));
            }
          });
    });
  });
}

}  // namespace

void Tensor::copy_(const Tensor& src) {
  profiler::OpScope prof("copy");
  FTUNE_CHECK(defined() && src.defined(), "[copy_] undefined tensor");
  FTUNE_CHECK(shape() == src.shape(), "[copy_] shape mismatch: dst ", desc(), ", src ", src.desc());
  bump_version();
  if (device().is_cpu() && src.device().is_cpu()) {
    cpu_copy(*this, src);
    return;
  }
  // Same GPU: one kernel (cast and strides included). Across the PCIe bus the bytes move
  // contiguous and in the source dtype; strides and conversion are done on the side that has them.
  if (device().is_cuda() && src.device() == device()) {
    if (is_contiguous() && src.is_contiguous() && dtype() == src.dtype()) {
      cuda_memcpy_d2d(raw_data(), src.raw_data(), size_t(numel()) * dtype_size(dtype()), device().index);
      return;
    }
#ifdef FTUNE_HAVE_CUDA
    if (is_contiguous() && src.is_contiguous()) {
      kernels::cuda::cast(src.raw_data(), src.dtype(), raw_data(), dtype(), numel(), device().index);
    } else {
      kernels::cuda::strided_copy(src.raw_data(), src.dtype(), src.strides().data(), raw_data(), dtype(),
                                  strides().data(), shape().data(), int(dim()), device().index);
    }
#endif
    return;
  }
  Tensor s = src;
  if (src.device().is_cuda()) {
    Tensor sc = src.is_contiguous() ? src.detach() : src.detach().contiguous();  // on its GPU
    if (device().is_cpu() && is_contiguous() && dtype() == src.dtype()) {  // straight in
      cuda_memcpy_d2h(raw_data(), sc.raw_data(), size_t(numel()) * dtype_size(dtype()), src.device().index);
      return;
    }
    Tensor h = Tensor::empty(src.shape(), src.dtype(), Device::cpu());
    cuda_memcpy_d2h(h.raw_data(), sc.raw_data(), size_t(numel()) * dtype_size(src.dtype()), src.device().index);
    s = h;
  }
  if (device().is_cpu()) {
    cpu_copy(*this, s);
    return;
  }
  // Host -> GPU: contiguous host bytes in the source dtype (fewer bytes over the bus for 16-bit
  // sources), then one device-side copy when dtype or layout differ.
  Tensor h = s.is_contiguous() ? s : s.contiguous();
  if (is_contiguous() && h.dtype() == dtype()) {
    cuda_memcpy_h2d(raw_data(), h.raw_data(), size_t(numel()) * dtype_size(dtype()), device().index);
    return;
  }
  Tensor staged = Tensor::empty(shape(), h.dtype(), device());
  cuda_memcpy_h2d(staged.raw_data(), h.raw_data(), size_t(numel()) * dtype_size(h.dtype()), device().index);
  copy_(staged);
}

void Tensor::fill_(double v) {
  profiler::OpScope prof("fill");
  bump_version();
  if (device().is_cuda()) {
#ifdef FTUNE_HAVE_CUDA
    if (is_contiguous()) {
      kernels::cuda::fill(raw_data(), dtype(), numel(), v, device().index);
      return;
    }
#endif
    Tensor h = Tensor::full(shape(), v, dtype(), Device::cpu());
    copy_(h);
    return;
  }
  dispatch_dtype(dtype(), "fill_", [&]<class T>() {
    T val;
    if constexpr (std::is_same_v<T, bool>)
      val = v != 0.0;
    else if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>)
      val = T(float(v));
    else
      val = T(v);
    T* d = static_cast<T*>(raw_data());
    if (is_contiguous()) {
      int64_t n = numel();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) d[i] = val;
      return;
    }
    kernels::cpu::strided_for<1>(shape(), {&strides()},
                                 [&](int64_t n, const std::array<int64_t, 1>& off,
                                     const std::array<int64_t, 1>& st) {
                                   for (int64_t i = 0; i < n; ++i) d[off[0] + i * st[0]] = val;
                                 });
  });
}

Tensor Tensor::detach() const {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = impl_->storage;
  impl->shape = impl_->shape;
  impl->strides = impl_->strides;
  impl->offset = impl_->offset;
  impl->dtype = impl_->dtype;
  return Tensor(std::move(impl));
}

Tensor& Tensor::set_requires_grad(bool r) {
  FTUNE_CHECK(!r || is_floating(dtype()), "[tensor] requires_grad on a ", desc(), " tensor");
  FTUNE_CHECK(is_leaf() || r, "[tensor] cannot clear requires_grad of a non-leaf; use detach()");
  impl_->requires_grad = r;
  return *this;
}

Tensor Tensor::clone() const {
  Tensor out = Tensor::empty(shape(), dtype(), device());
  out.copy_(*this);
  record("clone", out, {*this}, [](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{g};
  });
  return out;
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

Tensor Tensor::to(Device dev) const {
  if (dev == device()) return *this;
  Tensor out = Tensor::empty(shape(), dtype(), dev);
  out.copy_(is_contiguous() ? *this : detach().contiguous());
  Device src_dev = device();
  record("to_device", out, {*this}, [src_dev](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{g.to(src_dev)};
  });
  return out;
}

Tensor Tensor::to(DType dt) const {
  if (dt == dtype()) return *this;
  return ops::cast(*this, dt);
}

// ---------------------------------------------------------------------------- views

Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.impl()->storage;
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  impl->dtype = base.dtype();
  return Tensor(std::move(impl));
}

namespace {

int64_t wrap_dim(int64_t d, int64_t nd, const char* op) {
  int64_t w = d < 0 ? d + nd : d;
  FTUNE_CHECK(w >= 0 && w < nd, "[", op, "] dim ", d, " out of range for a ", nd, "-d tensor");
  return w;
}

Shape infer_shape(const Shape& want, int64_t numel, const Shape& have) {
  Shape s = want;
  int64_t known = 1, neg = -1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      FTUNE_CHECK(neg < 0, "[view] more than one -1 in ", shape_str(want));
      neg = int64_t(i);
    } else {
      FTUNE_CHECK(s[i] >= 0, "[view] negative size in ", shape_str(want));
      known *= s[i];
    }
  }
  if (neg >= 0) {
    FTUNE_CHECK(known > 0 && numel % known == 0, "[view] cannot view ", shape_str(have), " as ", shape_str(want));
    s[neg] = numel / known;
  }
  FTUNE_CHECK(shape_numel(s) == numel, "[view] cannot view ", shape_str(have), " (", numel,
              " elements) as ", shape_str(want));
  return s;
}

// Strides for viewing (shape, strides) as new_shape without copying, if possible (PyTorch's rule).
bool view_strides(const Shape& shape, const Shape& strides, const Shape& ns, Shape& out) {
  out.assign(ns.size(), 0);
  if (shape_numel(shape) == 0 || shape.empty()) {
    out = contiguous_strides(ns);
    return true;
  }
  int64_t view_d = int64_t(ns.size()) - 1;
  int64_t chunk_base_stride = strides.empty() ? 1 : strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = int64_t(shape.size()) - 1; d >= 0; --d) {
    tensor_numel *= shape[d];
    if (d == 0 || (shape[d - 1] != 1 && strides[d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || ns[view_d] == 1)) {
        out[view_d] = view_numel * chunk_base_stride;
        view_numel *= ns[view_d];
        --view_d;
      }
      if (view_numel != tensor_numel) return false;
      if (d > 0) {
        chunk_base_stride = strides[d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  return view_d == -1;
}

BackwardFn reshape_back(Shape in_shape) {
  return [in_shape](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{g.reshape(in_shape)};
  };
}

}  // namespace

Tensor Tensor::view(const Shape& want) const {
  Shape ns = infer_shape(want, numel(), shape());
  Shape st;
  FTUNE_CHECK(view_strides(shape(), strides(), ns, st), "[view] ", desc(), " with strides ",
              shape_str(strides()), " cannot be viewed as ", shape_str(ns), "; use reshape()");
  Tensor out = make_view(*this, ns, st, offset());
  record("view", out, {*this}, reshape_back(shape()));
  return out;
}

Tensor Tensor::reshape(const Shape& want) const {
  Shape ns = infer_shape(want, numel(), shape());
  Shape st;
  if (view_strides(shape(), strides(), ns, st)) return view(ns);
  return clone().view(ns);
}

Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  FTUNE_CHECK(int64_t(dims.size()) == dim(), "[permute] ", dims.size(), " dims for ", desc());
  Shape ns(dims.size()), st(dims.size());
  std::vector<int64_t> inv(dims.size(), -1);
  for (size_t i = 0; i < dims.size(); ++i) {
    int64_t d = wrap_dim(dims[i], dim(), "permute");
    FTUNE_CHECK(inv[d] < 0, "[permute] repeated dim ", d);
    inv[d] = int64_t(i);
    ns[i] = shape()[d];
    st[i] = strides()[d];
  }
  Tensor out = make_view(*this, ns, st, offset());
  record("permute", out, {*this}, [inv](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{g.permute(inv)};
  });
  return out;
}

Tensor Tensor::transpose(int64_t a, int64_t b) const {
  a = wrap_dim(a, dim(), "transpose");
  b = wrap_dim(b, dim(), "transpose");
  std::vector<int64_t> p(dim());
  for (int64_t i = 0; i < dim(); ++i) p[i] = i;
  std::swap(p[a], p[b]);
  return permute(p);
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end) const {
  d = wrap_dim(d, dim(), "slice");
  int64_t n = shape()[d];
  if (start < 0) start += n;
  if (end < 0) end += n;
  end = std::min(end, n);
  FTUNE_CHECK(start >= 0 && start <= end, "[slice] range [", start, ", ", end, ") of dim ", d, " of ", desc());
  Shape ns = shape();
  ns[d] = end - start;
  Tensor out = make_view(*this, ns, strides(), offset() + start * strides()[d]);
  Shape in_shape = shape();
  DType dt = dtype();
  Device dev = device();
  record("slice", out, {*this}, [=](const Tensor& g, const std::vector<bool>&) {
    // Slices of one tensor (the q | k | v split of a fused projection): the first to run forms
    // the whole gradient, zeros outside its range; each later one adds its range into that sum
    // (accumulation_target) instead of a zero-padded whole tensor the engine would add.
    if (Tensor sum = accumulation_target(0); sum.defined()) {
      Tensor range = sum.slice(d, start, end);
      ops::add_(range, g);
      return std::vector<Tensor>{sum};
    }
    Tensor full = Tensor::zeros(in_shape, dt, dev);
    full.slice(d, start, end).copy_(g);
    return std::vector<Tensor>{full};
  });
  return out;
}

Tensor Tensor::unsqueeze(int64_t d) const {
  int64_t nd = dim() + 1;
  if (d < 0) d += nd;
  FTUNE_CHECK(d >= 0 && d < nd, "[unsqueeze] dim out of range for ", desc());
  Shape ns = shape();
  ns.insert(ns.begin() + d, 1);
  return reshape(ns);
}

Tensor Tensor::squeeze(int64_t d) const {
  d = wrap_dim(d, dim(), "squeeze");
  FTUNE_CHECK(shape()[d] == 1, "[squeeze] dim ", d, " of ", desc(), " is not 1");
  Shape ns = shape();
  ns.erase(ns.begin() + d);
  return reshape(ns);
}

Tensor Tensor::expand(const Shape& want) const {
  FTUNE_CHECK(int64_t(want.size()) >= dim(), "[expand] ", desc(), " to ", shape_str(want));
  size_t lead = want.size() - size_t(dim());
  Shape st(want.size(), 0);
  Shape target = want;
  for (size_t i = 0; i < want.size(); ++i) {
    if (i >= lead && want[i] == -1) target[i] = shape()[i - lead];  // -1 keeps the size (torch)
    FTUNE_CHECK(target[i] >= 0, "[expand] negative size in ", shape_str(want), " for ", desc());
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (i < lead) continue;
    int64_t have = shape()[i - lead];
    if (have == target[i]) {
      st[i] = strides()[i - lead];
    } else {
      FTUNE_CHECK(have == 1, "[expand] cannot expand ", desc(), " to ", shape_str(want));
    }
  }
  Tensor out = make_view(*this, target, st, offset());
  Shape in_shape = shape();
  record("expand", out, {*this}, [in_shape](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{ops::sum_to(g, in_shape)};
  });
  return out;
}

}  // namespace ftune
