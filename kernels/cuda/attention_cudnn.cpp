// cuDNN's fused flash attention through the cuDNN 9 graph (backend descriptor) API: the
// `attention.backend: cudnn` alternative to kernels/cuda/attention.cu (kernels/attention.h).
//
// The graphs are the composite SDPA patterns cuDNN's runtime-fusion flash-attention engines match
// (the ones cudnn-frontend builds for cuDNN < 9.21), written here directly as operations:
//   forward:  S = Q K^T; S *= scale; [causal: S = row >= col ? S : -inf]; M = rowmax S;
//             E = exp(S - M); Z = rowsum E; Stats = M + log Z; P = E / Z; O = P V
//   backward: Delta = rowsum(dO * O); S = (Q K^T) * scale - Stats; [causal mask]; P = exp S;
//             dV = P^T dO; dS = (dO V^T - Delta) * P * scale; dK = dS^T Q; dQ = dS K
// Grouped-query: K and V keep their Hkv heads (the matmuls broadcast them over H); the backward
// computes dK / dV per query head and sums each group with a reduction (cudnn-frontend's way).
// Tensors are 4-d [B, heads, seq, dim] views of ftune's token-major [B*T, heads, dim] buffers:
// strides [T*heads*D, D, heads*D, 1]. cuDNN's Stats are [B, H, T, 1]; ftune's lse is [H, B*T]:
// for B > 1 they are converted with strided copies (for B == 1 they are the same bytes).
#include "kernels/attention.h"

#include "core/error.h"

#ifndef FTUNE_HAVE_CUDNN

namespace ftune::kernels::cuda {

namespace {
[[noreturn]] void no_cudnn() {
  FTUNE_THROW("[attention:cudnn] this ftune was built without cuDNN (CMake found no cudnn.h / "
              "libcudnn 9 beside the CUDA toolkit); use attention.backend: ftune or rebuild with "
              "cuDNN 9 installed");
}
}  // namespace

std::string cudnn_attention_unsupported(const AttnParams&, const std::vector<AttnSeq>&, DType) {
  return "ftune was built without cuDNN";
}
void cudnn_attention_forward(const AttnParams&, const std::vector<AttnSeq>&, DType, const void*,
                             const void*, const void*, void*, float*) {
  no_cudnn();
}
void cudnn_attention_backward(const AttnParams&, const std::vector<AttnSeq>&, DType, const void*,
                              const void*, const void*, const void*, const float*, const void*,
                              void*, void*, void*) {
  no_cudnn();
}

}  // namespace ftune::kernels::cuda

#else  // FTUNE_HAVE_CUDNN

#include <cuda_runtime.h>
#include <cudnn.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <tuple>

#include "core/allocator.h"
#include "core/cuda_runtime.h"

namespace ftune::kernels::cuda {

namespace {

// The shape of one call, for error messages and as the plan cache key.
struct Shape {
  int device = 0;
  bool backward = false;
  DType dt = DType::bf16;
  int64_t B = 0, H = 0, Hkv = 0, Tq = 0, Tk = 0, D = 0;
  bool causal = false;
  auto tie() const { return std::tie(device, backward, dt, B, H, Hkv, Tq, Tk, D, causal); }
  bool operator<(const Shape& o) const { return tie() < o.tie(); }
  std::string str() const {
    return str_cat(backward ? "backward" : "forward", " ", dtype_name(dt), " B=", B, " H=", H,
                   " Hkv=", Hkv, " Tq=", Tq, " Tk=", Tk, " D=", D, causal ? " causal" : "");
  }
};

std::string last_error() {
  char msg[1024] = {0};
  cudnnGetLastErrorString(msg, sizeof(msg));
  return msg;
}

void check(cudnnStatus_t st, const char* what, const Shape& s) {
  if (st == CUDNN_STATUS_SUCCESS) return;
  std::string detail = last_error();
  FTUNE_THROW("[attention:cudnn] ", what, ": ", cudnnGetErrorString(st),
              detail.empty() ? "" : " (", detail, detail.empty() ? "" : ")", " for ", s.str());
}

#define CUDNN_OK(expr) check((expr), #expr, shape_)

void check_cuda(cudaError_t e, const char* what, const Shape& s) {
  if (e != cudaSuccess)
    FTUNE_THROW("[attention:cudnn] ", what, ": ", cudaGetErrorString(e), " for ", s.str());
}

// An owned backend descriptor.
struct Desc {
  cudnnBackendDescriptor_t d = nullptr;
  Desc() = default;
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  ~Desc() {
    if (d) cudnnBackendDestroyDescriptor(d);
  }
};

// A finalized execution plan and everything it was built from (kept alive with it).
struct Plan {
  std::vector<std::unique_ptr<Desc>> keep;
  cudnnBackendDescriptor_t plan = nullptr;
  int64_t workspace = 0;
};

// UIDs of the tensors the variant pack binds.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kDO, kDQ, kDK, kDV, kOne, kSoftmaxSum, kDQAccum,
  kFirstVirtual = 100
};

cudnnDataType_t cudnn_type(DType dt) {
  return dt == DType::bf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_HALF;
}

using Dims = std::array<int64_t, 4>;

// Builds one operation graph and its plan. Every helper checks its cuDNN call; the first failure
// throws naming the call, cuDNN's status and message, and the shape.
class Builder {
 public:
  Builder(cudnnHandle_t h, const Shape& s) : h_(h), shape_(s) {}

