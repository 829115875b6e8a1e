#include "core/ops/common.h"

namespace ftune::ops::detail {

void check_defined(const char* op, const Tensor& t, const char* what) {
  FTUNE_CHECK(t.defined(), "[", op, "] ", what, " is undefined");
}

void check_same_device(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t || !t->defined()) continue;
    if (!first) {
      first = t;
      continue;
    }
    FTUNE_CHECK(t->device() == first->device(), "[", op, "] tensors on different devices: ",
                first->desc(), " and ", t->desc());
  }
}

void check_same_dtype(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t || !t->defined()) continue;
    if (!first) {
      first = t;
      continue;
    }
    FTUNE_CHECK(t->dtype() == first->dtype(), "[", op, "] dtype mismatch: ", first->desc(), " and ",
                t->desc());
  }
}

void check_float(const char* op, const Tensor& t, const char* what) {
  FTUNE_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64 || t.device().is_cuda(), "[", op,
              "] ", what, " must be f32 or f64 on the CPU, got ", t.desc());
  FTUNE_CHECK(is_floating(t.dtype()), "[", op, "] ", what, " must be floating point, got ", t.desc());
}

void check_index(const char* op, const Tensor& t, const char* what) {
  FTUNE_CHECK(t.dtype() == DType::i32 || t.dtype() == DType::i64, "[", op, "] ", what,
              " must be i32 or i64, got ", t.desc());
}

void require_cpu(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t && t->defined() && t->device().is_cuda())
      FTUNE_THROW("[", op, "] has no GPU implementation yet (input ", t->desc(), ")");
}

Shape broadcast_shapes(const char* op, const Shape& a, const Shape& b) {
  size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    FTUNE_CHECK(da == db || da == 1 || db == 1, "[", op, "] shapes ", shape_str(a), " and ",
                shape_str(b), " do not broadcast");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

int64_t wrap_dim(const char* op, int64_t d, int64_t nd) {
  int64_t w = d < 0 ? d + nd : d;
  FTUNE_CHECK(w >= 0 && w < nd, "[", op, "] dim ", d, " out of range for a ", nd, "-d tensor");
  return w;
}

}  // namespace ftune::ops::detail
