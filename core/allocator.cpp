#include "core/allocator.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "core/device.h"

namespace ftune {

namespace {
std::atomic<int64_t> g_cur{0}, g_peak{0}, g_allocs{0}, g_hits{0}, g_cached{0};
constexpr size_t kAlign = 64;  // cache line, and what AVX-512 loads like

// Large blocks (>= 256 KiB) are kept on release and reused by size class: glibc returns them to
// the OS (munmap) at once, and every training step would page-fault its activations in again
// (measured ~10% of a CPU step). Classes are 2^k * {1, 1.25, 1.5, 1.75}, so waste is < 25%.
constexpr size_t kCacheMin = size_t(256) << 10;

size_t size_class(size_t total) {
  if (total < kCacheMin) return total;
  size_t p = size_t(1) << (63 - __builtin_clzll(total));  // largest power of two <= total
  size_t step = p / 4;
  return (total + step - 1) / step * step;
}

size_t cache_limit() {
  static const size_t limit = [] {
    const char* e = std::getenv("FTUNE_CPU_CACHE_MB");  // 0 turns caching off
    return e ? size_t(std::strtoull(e, nullptr, 10)) << 20 : size_t(4) << 30;
  }();
  return limit;
}

struct HostCache {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // class -> raw blocks
};
HostCache& host_cache() {
  static HostCache* c = new HostCache();  // never destroyed: frees may run during static teardown
  return *c;
}

// Header line in front of each block: [0] requested bytes (stats), [1] block size (class).
void cpu_free(void* p) {
  if (!p) return;
  size_t* hdr = static_cast<size_t*>(p) - kAlign / sizeof(size_t);
  g_cur -= int64_t(hdr[0]);
  size_t cls = hdr[1];
  if (cls >= kCacheMin && size_t(g_cached.load()) + cls <= cache_limit()) {
    HostCache& c = host_cache();
    std::lock_guard<std::mutex> lk(c.mu);
    c.free_blocks[cls].push_back(hdr);
    g_cached += int64_t(cls);
    return;
  }
  std::free(hdr);
}

void* take_cached(size_t cls) {
  if (cls < kCacheMin) return nullptr;
  HostCache& c = host_cache();
  std::lock_guard<std::mutex> lk(c.mu);
  auto it = c.free_blocks.find(cls);
  if (it == c.free_blocks.end() || it->second.empty()) return nullptr;
  void* raw = it->second.back();
  it->second.pop_back();
  g_cached -= int64_t(cls);
  ++g_hits;
  return raw;
}
}  // namespace

DataPtr cpu_alloc(size_t bytes) {
  size_t total = size_class(((bytes + kAlign - 1) / kAlign) * kAlign + kAlign);
  void* raw = take_cached(total);
  if (!raw) {
    raw = std::aligned_alloc(kAlign, total);
    if (!raw && g_cached.load() > 0) {  // give the cache back and try once more
      cpu_empty_cache();
      raw = std::aligned_alloc(kAlign, total);
    }
  }
  FTUNE_CHECK(raw != nullptr, "[allocator] out of host memory allocating ", bytes, " bytes");
  static_cast<size_t*>(raw)[0] = bytes;
  static_cast<size_t*>(raw)[1] = total;
  int64_t cur = (g_cur += int64_t(bytes));
  int64_t peak = g_peak.load();
  while (cur > peak && !g_peak.compare_exchange_weak(peak, cur)) {
  }
  ++g_allocs;
  return DataPtr(static_cast<char*>(raw) + kAlign, &cpu_free);
}

void cpu_empty_cache() {
  HostCache& c = host_cache();
  std::lock_guard<std::mutex> lk(c.mu);
  for (auto& kv : c.free_blocks) {
    for (void* raw : kv.second) std::free(raw);
    g_cached -= int64_t(kv.first * kv.second.size());
  }
  c.free_blocks.clear();
}

AllocatorStats cpu_allocator_stats() {
  AllocatorStats s;
  s.current_bytes = g_cur.load();
  s.peak_bytes = g_peak.load();
  s.reserved_bytes = s.current_bytes + g_cached.load();
  s.num_allocs = g_allocs.load();
  s.cache_hits = g_hits.load();
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

std::string cuda_oom_message(size_t bytes, int device, const AllocatorStats& stats,
                             int64_t free_bytes, int64_t total_bytes) {
  auto gib = [](double b) {  // GiB, or MiB below 1 GiB
    char buf[32];
    if (b >= double(int64_t(1) << 30))
      std::snprintf(buf, sizeof buf, "%.2f GiB", b / double(int64_t(1) << 30));
    else
      std::snprintf(buf, sizeof buf, "%.1f MiB", b / double(int64_t(1) << 20));
    return std::string(buf);
  };
  std::string m = "out of GPU memory on cuda:" + std::to_string(device) + ": asked for " +
                  gib(double(bytes)) + " with " + gib(double(stats.current_bytes)) +
                  " held by ftune's tensors (peak " + gib(double(stats.peak_bytes)) + ")";
  if (total_bytes > 0)
    m += " of the device's " + gib(double(total_bytes)) + " (" +
         gib(double(std::max<int64_t>(free_bytes, 0))) + " free)";
  m += ". To lower the peak: enable_activation_checkpointing: true; a smaller batch_size (with a "
       "larger gradient_accumulation_steps to keep the tokens per step); a shorter "
       "tokenizer.max_seq_len; chunked_loss: true (the default); LoRA instead of full "
       "fine-tuning; or parallel.zero: 1 over several GPUs";
  return m;
}

}  // namespace ftune