  cudnnBackendDescriptor_t create(cudnnBackendDescriptorType_t t) {
    auto d = std::make_unique<Desc>();
    CUDNN_OK(cudnnBackendCreateDescriptor(t, &d->d));
    cudnnBackendDescriptor_t raw = d->d;
    keep_.push_back(std::move(d));
    return raw;
  }
  void set(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
           cudnnBackendAttributeType_t t, int64_t n, const void* v) {
    CUDNN_OK(cudnnBackendSetAttribute(d, a, t, n, v));
  }
  void set_desc(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
                cudnnBackendDescriptor_t v) {
    set(d, a, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
  }
  void finalize(cudnnBackendDescriptor_t d) { CUDNN_OK(cudnnBackendFinalize(d)); }

  cudnnBackendDescriptor_t tensor(int64_t uid, cudnnDataType_t dt, Dims dims, Dims strides,
                                  bool is_virtual, bool by_value = false) {
    cudnnBackendDescriptor_t t = create(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt);
    set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data());
    set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data());
    set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    int64_t align = 16;
    set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
    bool v = is_virtual;
    set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &v);
    if (by_value) {
      bool b = true;
      set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &b);
    }
    finalize(t);
    return t;
  }
  // An intermediate of the graph (never in memory).
  cudnnBackendDescriptor_t virt(cudnnDataType_t dt, Dims dims, Dims strides) {
    return tensor(next_virtual_++, dt, dims, strides, true);
  }
  // A host scalar passed by value at execution ([1, 1, 1, 1] f32).
  cudnnBackendDescriptor_t scalar(int64_t uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }

  // y = mode(x[, b][, t]). axis: GEN_INDEX's dimension.
  void pointwise(cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x,
                 cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t,
                 cudnnBackendDescriptor_t y, cudnnDataType_t prec = CUDNN_DATA_FLOAT,
                 int64_t axis = -1) {
    cudnnBackendDescriptor_t pw = create(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
    if (axis >= 0) set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    finalize(pw);
    cudnnBackendDescriptor_t op = create(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b);
    if (t) set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t);
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    float alpha = 1.0f;  // y = op(1 * x, 1 * b): set explicitly, as cudnn-frontend does
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &alpha);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &alpha);
    finalize(op);
    ops_.push_back(op);
  }
  void reduction(cudnnReduceTensorOp_t red, cudnnBackendDescriptor_t x,
                 cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t rd = create(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    set(rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &red);
    cudnnDataType_t f = CUDNN_DATA_FLOAT;
    set(rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f);
    finalize(rd);
    cudnnBackendDescriptor_t op = create(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd);
    finalize(op);
    ops_.push_back(op);
  }
  // c = a b over the last two dims, batched (and broadcast) over the first two.
  void matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b,
              cudnnBackendDescriptor_t c) {
    cudnnBackendDescriptor_t md = create(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    cudnnDataType_t f = CUDNN_DATA_FLOAT;
    set(md, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f);
    finalize(md);
    cudnnBackendDescriptor_t op = create(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, md);
    finalize(op);
    ops_.push_back(op);
  }
  // y: the same elements as x seen with other dims / strides (a transpose here).
  void reshape(cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t op = create(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    set_desc(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    set_desc(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    finalize(op);
    ops_.push_back(op);
  }

  // The operation graph, the heuristic's engine configs in order, the first that finalizes.
  std::unique_ptr<Plan> build() {
    cudnnBackendDescriptor_t graph = create(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &h_);
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(ops_.size()),
        ops_.data());
    finalize(graph);

    cudnnBackendDescriptor_t heur = create(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    set_desc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph);
    cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    finalize(heur);
    int64_t count = 0;
    CUDNN_OK(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                      CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
    FTUNE_CHECK(count > 0, "[attention:cudnn] cuDNN has no engine for this attention graph (",
                shape_.str(), "): ", last_error());
    std::vector<cudnnBackendDescriptor_t> cfgs;
    for (int64_t i = 0; i < count; ++i) cfgs.push_back(create(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
    int64_t got = 0;
    CUDNN_OK(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                      CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got, cfgs.data()));
    std::string why;
    for (int64_t i = 0; i < got; ++i) {
      cudnnBackendDescriptor_t plan = create(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      set(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &h_);
      set_desc(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfgs[size_t(i)]);
      cudnnStatus_t st = cudnnBackendFinalize(plan);
      if (st != CUDNN_STATUS_SUCCESS) {
        // Engines the heuristic lists may still refuse this graph: try the next one.
        why = str_cat(cudnnGetErrorString(st), " ", last_error());
        continue;
      }
      auto p = std::make_unique<Plan>();
      p->plan = plan;
      int64_t ws = 0, n = 0;
      CUDNN_OK(cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                        CUDNN_TYPE_INT64, 1, &n, &ws));
      p->workspace = ws;
      p->keep = std::move(keep_);
      return p;
    }
    FTUNE_THROW("[attention:cudnn] none of cuDNN's ", got, " engine configs for ", shape_.str(),
                " finalizes (last: ", why, ")");
  }

 private:
  cudnnHandle_t h_;
  const Shape& shape_;
  std::vector<std::unique_ptr<Desc>> keep_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  int64_t next_virtual_ = kFirstVirtual;
};

// Strides of a [B, heads, T, D] view of a token-major [B*T, heads, D] buffer.
Dims token_major(int64_t heads, int64_t T, int64_t D) { return {T * heads * D, D, heads * D, 1}; }
// The same buffer viewed as [B, heads, D, T] (the transpose of the last two dims).
Dims token_major_t(int64_t heads, int64_t T, int64_t D) { return {T * heads * D, D, 1, heads * D}; }
Dims contiguous(Dims d) { return {d[1] * d[2] * d[3], d[2] * d[3], d[3], 1}; }

// row >= col ? s : -inf on a [B, H, Tq, Tk] score view (top-left aligned; causal is served only
// with Tq == Tk, where it equals ftune's bottom-right alignment).
cudnnBackendDescriptor_t causal_mask(Builder& g, cudnnBackendDescriptor_t s, Dims dims) {
  const Dims st = contiguous(dims);
  cudnnBackendDescriptor_t row = g.virt(CUDNN_DATA_INT32, dims, st);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, s, nullptr, nullptr, row, CUDNN_DATA_FLOAT, 2);
  cudnnBackendDescriptor_t col = g.virt(CUDNN_DATA_INT32, dims, st);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, s, nullptr, nullptr, col, CUDNN_DATA_FLOAT, 3);
  cudnnBackendDescriptor_t keep = g.virt(CUDNN_DATA_BOOLEAN, dims, st);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, row, col, nullptr, keep, CUDNN_DATA_BOOLEAN);
  cudnnBackendDescriptor_t neg_inf = g.scalar(kNegInf);
  cudnnBackendDescriptor_t out = g.virt(CUDNN_DATA_FLOAT, dims, st);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, s, neg_inf, keep, out);
  return out;
}

