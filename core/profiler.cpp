#include "core/profiler.h"

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <memory>
#include <unordered_map>

#include "core/cuda_runtime.h"
#include "core/error.h"

namespace ftune::profiler {

namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Labels and phase names, interned once: intervals and node stamps hold ids (0: none).
struct Labels {
  std::unordered_map<std::string, uint32_t> ids;
  std::vector<std::string> names{""};
  uint32_t id(const std::string& s) {
    auto it = ids.find(s);
    if (it != ids.end()) return it->second;
    names.push_back(s);
    return ids[s] = uint32_t(names.size() - 1);
  }
};

struct Interval {
  uint32_t label, phase;
  int ev0 = -1, ev1 = -1;
  double t0 = 0, host_ms = 0;
};
struct Boundary {  // a phase starts
  uint32_t phase;
  int ev;
  double t;
};
struct Acc {
  int64_t calls = 0;
  double host_ms = 0, gpu_ms = 0;
  size_t first_seen = 0;
};
struct PhaseAcc {
  double issue = 0, gpu = 0, clean_issue = 0, clean_gpu = 0;
  size_t first_seen = 0;
};

struct State {
  Labels labels;
  // The step in progress.
  bool in_step = false, hooks = false, gpu = false;
  double t_begin = 0;
  int ev_begin = -1;
  uint32_t cur_phase = 0, implicit_phase = 0;
  std::vector<Interval> iv;
  std::vector<Boundary> bounds;
  std::vector<std::unique_ptr<cuda::Event>> pool;  // reused across steps
  size_t used = 0;
  // Totals over the steps.
  std::map<std::pair<uint32_t, uint32_t>, Acc> acc;  // (phase, label)
  std::map<uint32_t, PhaseAcc> phases;
  bool any_gpu = false;
  int steps = 0, clean_steps = 0;
  double wall = 0, issue = 0, gpu_total = 0, att_host = 0, att_gpu = 0;
  int64_t intervals = 0;
  double clean_wall = 0, clean_issue = 0, clean_gpu = 0;
};

State& st() {
  static State s;
  return s;
}

// The profiled thread: only its ops are timed (a loader thread's copies are not part of the step).
thread_local bool t_owner = false;
thread_local int t_depth = 0;  // nesting of hooked calls; depth 1 is the timed one
thread_local int t_open = -1;  // index of the open interval

int record_event() {
  State& s = st();
  if (s.used == s.pool.size()) s.pool.push_back(std::make_unique<cuda::Event>(true));
  s.pool[s.used]->record(cuda::current_stream());
  return int(s.used++);
}

void open(uint32_t label) {
  State& s = st();
  Interval v;
  v.label = label;
  v.phase = s.cur_phase;
  if (s.gpu) v.ev0 = record_event();
  v.t0 = now_ms();  // after the event: the profiler's own cost stays outside the interval
  s.iv.push_back(v);
  t_open = int(s.iv.size() - 1);
}

// "linear" from "linear [896,4864]".
std::string op_of(const std::string& label) { return label.substr(0, label.find(' ')); }

}  // namespace

namespace detail {

bool enter(const char* op, const std::vector<int64_t>* shape) {
  if (!t_owner) return false;
  if (++t_depth == 1) {
    std::string l = op;
    if (shape) {
      l += " [";
      for (size_t i = 0; i < shape->size(); ++i) {
        if (i) l += ',';
        l += std::to_string((*shape)[i]);
      }
      l += "]";
    }
    open(st().labels.id(l));
  }
  return true;
}

bool enter_backward(const std::string& node_name, uint32_t stamp) {
  if (!t_owner) return false;
  // Transparent: the recompute and inner backward of a checkpointed block are timed op by op.
  if (node_name == "checkpoint") return false;
  if (++t_depth == 1) {
    State& s = st();
    std::string l;
    if (stamp) {
      const std::string& fwd = s.labels.names[stamp];
      l = "bwd " + fwd;
      if (op_of(fwd) != node_name) l += " (" + node_name + ")";
    } else {
      l = "bwd (" + node_name + ")";
    }
    open(s.labels.id(l));
  }
  return true;
}

void leave() {
  if (t_depth == 1 && t_open >= 0) {
    State& s = st();
    Interval& v = s.iv[size_t(t_open)];
    v.host_ms = now_ms() - v.t0;
    if (s.gpu) v.ev1 = record_event();
    t_open = -1;
  }
  if (t_depth > 0) --t_depth;
}

}  // namespace detail

uint32_t current_label() {
  if (!t_owner || t_open < 0) return 0;
  return st().iv[size_t(t_open)].label;
}

