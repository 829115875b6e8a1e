// libFuzzer target: the safetensors header parser on arbitrary bytes (a whole "file" in memory).
// It must return or throw ftune::Error; anything else (a crash, an ASan/UBSan report, another
// exception escaping, a broken invariant of an accepted file) is a finding. Build and run:
//   CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DFTUNE_FUZZ=ON -DFTUNE_CUDA=OFF \
//       -DFTUNE_MPI=OFF -DFTUNE_HDF5=OFF && ninja -C build-fuzz fuzz_safetensors
//   mkdir -p /tmp/st-corpus && build-fuzz/tests/fuzz/fuzz_safetensors /tmp/st-corpus \
//       tests/fixtures/safetensors -dict=tests/fuzz/safetensors.dict -max_total_time=60
#include <cstdint>
#include <cstdlib>

#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ftune;
  try {
    SafetensorsHeader h = parse_safetensors_header(data, size, "fuzz");
    uint64_t expect = 0;
    for (const SafetensorsEntry& e : h.entries) {
      if (e.begin != expect || e.end < e.begin) std::abort();  // ranges must tile the buffer
      expect = e.end;
      // Copies out of the buffer: ASan catches any read past it.
      if (st_to_dtype(e.dtype)) safetensors_entry_to_tensor(e, data + h.data_start(), "fuzz");
    }
    if (h.data_start() + expect != size) std::abort();
  } catch (const Error&) {
  }
  return 0;
}