std::unique_ptr<Plan> build_forward(cudnnHandle_t h, const Shape& s) {
  Builder g(h, s);
  const cudnnDataType_t io = cudnn_type(s.dt);
  const int64_t B = s.B, H = s.H, Hkv = s.Hkv, Tq = s.Tq, Tk = s.Tk, D = s.D;
  auto q = g.tensor(kQ, io, {B, H, Tq, D}, token_major(H, Tq, D), false);
  auto kt = g.tensor(kK, io, {B, Hkv, D, Tk}, token_major_t(Hkv, Tk, D), false);
  auto v = g.tensor(kV, io, {B, Hkv, Tk, D}, token_major(Hkv, Tk, D), false);
  auto o = g.tensor(kO, io, {B, H, Tq, D}, token_major(H, Tq, D), false);
  const Dims sd = {B, H, Tq, Tk}, rd = {B, H, Tq, 1};
  auto stats = g.tensor(kStats, CUDNN_DATA_FLOAT, rd, contiguous(rd), false);
  auto scale = g.scalar(kScale);

  auto s0 = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.matmul(q, kt, s0);
  auto s1 = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_MUL, s0, scale, nullptr, s1);
  if (s.causal) s1 = causal_mask(g, s1, sd);
  auto mx = g.virt(CUDNN_DATA_FLOAT, rd, contiguous(rd));
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, s1, mx);
  auto sub = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_SUB, s1, mx, nullptr, sub);
  auto e = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_EXP, sub, nullptr, nullptr, e);
  auto z = g.virt(CUDNN_DATA_FLOAT, rd, contiguous(rd));
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, z);
  auto lz = g.virt(CUDNN_DATA_FLOAT, rd, contiguous(rd));
  g.pointwise(CUDNN_POINTWISE_LOG, z, nullptr, nullptr, lz);
  g.pointwise(CUDNN_POINTWISE_ADD, mx, lz, nullptr, stats);
  auto p = g.virt(io, sd, contiguous(sd));  // P rounded to the input type for the PV matmul
  g.pointwise(CUDNN_POINTWISE_DIV, e, z, nullptr, p);
  g.matmul(p, v, o);
  return g.build();
}