void begin_step(Device dev, bool op_hooks) {
  State& s = st();
  FTUNE_CHECK(!s.in_step, "[profiler] begin_step() inside a profiled step (end_step() first)");
  s.in_step = true;
  s.hooks = op_hooks;
  s.gpu = dev.is_cuda();
  s.iv.clear();
  s.bounds.clear();
  s.used = 0;
  t_owner = true;
  t_depth = 0;
  t_open = -1;
  s.implicit_phase = s.cur_phase = s.labels.id("step");
  s.ev_begin = s.gpu ? record_event() : -1;
  s.t_begin = now_ms();
  s.bounds.push_back({s.cur_phase, s.ev_begin, s.t_begin});
  detail::g_hooks.store(op_hooks, std::memory_order_relaxed);
}

void phase(const char* name) {
  State& s = st();
  if (!s.in_step || !t_owner) return;
  FTUNE_CHECK(t_depth == 0, "[profiler] phase('", name, "') called inside an op");
  const uint32_t id = s.labels.id(name);
  // The implicit phase that opened the step, still empty: renamed rather than kept as a sliver.
  if (s.bounds.size() == 1 && s.bounds[0].phase == s.implicit_phase && s.iv.empty()) {
    s.bounds[0].phase = s.cur_phase = id;
    return;
  }
  s.cur_phase = id;
  s.bounds.push_back({id, s.gpu ? record_event() : -1, now_ms()});
}

bool in_step() { return st().in_step; }

void cancel_step() {
  State& s = st();
  if (!s.in_step || !t_owner) return;
  detail::g_hooks.store(false, std::memory_order_relaxed);
  const size_t used = s.used;
  s.in_step = false;  // first: a failing synchronize must not leave the profiler stuck in a step
  s.used = 0;
  t_owner = false;
  t_depth = 0;
  t_open = -1;
  if (s.gpu && used > 0) {
    try {
      s.pool[used - 1]->synchronize();  // the pool's events are reused by the next step
    } catch (const std::exception&) {
      // A sticky CUDA error: cancel_step runs on error paths, the caller reports the error.
    }
  }
}

double end_step() {
  State& s = st();
  FTUNE_CHECK(s.in_step && t_owner, "[profiler] end_step() without begin_step() on this thread");
  FTUNE_CHECK(t_depth == 0, "[profiler] end_step() called inside an op");
  detail::g_hooks.store(false, std::memory_order_relaxed);
  const double t_issue = now_ms();
  int ev_end = -1;
  if (s.gpu) {
    ev_end = record_event();
    s.pool[size_t(ev_end)]->synchronize();
  }
  const double t_end = now_ms();
  s.in_step = false;
  t_owner = false;
  auto elapsed = [&](int a, int b) {
    return double(s.pool[size_t(a)]->elapsed_ms(*s.pool[size_t(b)]));
  };

  const double wall = t_end - s.t_begin, issue = t_issue - s.t_begin;
  const double gpu = s.gpu ? elapsed(s.ev_begin, ev_end) : 0.0;
  s.any_gpu = s.any_gpu || s.gpu;
  for (size_t i = 0; i < s.bounds.size(); ++i) {
    const Boundary& b = s.bounds[i];
    const bool last = i + 1 == s.bounds.size();
    const double p_issue = (last ? t_issue : s.bounds[i + 1].t) - b.t;
    const double p_gpu = s.gpu ? elapsed(b.ev, last ? ev_end : s.bounds[i + 1].ev) : 0.0;
    auto it = s.phases.find(b.phase);
    if (it == s.phases.end()) {
      it = s.phases.emplace(b.phase, PhaseAcc{}).first;
      it->second.first_seen = s.phases.size();
    }
    (s.hooks ? it->second.issue : it->second.clean_issue) += p_issue;
    (s.hooks ? it->second.gpu : it->second.clean_gpu) += p_gpu;
  }
  if (!s.hooks) {
    ++s.clean_steps;
    s.clean_wall += wall;
    s.clean_issue += issue;
    s.clean_gpu += gpu;
    return wall;
  }
  ++s.steps;
  s.wall += wall;
  s.issue += issue;
  s.gpu_total += gpu;
  s.intervals += int64_t(s.iv.size());
  for (const Interval& v : s.iv) {
    auto key = std::make_pair(v.phase, v.label);
    auto it = s.acc.find(key);
    if (it == s.acc.end()) {
      it = s.acc.emplace(key, Acc{}).first;
      it->second.first_seen = s.acc.size();
    }
    Acc& a = it->second;
    ++a.calls;
    a.host_ms += v.host_ms;
    s.att_host += v.host_ms;
    if (s.gpu && v.ev0 >= 0 && v.ev1 >= 0) {
      const double g = elapsed(v.ev0, v.ev1);
      a.gpu_ms += g;
      s.att_gpu += g;
    }
  }
  return wall;
}

