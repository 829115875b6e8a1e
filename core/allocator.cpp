#include "core/allocator.h"

#include <atomic>
#include <cstdlib>

#include "core/error.h"
#include "core/device.h"

namespace ftune {

namespace {
std::atomic<int64_t> g_cur{0}, g_peak{0}, g_allocs{0};
constexpr size_t kAlign = 64;  // cache line, and what AVX-512 loads like

void cpu_free(void* p) {
  if (!p) return;
  size_t* hdr = static_cast<size_t*>(p) - kAlign / sizeof(size_t);
  g_cur -= int64_t(*hdr);
  std::free(hdr);
}
}  // namespace

DataPtr cpu_alloc(size_t bytes) {
  // One aligned header line in front keeps the size for the stats.
  size_t total = ((bytes + kAlign - 1) / kAlign) * kAlign + kAlign;
  void* raw = std::aligned_alloc(kAlign, total);
  FTUNE_CHECK(raw != nullptr, "[allocator] out of host memory allocating ", bytes, " bytes");
  *static_cast<size_t*>(raw) = bytes;
  int64_t cur = (g_cur += int64_t(bytes));
  int64_t peak = g_peak.load();
  while (cur > peak && !g_peak.compare_exchange_weak(peak, cur)) {
  }
  ++g_allocs;
  return DataPtr(static_cast<char*>(raw) + kAlign, &cpu_free);
}

AllocatorStats cpu_allocator_stats() {
  AllocatorStats s;
  s.current_bytes = g_cur.load();
  s.peak_bytes = g_peak.load();
  s.reserved_bytes = s.current_bytes;
  s.num_allocs = g_allocs.load();
  return s;
}

Device Device::parse(const std::string& s) {
  if (s == "cpu") return cpu();
  if (s == "cuda" || s == "gpu") return cuda(0);
  if (s.rfind("cuda:", 0) == 0) {
    try {
      return cuda(std::stoi(s.substr(5)));
    } catch (...) {
    }
  }
  FTUNE_THROW("[device] unknown device '", s, "' (expected cpu, cuda or cuda:N)");
}

}  // namespace ftune