std::unique_ptr<Plan> build_backward(cudnnHandle_t h, const Shape& s) {
  Builder g(h, s);
  const cudnnDataType_t io = cudnn_type(s.dt);
  const int64_t B = s.B, H = s.H, Hkv = s.Hkv, Tq = s.Tq, Tk = s.Tk, D = s.D;
  auto q = g.tensor(kQ, io, {B, H, Tq, D}, token_major(H, Tq, D), false);
  auto kt = g.tensor(kK, io, {B, Hkv, D, Tk}, token_major_t(Hkv, Tk, D), false);
  auto vt = g.tensor(kV, io, {B, Hkv, D, Tk}, token_major_t(Hkv, Tk, D), false);
  auto o = g.tensor(kO, io, {B, H, Tq, D}, token_major(H, Tq, D), false);
  auto dout = g.tensor(kDO, io, {B, H, Tq, D}, token_major(H, Tq, D), false);
  auto dq = g.tensor(kDQ, io, {B, H, Tq, D}, token_major(H, Tq, D), false);
  auto dk = g.tensor(kDK, io, {B, Hkv, Tk, D}, token_major(Hkv, Tk, D), false);
  auto dv = g.tensor(kDV, io, {B, Hkv, Tk, D}, token_major(Hkv, Tk, D), false);
  const Dims sd = {B, H, Tq, Tk}, rd = {B, H, Tq, 1}, td = {B, H, Tk, Tq};
  const Dims tst = {H * Tq * Tk, Tq * Tk, 1, Tk};  // [B, H, Tk, Tq] view of a [.., Tq, Tk] score
  auto stats = g.tensor(kStats, CUDNN_DATA_FLOAT, rd, contiguous(rd), false);
  auto softmax_sum = g.tensor(kSoftmaxSum, CUDNN_DATA_FLOAT, rd, contiguous(rd), false);
  const Dims qd = {B, H, Tq, D};
  auto dq_accum = g.tensor(kDQAccum, CUDNN_DATA_FLOAT, qd, contiguous(qd), false);
  auto scale = g.scalar(kScale);
  auto one = g.scalar(kOne);

  // Delta = rowsum(dO * O), kept in memory (softmax_sum) for the dS kernel.
  auto doo = g.virt(CUDNN_DATA_FLOAT, qd, contiguous(qd));
  g.pointwise(CUDNN_POINTWISE_MUL, dout, o, nullptr, doo);
  auto delta = g.virt(CUDNN_DATA_FLOAT, rd, contiguous(rd));
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, doo, delta);
  g.pointwise(CUDNN_POINTWISE_MUL, delta, one, nullptr, softmax_sum);

  // P = exp(S * scale - Stats), masked.
  auto s0 = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.matmul(q, kt, s0);
  auto s1 = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_MUL, s0, scale, nullptr, s1);
  auto s2 = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_SUB, s1, stats, nullptr, s2);
  if (s.causal) s2 = causal_mask(g, s2, sd);
  auto p = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_EXP, s2, nullptr, nullptr, p);

  // dV = P^T dO (per query head, then summed over each kv group under GQA).
  auto pt = g.virt(io, td, tst);
  g.reshape(p, pt);
  const Dims kvd_full = {B, H, Tk, D};
  if (H == Hkv) {
    g.matmul(pt, dout, dv);
  } else {
    auto dv_full = g.virt(io, kvd_full, contiguous(kvd_full));
    g.matmul(pt, dout, dv_full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dv_full, dv);
  }

  // dS = (dO V^T - Delta) * P * scale.
  auto dp = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.matmul(dout, vt, dp);
  auto dp1 = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_SUB, dp, softmax_sum, nullptr, dp1);
  auto ds0 = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_MUL, dp1, p, nullptr, ds0);
  auto ds = g.virt(CUDNN_DATA_FLOAT, sd, contiguous(sd));
  g.pointwise(CUDNN_POINTWISE_MUL, ds0, scale, nullptr, ds);

  // dK = dS^T Q.
  auto dst = g.virt(io, td, tst);
  g.reshape(ds, dst);
  if (H == Hkv) {
    g.matmul(dst, q, dk);
  } else {
    auto dk_full = g.virt(io, kvd_full, contiguous(kvd_full));
    g.matmul(dst, q, dk_full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dk_full, dk);
  }

  // dQ = dS K, accumulated in f32 (dq_accum), then converted.
  auto k = g.virt(io, {B, Hkv, Tk, D}, token_major(Hkv, Tk, D));
  g.reshape(kt, k);
  g.matmul(ds, k, dq_accum);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, dq_accum, nullptr, nullptr, dq);
  return g.build();
}