void reset() {
  State& s = st();
  FTUNE_CHECK(!s.in_step, "[profiler] reset() inside a profiled step");
  s.acc.clear();
  s.phases.clear();
  s.any_gpu = false;
  s.steps = s.clean_steps = 0;
  s.wall = s.issue = s.gpu_total = s.att_host = s.att_gpu = 0;
  s.intervals = 0;
  s.clean_wall = s.clean_issue = s.clean_gpu = 0;
}

Report report() {
  const State& s = st();
  Report r;
  r.gpu = s.any_gpu;
  r.steps = s.steps;
  r.clean_steps = s.clean_steps;
  const double k = s.steps ? 1.0 / s.steps : 0.0, kc = s.clean_steps ? 1.0 / s.clean_steps : 0.0;
  r.wall_ms = s.wall * k;
  r.issue_ms = s.issue * k;
  r.gpu_ms = s.gpu_total * k;
  r.attributed_host_ms = s.att_host * k;
  r.attributed_gpu_ms = s.att_gpu * k;
  r.intervals = s.steps ? s.intervals / s.steps : 0;
  r.clean_wall_ms = s.clean_wall * kc;
  r.clean_issue_ms = s.clean_issue * kc;
  r.clean_gpu_ms = s.clean_gpu * kc;
  std::vector<std::pair<size_t, PhaseRow>> ph;
  for (const auto& [id, a] : s.phases)
    ph.push_back({a.first_seen, PhaseRow{s.labels.names[id], a.issue * k, a.gpu * k,
                                         a.clean_issue * kc, a.clean_gpu * kc}});
  std::sort(ph.begin(), ph.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& p : ph) r.phases.push_back(std::move(p.second));
  std::vector<std::pair<size_t, Row>> rows;
  for (const auto& [key, a] : s.acc)
    rows.push_back({a.first_seen, Row{s.labels.names[key.first], s.labels.names[key.second],
                                      double(a.calls) * k, a.host_ms * k, a.gpu_ms * k}});
  const bool by_gpu = r.gpu;
  std::stable_sort(rows.begin(), rows.end(), [by_gpu](const auto& a, const auto& b) {
    const double ta = by_gpu ? a.second.gpu_ms : a.second.host_ms;
    const double tb = by_gpu ? b.second.gpu_ms : b.second.host_ms;
    return ta != tb ? ta > tb : a.first < b.first;
  });
  for (auto& p : rows) r.rows.push_back(std::move(p.second));
  return r;
}

namespace {
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}
std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      o += fmt("\\u%04x", unsigned(c));
      continue;
    }
    o += c;
  }
  return o + "\"";
}
}  // namespace

