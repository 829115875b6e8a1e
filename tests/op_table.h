// The op-test table: each op declares its inputs (shapes, how to fill them), its reference and
// its tolerance once. The table drives three modes:
//   (a) reference comparison (tests/test_ops.cpp, f32 and f64 against an independent reference),
//   (b) central-difference gradient check in f64 (tests/test_ops.cpp),
//   (c) timing (bench/bench_ops.cpp), on the cases marked bench.
// Families register their cases from tests/ops/table_<family>.cpp with a static OpTableEntry.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "core/ops.h"
#include "core/rng.h"

namespace ftune::test {

enum class Fill {
  normal,    // N(0, 1) * scale
  uniform,   // U(lo, hi)
  index,     // integers in [0, hi) as i64
  fixed,     // made by `make` (cu_seqlens, masks...), dtype kept
};

struct InputSpec {
  std::string name;
  Shape shape;
  Fill fill = Fill::normal;
  bool grad = true;  // differentiable input (gradient-checked)
  double lo = -1.0, hi = 1.0, scale = 1.0;
  std::function<Tensor()> make;  // for Fill::fixed
};

using OpFn = std::function<Tensor(const std::vector<Tensor>&)>;

struct OpCase {
  std::string op;       // op name, e.g. "rms_norm"
  std::string variant;  // what this case exercises, e.g. "3x7x16"
  std::vector<InputSpec> inputs;
  OpFn run;        // the ftune op under test
  OpFn reference;  // an independent (naive) implementation; it is run in f64
  double atol = 1e-5, rtol = 1e-4;      // f32 vs reference: |x - ref| <= atol + rtol * |ref|
  double atol64 = 1e-10, rtol64 = 1e-9;  // f64 vs reference
  bool gradcheck = true;
  int grad_elems = 40;  // elements per input probed by central differences
  double fd_eps = 1e-6, grad_atol = 1e-7, grad_rtol = 1e-5;
  double grad_rtol32 = 1e-3;  // f32 backward vs f64 backward, relative to max(|g|, 1e-3 max|g|)
  bool bench = false;   // a large case: timing mode only
  bool bench_backward = true;
  std::function<double()> flops;  // forward FLOPs, for GFLOP/s in timing mode (optional)
};

std::vector<OpCase>& op_table();

struct OpTableEntry {
  explicit OpTableEntry(std::vector<OpCase> cases);
};

// Makes a case's inputs: float inputs in `dt`, seeded by `seed`; grad inputs require grad.
std::vector<Tensor> make_inputs(const OpCase& c, DType dt, uint64_t seed, bool with_grad);
// Full name "op/variant".
inline std::string case_name(const OpCase& c) { return c.op + "/" + c.variant; }
// "op_variant" with every non-alphanumeric character made '_': a gtest name.
std::string test_id(const OpCase& c);

}  // namespace ftune::test