// Per-thread state, never destroyed (as in matmul.cu: teardown order vs the CUDA context).
struct ThreadState {
  std::map<int, cudnnHandle_t> handles;
  std::map<Shape, std::unique_ptr<Plan>> plans;
  std::map<Shape, std::string> failed;  // forward shapes whose forward or backward plan failed
};
ThreadState& state() {
  thread_local ThreadState* s = new ThreadState;
  return *s;
}

cudnnHandle_t handle(const Shape& shape_) {
  auto& h = state().handles[shape_.device];
  if (!h) {
    // cudnnCreate needs cuDNN 9's sub-libraries and a GPU; a version below 9 would not know the
    // graph patterns.
    FTUNE_CHECK(cudnnGetVersion() >= 90000, "[attention:cudnn] needs cuDNN >= 9, the loaded "
                "library is ", cudnnGetVersion());
    CUDNN_OK(cudnnCreate(&h));
  }
  return h;
}

const Plan& plan_for(const Shape& s) {
  auto& plans = state().plans;
  auto it = plans.find(s);
  if (it != plans.end()) return *it->second;
  // A failed build leaves no entry (cudnn_attention_unsupported remembers the failure).
  std::unique_ptr<Plan> plan = s.backward ? build_backward(handle(s), s) : build_forward(handle(s), s);
  return *plans.emplace(s, std::move(plan)).first->second;
}

void execute(const Shape& shape_, const Plan& plan, std::vector<int64_t> uids,
             std::vector<void*> ptrs) {
  cudnnHandle_t h = handle(shape_);
  cudaStream_t stream = static_cast<cudaStream_t>(ftune::cuda::current_stream());
  CUDNN_OK(cudnnSetStream(h, stream));
  std::shared_ptr<void> ws;
  if (plan.workspace > 0) ws = cuda_alloc(size_t(plan.workspace), shape_.device);
  Desc pack;
  CUDNN_OK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack.d));
  CUDNN_OK(cudnnBackendSetAttribute(pack.d, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
                                    int64_t(uids.size()), uids.data()));
  CUDNN_OK(cudnnBackendSetAttribute(pack.d, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                                    CUDNN_TYPE_VOID_PTR, int64_t(ptrs.size()), ptrs.data()));
  void* wsp = ws.get();
  CUDNN_OK(cudnnBackendSetAttribute(pack.d, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR,
                                    1, &wsp));
  CUDNN_OK(cudnnBackendFinalize(pack.d));
  CUDNN_OK(cudnnBackendExecute(h, plan.plan, pack.d));
  // ws goes back to the caching allocator here, stream-ordered after the kernels just queued.
}