std::string format_table(const Report& r, size_t max_rows) {
  std::string o;
  const char* unit = r.gpu ? "GPU" : "host";
  const double step_t = r.gpu ? r.gpu_ms : r.wall_ms;
  o += fmt(
      "profile: %d step(s) with op hooks, %d without; %lld timed intervals per step; on the %s\n",
      r.steps, r.clean_steps, (long long)r.intervals, r.gpu ? "GPU" : "CPU");
  o += fmt("%-22s %10s %14s %10s\n", "step (ms)", "wall", "host issue", "GPU");
  auto g = [&](double v) { return r.gpu ? fmt("%.3f", v) : std::string("-"); };
  if (r.steps)
    o += fmt("%-22s %10.3f %14.3f %10s\n", "  with op hooks", r.wall_ms, r.issue_ms,
             g(r.gpu_ms).c_str());
  if (r.clean_steps)
    o += fmt("%-22s %10.3f %14.3f %10s\n", "  without op hooks", r.clean_wall_ms, r.clean_issue_ms,
             g(r.clean_gpu_ms).c_str());
  if (r.gpu && r.steps && r.clean_steps) {
    // The op hooks add host time to every op. Where the GPU waits for the host, its span grows
    // by as much; where the host is ahead (or blocked on a full launch queue), it does not.
    const double dh = r.issue_ms - r.clean_issue_ms, dg = r.gpu_ms - r.clean_gpu_ms;
    o +=
        fmt("launch-bound? the op hooks added %.3f ms of host issue time and %.3f ms of GPU span "
            "(ratio %s): ~1 = the GPU waits for the host, ~0 = the host keeps ahead\n",
            dh, dg, dh > 0.05 ? fmt("%.2f", dg / dh).c_str() : "-");
  }
  if (r.steps)
    o += fmt(
        "attributed %s time %.3f ms = %.1f%% of the step's %.3f ms (rest: gaps between ops and "
        "unhooked work)\n",
        unit, r.gpu ? r.attributed_gpu_ms : r.attributed_host_ms,
        step_t > 0 ? 100.0 * (r.gpu ? r.attributed_gpu_ms : r.attributed_host_ms) / step_t : 0.0,
        step_t);
  o += fmt("\n%-12s %12s %10s %18s %14s %12s\n", "phase (ms)", "host issue", "GPU",
           "no hooks: issue", "no hooks: GPU", "dGPU/dissue");
  for (const PhaseRow& p : r.phases) {
    const double dh = p.issue_ms - p.clean_issue_ms, dg = p.gpu_ms - p.clean_gpu_ms;
    const bool ratio = r.gpu && r.steps && r.clean_steps && dh > 0.05;
    o += fmt("%-12s %12.3f %10s %18.3f %14s %12s\n", p.name.c_str(), p.issue_ms,
             g(p.gpu_ms).c_str(), p.clean_issue_ms, g(p.clean_gpu_ms).c_str(),
             ratio ? fmt("%.2f", dg / dh).c_str() : "-");
  }
  o += fmt("\n%-10s %-40s %8s %10s %10s %7s\n", "phase", "label", "calls", "GPU ms", "host ms",
           r.gpu ? "% GPU" : "% wall");
  size_t n = 0;
  Row rest;
  for (const Row& row : r.rows) {
    if (max_rows && n >= max_rows) {
      rest.calls += row.calls;
      rest.gpu_ms += row.gpu_ms;
      rest.host_ms += row.host_ms;
      continue;
    }
    ++n;
    const double t = r.gpu ? row.gpu_ms : row.host_ms;
    o += fmt("%-10s %-40s %8.4g %10s %10.3f %7.2f\n", row.phase.c_str(), row.label.c_str(),
             row.calls, r.gpu ? fmt("%.3f", row.gpu_ms).c_str() : "-", row.host_ms,
             step_t > 0 ? 100.0 * t / step_t : 0.0);
  }
  if (max_rows && r.rows.size() > max_rows) {
    const double t = r.gpu ? rest.gpu_ms : rest.host_ms;
    o += fmt("%-10s %-40s %8.4g %10s %10.3f %7.2f\n", "",
             fmt("(%zu more labels)", r.rows.size() - max_rows).c_str(), rest.calls,
             r.gpu ? fmt("%.3f", rest.gpu_ms).c_str() : "-", rest.host_ms,
             step_t > 0 ? 100.0 * t / step_t : 0.0);
  }
  return o;
}

std::string to_json(const Report& r) {
  std::string o = "{";
  o += fmt("\"gpu\":%s,\"steps\":%d,\"clean_steps\":%d,\"intervals\":%lld,",
           r.gpu ? "true" : "false", r.steps, r.clean_steps, (long long)r.intervals);
  o +=
      fmt("\"wall_ms\":%.6g,\"issue_ms\":%.6g,\"gpu_ms\":%.6g,\"attributed_host_ms\":%.6g,"
          "\"attributed_gpu_ms\":%.6g,",
          r.wall_ms, r.issue_ms, r.gpu_ms, r.attributed_host_ms, r.attributed_gpu_ms);
  o += fmt("\"clean_wall_ms\":%.6g,\"clean_issue_ms\":%.6g,\"clean_gpu_ms\":%.6g,\"phases\":[",
           r.clean_wall_ms, r.clean_issue_ms, r.clean_gpu_ms);
  for (size_t i = 0; i < r.phases.size(); ++i) {
    const PhaseRow& p = r.phases[i];
    if (i) o += ',';
    o += "{\"name\":" + json_str(p.name);
    o += fmt(",\"issue_ms\":%.6g,\"gpu_ms\":%.6g,\"clean_issue_ms\":%.6g,\"clean_gpu_ms\":%.6g}",
             p.issue_ms, p.gpu_ms, p.clean_issue_ms, p.clean_gpu_ms);
  }
  o += "],\"rows\":[";
  for (size_t i = 0; i < r.rows.size(); ++i) {
    const Row& w = r.rows[i];
    if (i) o += ',';
    o += "{\"phase\":" + json_str(w.phase);
    o += ",\"label\":" + json_str(w.label);
    o += fmt(",\"calls\":%.6g,\"gpu_ms\":%.6g,\"host_ms\":%.6g}", w.calls, w.gpu_ms, w.host_ms);
  }
  return o + "]}";
}

}  // namespace ftune::profiler
