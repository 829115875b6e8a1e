#include "tests/op_table.h"

#include <cctype>

namespace ftune::test {

std::vector<OpCase>& op_table() {
  static std::vector<OpCase> table;
  return table;
}

OpTableEntry::OpTableEntry(std::vector<OpCase> cases) {
  for (auto& c : cases) op_table().push_back(std::move(c));
}

std::string test_id(const OpCase& c) {
  std::string name = c.op + "_" + c.variant;
  for (auto& ch : name)
    if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return name;
}

std::vector<Tensor> make_inputs(const OpCase& c, DType dt, uint64_t seed, bool with_grad) {
  Generator gen(seed);
  std::vector<Tensor> xs;
  for (const InputSpec& s : c.inputs) {
    Tensor t;
    switch (s.fill) {
      case Fill::normal: t = randn(s.shape, gen, 0.0, s.scale, dt); break;
      case Fill::uniform: t = rand(s.shape, gen, s.lo, s.hi, dt); break;
      case Fill::index: t = randint(s.shape, gen, 0, int64_t(s.hi), DType::i64); break;
      case Fill::fixed:
        t = s.make();
        if (is_floating(t.dtype())) t = t.to(dt);
        break;
    }
    if (with_grad && s.grad && is_floating(t.dtype())) t.set_requires_grad(true);
    xs.push_back(t);
  }
  return xs;
}

}  // namespace ftune::test