// [H, B*T] (ftune) <-> [B, H, T] (cuDNN) for B > 1: per batch row b one 2-d copy of H rows of T
// floats (ftune's row h of batch b starts at h*B*T + b*T; cuDNN's at (b*H + h)*T).
void lse_to_cudnn(const Shape& s, const float* lse, float* stats, cudaStream_t st) {
  const size_t row = size_t(s.Tq) * sizeof(float);
  for (int64_t b = 0; b < s.B; ++b)
    check_cuda(cudaMemcpy2DAsync(stats + b * s.H * s.Tq, row, lse + b * s.Tq, row * size_t(s.B),
                                 row, size_t(s.H), cudaMemcpyDeviceToDevice, st),
               "cudaMemcpy2DAsync (lse -> stats)", s);
}
void lse_from_cudnn(const Shape& s, const float* stats, float* lse, cudaStream_t st) {
  const size_t row = size_t(s.Tq) * sizeof(float);
  for (int64_t b = 0; b < s.B; ++b)
    check_cuda(cudaMemcpy2DAsync(lse + b * s.Tq, row * size_t(s.B), stats + b * s.H * s.Tq, row,
                                 row, size_t(s.H), cudaMemcpyDeviceToDevice, st),
               "cudaMemcpy2DAsync (stats -> lse)", s);
}

Shape make_shape(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt, bool backward) {
  Shape s;
  s.device = ftune::cuda::current_device();
  s.backward = backward;
  s.dt = dt;
  s.B = int64_t(seqs.size());
  s.H = p.num_heads;
  s.Hkv = p.num_kv_heads;
  s.Tq = seqs[0].len_q;
  s.Tk = seqs[0].len_k;
  s.D = p.head_dim;
  s.causal = p.causal;
  return s;
}

Shape shape_of(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt, bool backward) {
  std::string why = cudnn_attention_unsupported(p, seqs, dt);
  FTUNE_CHECK(why.empty(), "[attention:cudnn] cannot run this call: ", why);
  return make_shape(p, seqs, dt, backward);
}

}  // namespace

std::string cudnn_attention_unsupported(const AttnParams& p, const std::vector<AttnSeq>& seqs,
                                        DType dt) {
  if (dt != DType::bf16 && dt != DType::f16)
    return str_cat("dtype ", dtype_name(dt), " (cuDNN's flash attention takes bf16 or f16)");
  if (p.head_dim % 8 != 0 || p.head_dim > 128)
    return str_cat("head_dim ", p.head_dim, " (served: a multiple of 8 up to 128)");
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0)
    return str_cat("heads ", p.num_heads, " not a multiple of kv heads ", p.num_kv_heads);
  if (seqs.empty()) return "no sequences";
  const int64_t Tq = seqs[0].len_q, Tk = seqs[0].len_k;
  if (Tq <= 0 || Tk <= 0) return "an empty sequence";
  for (size_t b = 0; b < seqs.size(); ++b) {
    const AttnSeq& s = seqs[b];
    if (s.len_q != Tq || s.len_k != Tk || s.q_start != int64_t(b) * Tq ||
        s.k_start != int64_t(b) * Tk)
      return str_cat("packed variable-length sequences (sequence ", b, " is {", s.q_start, ", ",
                     s.len_q, ", ", s.k_start, ", ", s.len_k,
                     "}): only a batch of equal-length sequences is served");
  }
  if (p.nq != int64_t(seqs.size()) * Tq || p.nk != int64_t(seqs.size()) * Tk)
    return "token counts that do not match the sequences";
  if (p.causal && Tq != Tk)
    return str_cat("causal with Tq ", Tq, " != Tk ", Tk,
                   " (ftune's mask is bottom-right aligned; only Tq == Tk is served)");
  // What only the backward refuses is refused here too: the op picks the backend at the forward
  // and runs the same backend's backward, so a refusal must come before the forward.
  if (Tq == 1 && Tk == 1) return "Tq = Tk = 1 (cuDNN's SDPA graphs do not serve it)";
  const int64_t ver = int64_t(cudnnGetVersion());
  if (Tk % 128 != 0 && ver <= 91500)
    return str_cat("Tk ", Tk, " not a multiple of 128 with cuDNN ", ver,
                   " (the backward needs cuDNN > 9.15 there)");
  if (ver >= 91000 && ver < 91002) return str_cat("cuDNN ", ver, " (its SDPA backward is broken)");
  // Both plans are built now, once per shape: a shape cuDNN finds no plan for falls back.
  const Shape fwd = make_shape(p, seqs, dt, false);
  auto& failed = state().failed;
  if (auto it = failed.find(fwd); it != failed.end()) return it->second;
  try {
    plan_for(fwd);
    Shape bwd = fwd;
    bwd.backward = true;
    plan_for(bwd);
  } catch (const std::exception& e) {
    return failed[fwd] = str_cat("cuDNN built no plan for this shape: ", e.what());
  }
  return "";
}

void cudnn_attention_forward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt,
                             const void* q, const void* k, const void* v, void* out, float* lse) {
  const Shape s = shape_of(p, seqs, dt, false);
  const Plan& plan = plan_for(s);
  cudaStream_t st = static_cast<cudaStream_t>(ftune::cuda::current_stream());
  std::shared_ptr<void> tmp;  // cuDNN's [B, H, T] stats when they differ from ftune's layout
  float* stats = lse;
  if (s.B > 1) {
    tmp = cuda_alloc(size_t(s.B * s.H * s.Tq) * sizeof(float), s.device);
    stats = static_cast<float*>(tmp.get());
  }
  float scale = float(p.scale), neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<int64_t> uids = {kQ, kK, kV, kO, kStats, kScale};
  std::vector<void*> ptrs = {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), out,
                             stats, &scale};
  if (s.causal) {  // the -inf scalar is in the graph only with the mask
    uids.push_back(kNegInf);
    ptrs.push_back(&neg_inf);
  }
  execute(s, plan, uids, ptrs);
  if (s.B > 1) lse_from_cudnn(s, stats, lse, st);
}

void cudnn_attention_backward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt,
                              const void* q, const void* k, const void* v, const void* out,
                              const float* lse, const void* dout, void* dq, void* dk, void* dv) {
  const Shape s = shape_of(p, seqs, dt, true);
  const Plan& plan = plan_for(s);
  cudaStream_t st = static_cast<cudaStream_t>(ftune::cuda::current_stream());
  const size_t esz = 2;  // bf16 / f16
  const size_t rows = size_t(s.B * s.H * s.Tq);
  // The graph writes every gradient: a null one gets a scratch buffer.
  std::vector<std::shared_ptr<void>> scratch;
  auto need = [&](void* ptr, size_t bytes) {
    if (ptr) return ptr;
    scratch.push_back(cuda_alloc(bytes, s.device));
    return scratch.back().get();
  };
  dq = need(dq, size_t(p.nq * s.H * s.D) * esz);
  dk = need(dk, size_t(p.nk * s.Hkv * s.D) * esz);
  dv = need(dv, size_t(p.nk * s.Hkv * s.D) * esz);
  std::shared_ptr<void> sums = cuda_alloc(rows * sizeof(float), s.device);
  std::shared_ptr<void> accum = cuda_alloc(rows * size_t(s.D) * sizeof(float), s.device);
  // Older cuDNN required a zeroed dQ accumulator; 9.6+ does not, but zeroing is cheap insurance.
  check_cuda(cudaMemsetAsync(accum.get(), 0, rows * size_t(s.D) * sizeof(float), st),
             "cudaMemsetAsync (dQ accumulator)", s);
  const float* stats = lse;
  std::shared_ptr<void> tmp;
  if (s.B > 1) {
    tmp = cuda_alloc(rows * sizeof(float), s.device);
    lse_to_cudnn(s, lse, static_cast<float*>(tmp.get()), st);
    stats = static_cast<const float*>(tmp.get());
  }
  float scale = float(p.scale), neg_inf = -std::numeric_limits<float>::infinity(), one = 1.0f;
  std::vector<int64_t> uids = {kQ,  kK,  kV,  kO,  kDO,         kStats,  kScale,
                               kOne, kDQ, kDK, kDV, kSoftmaxSum, kDQAccum};
  std::vector<void*> ptrs = {const_cast<void*>(q),    const_cast<void*>(k),
                             const_cast<void*>(v),    const_cast<void*>(out),
                             const_cast<void*>(dout), const_cast<float*>(stats),
                             &scale,                  &one,
                             dq,                      dk,
                             dv,                      sums.get(),
                             accum.get()};
  if (s.causal) {
    uids.push_back(kNegInf);
    ptrs.push_back(&neg_inf);
  }
  execute(s, plan, uids, ptrs);
}

}  // namespace ftune::kernels::cuda

#endif  // FTUNE_HAVE_CUDNN
