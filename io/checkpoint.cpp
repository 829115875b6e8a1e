#include "io/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <sstream>

#include "core/error.h"
#include "io/file_util.h"

#ifdef FTUNE_HAVE_HDF5
#include <hdf5.h>
#endif

namespace ftune {

namespace fs = std::filesystem;

namespace {

constexpr const char* kNoHdf5 =
    "[checkpoint] this build has no HDF5 (configure with FTUNE_HDF5=ON)";

// "step_<digits>.h5" -> the step; anything else (temp files included) -> -1.
int64_t parse_checkpoint_name(const std::string& name) {
  constexpr std::string_view pre = "step_", suf = ".h5";
  if (name.size() <= pre.size() + suf.size() || name.compare(0, pre.size(), pre) != 0 ||
      name.compare(name.size() - suf.size(), suf.size(), suf) != 0)
    return -1;
  const std::string digits = name.substr(pre.size(), name.size() - pre.size() - suf.size());
  if (digits.size() > 18 || !std::all_of(digits.begin(), digits.end(), ::isdigit)) return -1;
  return std::stoll(digits);
}

// "step_<digits>.h5.tmp-<pid>" -> the writer's pid; anything else -> -1.
int64_t parse_temp_name(const std::string& name) {
  const size_t p = name.rfind(".tmp-");
  if (p == std::string::npos || parse_checkpoint_name(name.substr(0, p)) < 0) return -1;
  const std::string digits = name.substr(p + 5);
  if (digits.empty() || digits.size() > 9 || !std::all_of(digits.begin(), digits.end(), ::isdigit))
    return -1;
  return std::stoll(digits);
}

bool process_alive(int64_t pid) {
  if (pid <= 0) return false;
  return ::kill(pid_t(pid), 0) == 0 || errno != ESRCH;  // EPERM: alive, someone else's
}

}  // namespace

std::string checkpoint_file_name(int64_t step) {
  FTUNE_CHECK(step >= 0, "[checkpoint] negative step ", step);
  char buf[48];
  std::snprintf(buf, sizeof(buf), "step_%08" PRId64 ".h5", step);
  return buf;
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  if (!dir_exists(dir)) return out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const int64_t step = parse_checkpoint_name(e.path().filename().string());
    if (step >= 0 && e.is_regular_file(ec)) out.emplace_back(step, e.path().string());
  }
  FTUNE_CHECK(!ec, "[checkpoint] cannot list ", dir, ": ", ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

std::optional<std::string> latest_valid_checkpoint(const std::string& dir) {
  auto all = list_checkpoints(dir);
  if (!all.empty() && !checkpoint_support()) FTUNE_THROW(kNoHdf5);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    std::string why;
    if (is_valid_checkpoint(it->second, &why)) return it->second;
    std::fprintf(stderr, "ftune: warning: skipping checkpoint %s: %s\n", it->second.c_str(),
                 why.c_str());
  }
  return std::nullopt;
}

void prune_checkpoints(const std::string& dir, int64_t keep_last_n) {
  FTUNE_CHECK(keep_last_n >= 0, "[checkpoint] keep_last_n must be >= 0, got ", keep_last_n);
  if (!dir_exists(dir)) return;
  if (keep_last_n > 0) {
    auto all = list_checkpoints(dir);
    for (int64_t i = 0; i + keep_last_n < int64_t(all.size()); ++i) {
      std::error_code ec;
      fs::remove(all[size_t(i)].second, ec);
      FTUNE_CHECK(!ec, "[checkpoint] cannot remove ", all[size_t(i)].second, ": ", ec.message());
    }
  }
  // Temp files of writers that died mid-save (a kill, a crash): nothing will ever rename them.
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const int64_t pid = parse_temp_name(e.path().filename().string());
    if (pid > 0 && pid != ::getpid() && !process_alive(pid)) {
      std::error_code rm;
      fs::remove(e.path(), rm);  // another pruner may have won the race: not an error
    }
  }
}

#ifndef FTUNE_HAVE_HDF5

bool checkpoint_support() { return false; }
bool sharded_checkpoint_support() { return false; }
void save_checkpoint(const std::string&, const Checkpoint&) { FTUNE_THROW(kNoHdf5); }
Checkpoint load_checkpoint(const std::string&) { FTUNE_THROW(kNoHdf5); }
bool is_valid_checkpoint(const std::string&, std::string* why) {
  if (why) *why = kNoHdf5;
  return false;
}
std::string describe_checkpoint(const std::string&, bool) { FTUNE_THROW(kNoHdf5); }
void save_checkpoint_sharded(const std::string&, const Checkpoint&, const std::vector<TensorSlice>&,
                             void*) {
  FTUNE_THROW(kNoHdf5);
}
Tensor load_checkpoint_slice(const std::string&, const std::string&, int64_t, int64_t, int64_t,
                             int64_t) {
  FTUNE_THROW(kNoHdf5);
}
Checkpoint load_checkpoint_sharded(const std::string&, const std::vector<TensorSlice>&) {
  FTUNE_THROW(kNoHdf5);
}
Checkpoint load_checkpoint_sharded(
    const std::string&,
    const std::function<std::optional<TensorSlice>(const std::string&, const Shape&)>&) {
  FTUNE_THROW(kNoHdf5);
}

#else  // FTUNE_HAVE_HDF5

namespace {

// ------------------------------------------------------------------ HDF5 handles and errors

void fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_DIRECTORY : 0) | O_RDONLY | O_CLOEXEC);
  FTUNE_CHECK(fd >= 0, "[checkpoint] cannot open ", path, " to fsync it: ", std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  FTUNE_CHECK(rc == 0, "[checkpoint] fsync of ", path, " failed: ", std::strerror(err));
}

// Owns one hid_t and closes it with the matching H5?close.
class Id {
 public:
  using Closer = herr_t (*)(hid_t);
  Id() = default;
  Id(hid_t id, Closer close) : id_(id), close_(close) {}
  ~Id() { reset(); }
  Id(Id&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  Id& operator=(Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      close_ = o.close_;
      o.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes now and reports whether that worked (a file's close writes its metadata).
  bool close() {
    herr_t rc = id_ >= 0 ? close_(id_) : 0;
    id_ = H5I_INVALID_HID;
    return rc >= 0;
  }
  void reset() {
    if (id_ >= 0) close_(id_);
    id_ = H5I_INVALID_HID;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

// This HDF5 (parallel) is not built thread-safe: one checkpoint operation at a time per process
// (a trainer may save from a background thread while the main thread inspects a file).
std::mutex& hdf5_mutex() {
  static std::mutex m;
  return m;
}

// HDF5 prints its error stack to stderr by default; ftune reports errors itself. Silenced while
// one of our calls runs, restored after (the process may use HDF5 elsewhere).
class QuietHdf5 {
 public:
  QuietHdf5() : lock_(hdf5_mutex()) {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  QuietHdf5(const QuietHdf5&) = delete;
  QuietHdf5& operator=(const QuietHdf5&) = delete;

 private:
  std::lock_guard<std::mutex> lock_;
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// The innermost messages of HDF5's current error stack ("truncated file: eof = ...").
std::string hdf5_error_text() {
  std::vector<std::string> descs;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* e, void* d) -> herr_t {
        if (e->desc && *e->desc) static_cast<std::vector<std::string>*>(d)->push_back(e->desc);
        return 0;
      },
      &descs);
  H5Eclear2(H5E_DEFAULT);
  if (descs.empty()) return "HDF5 error";
  std::string out = descs.back();
  if (descs.size() > 1 && descs[descs.size() - 2] != out)
    out = descs[descs.size() - 2] + ": " + out;
  return out;
}

// Errors name the checkpoint file.
struct Ctx {
  std::string path;
  template <class... A>
  [[noreturn]] void fail(const A&... a) const {
    FTUNE_THROW("[checkpoint] ", path, ": ", a...);
  }
  template <class... A>
  [[noreturn]] void fail_h5(const A&... a) const {
    const std::string h5 = hdf5_error_text();
    FTUNE_THROW("[checkpoint] ", path, ": ", a..., " (HDF5: ", h5, ")");
  }
  template <class... A>
  Id check(hid_t id, Id::Closer close, const A&... what) const {
    if (id < 0) fail_h5(what...);
    return Id(id, close);
  }
  template <class... A>
  void check(herr_t rc, const A&... what) const {
    if (rc < 0) fail_h5(what...);
  }
};

// ------------------------------------------------------------------ types

// The file type of each dtype: little-endian IEEE floats and integers. bf16 has no HDF5 (or numpy)
// type: it is stored as uint16 (its bits) with the dataset attribute dtype="bf16"; b8 as uint8.
Id f16_type() {
  // IEEE binary16, built as h5py builds its float16 type (h5py and numpy read it as float16).
  hid_t t = H5Tcopy(H5T_IEEE_F32LE);
  H5Tset_fields(t, 15, 10, 5, 0, 10);
  H5Tset_size(t, 2);
  H5Tset_ebias(t, 15);
  return Id(t, H5Tclose);
}

// The stored type (file) and the in-memory type of a dtype; the same on a little-endian host.
Id file_type(DType dt, bool memory) {
  auto copy = [](hid_t t) { return Id(H5Tcopy(t), H5Tclose); };
  switch (dt) {
    case DType::f32:
      return copy(memory ? H5T_NATIVE_FLOAT : H5T_IEEE_F32LE);
    case DType::f64:
      return copy(memory ? H5T_NATIVE_DOUBLE : H5T_IEEE_F64LE);
    case DType::f16:
      return f16_type();
    case DType::bf16:
      return copy(memory ? H5T_NATIVE_UINT16 : H5T_STD_U16LE);
    case DType::i32:
      return copy(memory ? H5T_NATIVE_INT32 : H5T_STD_I32LE);
    case DType::i64:
      return copy(memory ? H5T_NATIVE_INT64 : H5T_STD_I64LE);
    case DType::b8:
      return copy(memory ? H5T_NATIVE_UINT8 : H5T_STD_U8LE);
  }
  FTUNE_THROW("[checkpoint] unknown dtype");
}

// Does a dataset's stored type hold what `dt` says (class, size, sign)?
bool type_matches(hid_t t, DType dt) {
  const H5T_class_t cls = H5Tget_class(t);
  const size_t size = H5Tget_size(t);
  if (size != dtype_size(dt)) return false;
  switch (dt) {
    case DType::f32:
    case DType::f64:
    case DType::f16:
      return cls == H5T_FLOAT;
    case DType::bf16:
    case DType::b8:
      return cls == H5T_INTEGER && H5Tget_sign(t) == H5T_SGN_NONE;
    case DType::i32:
    case DType::i64:
      return cls == H5T_INTEGER && H5Tget_sign(t) == H5T_SGN_2;
  }
  return false;
}

std::string type_desc(hid_t t) {
  const H5T_class_t cls = H5Tget_class(t);
  const char* c = cls == H5T_FLOAT     ? "float"
                  : cls == H5T_INTEGER ? (H5Tget_sign(t) == H5T_SGN_NONE ? "uint" : "int")
                  : cls == H5T_STRING  ? "string"
                                       : "other";
  return str_cat(c, 8 * H5Tget_size(t));
}

// The dtype attribute: numpy's names (np.dtype(name) works for all but "bfloat16").
const char* stored_dtype_name(DType dt) {
  switch (dt) {
    case DType::f32:
      return "float32";
    case DType::f64:
      return "float64";
    case DType::bf16:
      return "bfloat16";
    case DType::f16:
      return "float16";
    case DType::i32:
      return "int32";
    case DType::i64:
      return "int64";
    case DType::b8:
      return "bool";
  }
  return "?";
}

Id string_type() {  // variable-length UTF-8: h5py reads attributes as str, datasets as bytes
  Id t(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(t.get(), H5T_VARIABLE);
  H5Tset_cset(t.get(), H5T_CSET_UTF8);
  return t;
}

// ------------------------------------------------------------------ writing

// File access: the POSIX (sec2) driver. Issue 5 (parallel HDF5) swaps in H5Pset_fapl_mpio here;
// everything else in the writer is already per-tensor hyperslab writes into full-shape datasets.
Id make_fapl(const Ctx& c) {
  Id fapl = c.check(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "H5Pcreate");
  c.check(H5Pset_fapl_sec2(fapl.get()), "H5Pset_fapl_sec2");
  return fapl;
}

// Data transfer: default (independent). Parallel: H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE).
Id make_dxpl(const Ctx& c) { return c.check(H5Pcreate(H5P_DATASET_XFER), H5Pclose, "H5Pcreate"); }

void write_attr_i64(const Ctx& c, hid_t obj, const char* name, int64_t v) {
  Id space = c.check(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate");
  Id a = c.check(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                 H5Aclose, "cannot create attribute ", name);
  c.check(H5Awrite(a.get(), H5T_NATIVE_INT64, &v), "cannot write attribute ", name);
}

void write_attr_i64s(const Ctx& c, hid_t obj, const char* name, const std::vector<int64_t>& v) {
  const hsize_t n = v.size();  // a zero-length array for the shape of a scalar
  Id space = c.check(H5Screate_simple(1, &n, nullptr), H5Sclose, "H5Screate_simple");
  Id a = c.check(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                 H5Aclose, "cannot create attribute ", name);
  if (n) c.check(H5Awrite(a.get(), H5T_NATIVE_INT64, v.data()), "cannot write attribute ", name);
}

void write_attr_str(const Ctx& c, hid_t obj, const char* name, const std::string& s) {
  Id t = string_type();
  Id space = c.check(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate");
  Id a = c.check(H5Acreate2(obj, name, t.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
                 "cannot create attribute ", name);
  const char* p = s.c_str();
  c.check(H5Awrite(a.get(), t.get(), &p), "cannot write attribute ", name);
}

void write_string_dataset(const Ctx& c, hid_t loc, const char* name, const std::string& s) {
  Id t = string_type();
  Id space = c.check(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate");
  Id d = c.check(H5Dcreate2(loc, name, t.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                 H5Dclose, "cannot create dataset /", name);
  const char* p = s.c_str();
  c.check(H5Dwrite(d.get(), t.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, &p), "cannot write /", name);
}

// A group whose links remember their creation order, so tensors load in the order they were saved.
Id create_group(const Ctx& c, hid_t loc, const char* name) {
  Id gcpl = c.check(H5Pcreate(H5P_GROUP_CREATE), H5Pclose, "H5Pcreate");
  c.check(H5Pset_link_creation_order(gcpl.get(), H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED),
          "H5Pset_link_creation_order");
  return c.check(H5Gcreate2(loc, name, H5P_DEFAULT, gcpl.get(), H5P_DEFAULT), H5Gclose,
                 "cannot create group /", name);
}

Id make_space(const Ctx& c, const Shape& shape) {
  if (shape.empty()) return c.check(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate");
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  return c.check(H5Screate_simple(int(dims.size()), dims.data(), nullptr), H5Sclose,
                 "H5Screate_simple");
}

// Creates the full-shape dataset of one tensor with its dtype and shape attributes. Contiguous
// layout, no filters: one large sequential write per tensor, and the layout MPI-IO writes best.
Id create_tensor_dataset(const Ctx& c, hid_t group, const std::string& where,
                         const std::string& name, DType dt, const Shape& full_shape) {
  Id ftype = file_type(dt, false);
  Id space = make_space(c, full_shape);
  Id d = c.check(H5Dcreate2(group, name.c_str(), ftype.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT,
                            H5P_DEFAULT),
                 H5Dclose, "cannot create dataset ", where, "/", name);
  write_attr_str(c, d.get(), "dtype", stored_dtype_name(dt));
  write_attr_i64s(c, d.get(), "shape", full_shape);
  return d;
}

// Writes `slice` (a contiguous CPU tensor) into the dataset at `offset` (per-dimension start;
// the whole tensor in a single-process save). Parallel saves call this once per rank with its
// own slice and a collective dxpl.
// Row-major boxes (start, count per dimension) that cover exactly the elements [a, b) of a tensor
// of shape `shape`, in order: at most two partial boxes per dimension and one whole one.
using Box = std::pair<std::vector<int64_t>, std::vector<int64_t>>;
void flat_boxes(const Shape& shape, int64_t a, int64_t b, std::vector<int64_t> prefix,
                std::vector<Box>& out) {
  if (a >= b) return;
  const size_t d = prefix.size();
  if (d == shape.size()) {  // a scalar
    out.push_back({{}, {}});
    return;
  }
  int64_t stride = 1;
  for (size_t k = d + 1; k < shape.size(); ++k) stride *= shape[k];
  int64_t i0 = a / stride;
  const int64_t r0 = a % stride, i1 = b / stride, r1 = b % stride;
  auto sub = [&](int64_t i, int64_t lo, int64_t hi) {
    std::vector<int64_t> p = prefix;
    p.push_back(i);
    flat_boxes(shape, lo, hi, std::move(p), out);
  };
  if (i0 == i1) return sub(i0, r0, r1);
  if (r0 != 0) sub(i0++, r0, stride);
  if (i1 > i0) {
    Box box{prefix, std::vector<int64_t>(d, 1)};
    box.first.push_back(i0);
    box.second.push_back(i1 - i0);
    for (size_t k = d + 1; k < shape.size(); ++k) {
      box.first.push_back(0);
      box.second.push_back(shape[k]);
    }
    out.push_back(std::move(box));
  }
  if (r1 != 0) sub(i1, 0, r1);
}

// Selects in `fspace` (a dataset of `full` shape) what a rank holds of it. Its part has shape
// `part`: along `dim`, `blocks` runs of part[dim] / blocks elements, run k starting at
// k * full[dim] / blocks + offset (blocks 1: one run at offset; dim -1: the whole tensor), and of
// that part it holds the elements [flat_offset, flat_offset + flat_count) in row-major order
// (flat_count -1: all; ZeRO-1 shards optimizer state so). HDF5 walks a union of hyperslabs in the
// file's row-major order, and the map from the part's coordinates to the file's keeps each
// coordinate's order, so the rank's buffer maps onto the selection element for element.
void select_part(const Ctx& c, hid_t fspace, const std::string& what, const Shape& full,
                 const Shape& part, int64_t dim, int64_t offset, int64_t blocks,
                 int64_t flat_offset = 0, int64_t flat_count = -1) {
  if (flat_count < 0) flat_count = shape_numel(part) - flat_offset;
  std::vector<Box> boxes;
  flat_boxes(part, flat_offset, flat_offset + flat_count, {}, boxes);
  if (part.empty()) {  // a scalar
    c.check(H5Sselect_all(fspace), "cannot select ", what);
    return;
  }
  bool first = true;
  auto add = [&](const std::vector<int64_t>& start, const std::vector<int64_t>& count) {
    std::vector<hsize_t> st(start.begin(), start.end()), ct(count.begin(), count.end());
    c.check(H5Sselect_hyperslab(fspace, first ? H5S_SELECT_SET : H5S_SELECT_OR, st.data(), nullptr,
                                ct.data(), nullptr),
            "cannot select the slice of ", what);
    first = false;
  };
  for (const Box& b : boxes) {
    if (dim < 0) {
      add(b.first, b.second);
      continue;
    }
    // Along dim, the box's rows may cross from one run into the next: one hyperslab per run.
    const size_t d = size_t(dim);
    const int64_t run = part[d] / blocks, stride = full[d] / blocks;
    for (int64_t pos = b.first[d], end = pos + b.second[d]; pos < end;) {
      const int64_t k = pos / run, stop = std::min(end, (k + 1) * run);
      std::vector<int64_t> st = b.first, ct = b.second;
      st[d] = k * stride + offset + (pos - k * run);
      ct[d] = stop - pos;
      add(st, ct);
      pos = stop;
    }
  }
  if (first) H5Sselect_none(fspace);
}

// Writes `slice`, this process's part of `dataset` (see select_part; `part`: the shape of the part
// that `slice` is the flat range of, or empty to say `slice` is the whole part), with dxpl.
void write_tensor_slice(const Ctx& c, hid_t dataset, const std::string& what, const Tensor& slice,
                        int64_t dim, int64_t offset, int64_t blocks, hid_t dxpl,
                        const std::optional<Shape>& part = std::nullopt, int64_t flat_offset = 0) {
  Id mtype = file_type(slice.dtype(), true);
  if (slice.dim() == 0) {
    c.check(H5Dwrite(dataset, mtype.get(), H5S_ALL, H5S_ALL, dxpl, slice.raw_data()),
            "cannot write ", what);
    return;
  }
  Id fspace = c.check(H5Dget_space(dataset), H5Sclose, "H5Dget_space");
  Id mspace = make_space(c, slice.shape());
  if (slice.numel() == 0) {
    H5Sselect_none(fspace.get());
    H5Sselect_none(mspace.get());
  } else {
    const int nd = H5Sget_simple_extent_ndims(fspace.get());
    std::vector<hsize_t> dims(size_t(std::max(nd, 0)));
    H5Sget_simple_extent_dims(fspace.get(), dims.data(), nullptr);
    select_part(c, fspace.get(), what, Shape(dims.begin(), dims.end()),
                part ? *part : slice.shape(), dim, offset, blocks, flat_offset,
                part ? slice.numel() : -1);
  }
  c.check(H5Dwrite(dataset, mtype.get(), mspace.get(), fspace.get(), dxpl, slice.raw_data()),
          "cannot write ", what);
}

void check_name(const Ctx& c, const std::string& where, const std::string& name) {
  if (name.empty() || name == "." || name.find('/') != std::string::npos)
    c.fail("tensor name \"", name, "\" in ", where,
           " is not a valid dataset name (empty, \".\" or containing '/')");
}

void write_tensors(const Ctx& c, hid_t file, const char* group, const nn::NamedTensors& tensors,
                   hid_t dxpl, int64_t opt_step = -1) {
  Id g = create_group(c, file, group);
  if (opt_step >= 0) write_attr_i64(c, g.get(), "step", opt_step);
  const std::string where = std::string("/") + group;
  std::vector<std::string> names;
  for (const auto& [name, t] : tensors) {
    check_name(c, where, name);
    names.push_back(name);
    if (!t.defined()) c.fail("tensor ", where, "/", name, " is undefined");
  }
  std::sort(names.begin(), names.end());
  auto dup = std::adjacent_find(names.begin(), names.end());
  if (dup != names.end()) c.fail("tensor name \"", *dup, "\" appears twice in ", where);
  for (const auto& [name, t] : tensors) {
    Tensor host = t.to(Device::cpu()).contiguous();
    Id d = create_tensor_dataset(c, g.get(), where, name, host.dtype(), host.shape());
    write_tensor_slice(c, d.get(), where + "/" + name, host, -1, 0, 1, dxpl);
  }
}

void write_root_attrs(const Ctx& c, hid_t f, const Checkpoint& ck) {
  write_attr_str(c, f, "ftune_format", kCheckpointFormatName);
  write_attr_i64(c, f, "format_version", kCheckpointFormatVersion);
  write_attr_i64(c, f, "step", ck.step);
  write_attr_i64(c, f, "epoch", ck.epoch);
  write_attr_i64(c, f, "adapter_only", ck.adapter_only ? 1 : 0);
}

// The strings, then complete=1, then flush: a file without complete=1 was cut short.
void write_trailer(const Ctx& c, const std::string& tmp, hid_t f, const Checkpoint& ck) {
  write_string_dataset(c, f, "trainer_state", ck.trainer_state.dump());
  write_string_dataset(c, f, "recipe", ck.recipe_yaml);
  write_string_dataset(c, f, "model_config", ck.model_config.dump());
  write_string_dataset(c, f, "adapter_config", ck.adapter_config.dump());
  write_attr_i64(c, f, "complete", 1);
  c.check(H5Fflush(f, H5F_SCOPE_GLOBAL), "cannot flush ", tmp);
}

void write_file(const Ctx& c, const std::string& tmp, const Checkpoint& ck) {
  Id fapl = make_fapl(c);
  Id file = c.check(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose,
                    "cannot create ", tmp);
  Id dxpl = make_dxpl(c);
  const hid_t f = file.get();
  write_root_attrs(c, f, ck);
  write_tensors(c, f, "model", ck.model, dxpl.get());
  write_tensors(c, f, "optimizer", ck.optimizer.tensors, dxpl.get(), ck.optimizer.step);
  write_trailer(c, tmp, f, ck);
  if (!file.close()) c.fail_h5("cannot close ", tmp);
}

// ------------------------------------------------------------------ reading

struct TensorMeta {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
};

bool has_attr(hid_t obj, const char* name) { return H5Aexists(obj, name) > 0; }

int64_t read_attr_i64(const Ctx& c, hid_t obj, const std::string& where, const char* name) {
  if (!has_attr(obj, name)) c.fail("missing attribute ", name, " on ", where);
  Id a = c.check(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose, "cannot open attribute ", name);
  Id t = c.check(H5Aget_type(a.get()), H5Tclose, "H5Aget_type");
  Id s = c.check(H5Aget_space(a.get()), H5Sclose, "H5Aget_space");
  if (H5Tget_class(t.get()) != H5T_INTEGER || H5Sget_simple_extent_npoints(s.get()) != 1)
    c.fail("attribute ", name, " on ", where, " is not an integer");
  int64_t v = 0;
  c.check(H5Aread(a.get(), H5T_NATIVE_INT64, &v), "cannot read attribute ", name);
  return v;
}

std::vector<int64_t> read_attr_i64s(const Ctx& c, hid_t obj, const std::string& where,
                                    const char* name) {
  if (!has_attr(obj, name)) c.fail("missing attribute ", name, " on ", where);
  Id a = c.check(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose, "cannot open attribute ", name);
  Id t = c.check(H5Aget_type(a.get()), H5Tclose, "H5Aget_type");
  Id s = c.check(H5Aget_space(a.get()), H5Sclose, "H5Aget_space");
  if (H5Tget_class(t.get()) != H5T_INTEGER || H5Sget_simple_extent_ndims(s.get()) != 1)
    c.fail("attribute ", name, " on ", where, " is not a list of integers");
  const hssize_t n = H5Sget_simple_extent_npoints(s.get());
  if (n < 0 || n > 64) c.fail("attribute ", name, " on ", where, " has ", n, " entries");
  std::vector<int64_t> v(static_cast<size_t>(n));
  if (n) c.check(H5Aread(a.get(), H5T_NATIVE_INT64, v.data()), "cannot read attribute ", name);
  return v;
}

// A scalar string (variable or fixed length) of an attribute or dataset.
std::string read_string(const Ctx& c, hid_t obj, bool is_attr, const std::string& what) {
  Id t = is_attr ? c.check(H5Aget_type(obj), H5Tclose, "H5Aget_type")
                 : c.check(H5Dget_type(obj), H5Tclose, "H5Dget_type");
  Id s = is_attr ? c.check(H5Aget_space(obj), H5Sclose, "H5Aget_space")
                 : c.check(H5Dget_space(obj), H5Sclose, "H5Dget_space");
  if (H5Tget_class(t.get()) != H5T_STRING || H5Sget_simple_extent_npoints(s.get()) != 1)
    c.fail(what, " is not a string");
  auto read = [&](hid_t mtype, void* buf) {
    return is_attr ? H5Aread(obj, mtype, buf)
                   : H5Dread(obj, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
  };
  if (H5Tis_variable_str(t.get()) > 0) {
    Id m = string_type();
    char* p = nullptr;
    c.check(read(m.get(), &p), "cannot read ", what);
    std::string out = p ? p : "";
    H5free_memory(p);
    return out;
  }
  const size_t n = H5Tget_size(t.get());
  Id m(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(m.get(), n);
  std::string buf(n, '\0');
  c.check(read(m.get(), buf.data()), "cannot read ", what);
  return buf.substr(0, std::strlen(buf.c_str()));
}

std::string read_attr_str(const Ctx& c, hid_t obj, const std::string& where, const char* name) {
  if (!has_attr(obj, name)) c.fail("missing attribute ", name, " on ", where);
  Id a = c.check(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose, "cannot open attribute ", name);
  return read_string(c, a.get(), true, str_cat("attribute ", name, " on ", where));
}

// Names of a group's links in creation order (name order for a group that did not track it).
std::vector<std::string> link_names(const Ctx& c, hid_t g, const std::string& where) {
  H5G_info_t info;
  c.check(H5Gget_info(g, &info), "cannot list ", where);
  H5_index_t index = H5_INDEX_NAME;
  {
    Id gcpl = c.check(H5Gget_create_plist(g), H5Pclose, "H5Gget_create_plist");
    unsigned flags = 0;
    if (H5Pget_link_creation_order(gcpl.get(), &flags) >= 0 && (flags & H5P_CRT_ORDER_INDEXED))
      index = H5_INDEX_CRT_ORDER;
  }
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    ssize_t n = H5Lget_name_by_idx(g, ".", index, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (n < 0) c.fail_h5("cannot list ", where);
    std::string name(size_t(n) + 1, '\0');
    H5Lget_name_by_idx(g, ".", index, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT);
    name.resize(size_t(n));
    names.push_back(std::move(name));
  }
  return names;
}

Id open_dataset(const Ctx& c, hid_t loc, const std::string& name, const std::string& what) {
  if (H5Lexists(loc, name.c_str(), H5P_DEFAULT) <= 0) c.fail("missing ", what);
  Id o = c.check(H5Oopen(loc, name.c_str(), H5P_DEFAULT), H5Oclose, "cannot open ", what);
  if (H5Iget_type(o.get()) != H5I_DATASET) c.fail(what, " is not a dataset");
  return c.check(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), H5Dclose, "cannot open ", what);
}

Id open_group(const Ctx& c, hid_t loc, const char* name) {
  if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) c.fail("missing group /", name);
  Id o = c.check(H5Oopen(loc, name, H5P_DEFAULT), H5Oclose, "cannot open /", name);
  if (H5Iget_type(o.get()) != H5I_GROUP) c.fail("/", name, " is not a group");
  return c.check(H5Gopen2(loc, name, H5P_DEFAULT), H5Gclose, "cannot open group /", name);
}

// Checks a tensor dataset's attributes against the dataset itself.
TensorMeta read_tensor_meta(const Ctx& c, hid_t d, const std::string& what) {
  TensorMeta m;
  const std::string dtype = read_attr_str(c, d, what, "dtype");
  try {
    m.dtype = dtype_from_name(dtype);
  } catch (const Error&) {
    c.fail(what, ": unknown dtype attribute \"", dtype, "\"");
  }
  m.shape = read_attr_i64s(c, d, what, "shape");
  Id t = c.check(H5Dget_type(d), H5Tclose, "H5Dget_type");
  if (!type_matches(t.get(), m.dtype))
    c.fail(what, ": dtype attribute ", dtype, " but the dataset stores ", type_desc(t.get()));
  Id s = c.check(H5Dget_space(d), H5Sclose, "H5Dget_space");
  const int rank = H5Sget_simple_extent_ndims(s.get());
  if (rank < 0) c.fail_h5("cannot read the shape of ", what);
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank) H5Sget_simple_extent_dims(s.get(), dims.data(), nullptr);
  const Shape ds_shape(dims.begin(), dims.end());
  if (ds_shape != m.shape)
    c.fail(what, ": shape attribute ", shape_str(m.shape), " but the dataset is ",
           shape_str(ds_shape));
  // A contiguous dataset must hold all its bytes (a dataset created but never written has none).
  uint64_t elems = 1;
  for (int64_t x : m.shape) {
    if (x < 0 || (x > 0 && elems > (uint64_t(1) << 50) / uint64_t(x)))
      c.fail(what, ": implausible shape ", shape_str(m.shape));
    elems *= uint64_t(x);
  }
  Id dcpl = c.check(H5Dget_create_plist(d), H5Pclose, "H5Dget_create_plist");
  if (H5Pget_layout(dcpl.get()) == H5D_CONTIGUOUS && elems > 0 &&
      H5Dget_storage_size(d) != elems * dtype_size(m.dtype))
    c.fail(what, ": the dataset holds ", H5Dget_storage_size(d), " bytes, its shape needs ",
           elems * dtype_size(m.dtype));
  return m;
}

// An open, validated checkpoint: the header, the strings and every tensor's metadata.
struct OpenCheckpoint {
  Ctx c;
  Id file, model, optimizer;
  int64_t version = 0;
  Checkpoint head;  // everything but the tensors
  std::vector<TensorMeta> model_meta, optim_meta;

  explicit OpenCheckpoint(const std::string& path) : c{path} {
    if (!fs::exists(path)) c.fail("no such file");
    if (!file_exists(path)) c.fail("not a regular file");
#if H5_VERSION_GE(1, 12, 0)
    const htri_t is_h5 = H5Fis_accessible(path.c_str(), H5P_DEFAULT);
#else
    const htri_t is_h5 = H5Fis_hdf5(path.c_str());
#endif
    if (is_h5 == 0) c.fail("not an HDF5 file (no HDF5 signature)");
    if (is_h5 < 0) c.fail_h5("cannot read the file");
    Id fapl = make_fapl(c);
    file = c.check(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose,
                   "cannot open the HDF5 file (truncated or damaged?)");
    const hid_t f = file.get();
    if (!has_attr(f, "ftune_format"))
      c.fail("not an ftune checkpoint (an HDF5 file without the ftune_format attribute)");
    const std::string fmt = read_attr_str(c, f, "/", "ftune_format");
    if (fmt != kCheckpointFormatName)
      c.fail("not an ftune checkpoint (ftune_format is \"", fmt, "\")");
    version = read_attr_i64(c, f, "/", "format_version");
    if (version > kCheckpointFormatVersion)
      c.fail("format_version ", version, " is newer than this ftune reads (",
             kCheckpointFormatVersion, "); use a newer ftune");
    if (version < 1) c.fail("invalid format_version ", version);
    if (!has_attr(f, "complete") || read_attr_i64(c, f, "/", "complete") != 1)
      c.fail("incomplete checkpoint (no complete=1 attribute: its writer stopped early)");
    head.step = read_attr_i64(c, f, "/", "step");
    head.epoch = read_attr_i64(c, f, "/", "epoch");
    head.adapter_only = read_attr_i64(c, f, "/", "adapter_only") != 0;
    model = open_group(c, f, "model");
    optimizer = open_group(c, f, "optimizer");
    head.optimizer.step = read_attr_i64(c, optimizer.get(), "/optimizer", "step");
    head.recipe_yaml = read_text(f, "recipe");
    head.trainer_state = read_json(f, "trainer_state");
    head.model_config = read_json(f, "model_config");
    head.adapter_config = read_json(f, "adapter_config");
    model_meta = read_metas(model.get(), "/model");
    optim_meta = read_metas(optimizer.get(), "/optimizer");
  }

  std::string read_text(hid_t f, const char* name) {
    Id d = open_dataset(c, f, name, str_cat("dataset /", name));
    return read_string(c, d.get(), false, str_cat("/", name));
  }
  nlohmann::json read_json(hid_t f, const char* name) {
    const std::string s = read_text(f, name);
    nlohmann::json j = nlohmann::json::parse(s, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) c.fail("/", name, " is not valid JSON");
    return j;
  }
  std::vector<TensorMeta> read_metas(hid_t g, const std::string& where) {
    std::vector<TensorMeta> out;
    for (const std::string& name : link_names(c, g, where)) {
      const std::string what = where + "/" + name;
      Id d = open_dataset(c, g, name, what);
      TensorMeta m = read_tensor_meta(c, d.get(), what);
      m.name = name;
      out.push_back(std::move(m));
    }
    return out;
  }
  // The elements [s.flat_offset, + s.flat_count) of the part `s` describes (select_part), 1-D.
  Tensor read_tensor_flat(hid_t g, const std::string& where, const TensorMeta& m,
                          const TensorSlice& s) {
    const std::string what = where + "/" + m.name;
    Shape part = m.shape;
    if (s.dim >= 0) {
      if (s.dim >= int64_t(part.size()) || s.blocks < 1 || s.count < 0 ||
          part[size_t(s.dim)] % s.blocks != 0 || s.offset < 0 ||
          s.offset + s.count > part[size_t(s.dim)] / s.blocks)
        c.fail(what, shape_str(m.shape), ": slice [", s.offset, ", ", s.offset + s.count,
               ") of ", s.blocks, " block(s) along dimension ", s.dim, " does not fit");
      part[size_t(s.dim)] = s.count * s.blocks;
    }
    if (s.flat_offset < 0 || s.flat_count < 0 || s.flat_offset + s.flat_count > shape_numel(part))
      c.fail(what, shape_str(m.shape), ": flat range [", s.flat_offset, ", ",
             s.flat_offset + s.flat_count, ") is out of range of the part ", shape_str(part));
    Tensor t = Tensor::empty({s.flat_count}, m.dtype);
    if (t.numel() == 0) return t;
    Id d = open_dataset(c, g, m.name, what);
    Id fspace = c.check(H5Dget_space(d.get()), H5Sclose, "H5Dget_space");
    select_part(c, fspace.get(), what, m.shape, part, s.dim, s.offset, s.blocks, s.flat_offset,
                s.flat_count);
    Id mspace = make_space(c, t.shape());
    Id mtype = file_type(m.dtype, true);
    c.check(H5Dread(d.get(), mtype.get(), mspace.get(), fspace.get(), H5P_DEFAULT, t.raw_data()),
            "cannot read ", what);
    return t;
  }
  // The slice [offset, offset + count) along dim (count -1: to the end) of a tensor.
  // The part [offset, offset + count) of every one of `blocks` blocks along dim (select_part).
  Tensor read_tensor_part(hid_t g, const std::string& where, const TensorMeta& m, int64_t dim,
                          int64_t offset, int64_t count, int64_t blocks = 1) {
    const std::string what = where + "/" + m.name;
    const int64_t nd = int64_t(m.shape.size());
    if (dim < 0 || dim >= nd) c.fail(what, shape_str(m.shape), " has no dimension ", dim);
    if (blocks < 1 || m.shape[size_t(dim)] % blocks != 0)
      c.fail(what, shape_str(m.shape), ": dimension ", dim, " does not split into ", blocks,
             " equal blocks");
    const int64_t full = m.shape[size_t(dim)] / blocks;
    if (count < 0) count = full - offset;
    if (offset < 0 || count < 0 || offset + count > full)
      c.fail(what, shape_str(m.shape), ": slice [", offset, ", ", offset + count,
             ") along dimension ", dim, blocks > 1 ? str_cat(" (of ", full, " per block)") : "",
             " is out of range");
    Shape shape = m.shape;
    shape[size_t(dim)] = count * blocks;
    Tensor t = Tensor::empty(shape, m.dtype);
    if (t.numel() == 0) return t;
    Id d = open_dataset(c, g, m.name, what);
    Id fspace = c.check(H5Dget_space(d.get()), H5Sclose, "H5Dget_space");
    select_part(c, fspace.get(), what, m.shape, shape, dim, offset, blocks);
    Id mspace = make_space(c, shape);
    Id mtype = file_type(m.dtype, true);
    c.check(H5Dread(d.get(), mtype.get(), mspace.get(), fspace.get(), H5P_DEFAULT, t.raw_data()),
            "cannot read ", what);
    return t;
  }
  Tensor read_tensor(hid_t g, const std::string& where, const TensorMeta& m) {
    const std::string what = where + "/" + m.name;
    Id d = open_dataset(c, g, m.name, what);
    Tensor t = Tensor::empty(m.shape, m.dtype);
    if (t.numel() == 0) return t;
    Id mtype = file_type(m.dtype, true);
    c.check(H5Dread(d.get(), mtype.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.raw_data()),
            "cannot read ", what);
    return t;
  }
};

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof(buf), u ? "%.1f %s" : "%.0f %s", b, units[u]);
  return buf;
}

}  // namespace

bool checkpoint_support() { return true; }
bool sharded_checkpoint_support() {
#if defined(FTUNE_HAVE_MPI) && defined(H5_HAVE_PARALLEL)
  return true;
#else
  return false;
#endif
}

void save_checkpoint(const std::string& path, const Checkpoint& ckpt) {
  QuietHdf5 quiet;
  const Ctx c{path};
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  std::error_code ec;
  const std::string dir = path_dirname(path);
  fs::create_directories(dir, ec);
  if (ec) c.fail("cannot create the folder ", dir, ": ", ec.message());
  try {
    write_file(c, tmp, ckpt);
    fsync_path(tmp, false);
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      c.fail("cannot rename ", tmp, " onto it: ", std::strerror(errno));
    fsync_path(dir, true);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
}

Checkpoint load_checkpoint(const std::string& path) {
  QuietHdf5 quiet;
  OpenCheckpoint oc(path);
  Checkpoint ck = std::move(oc.head);
  for (const auto& m : oc.model_meta)
    ck.model.emplace_back(m.name, oc.read_tensor(oc.model.get(), "/model", m));
  for (const auto& m : oc.optim_meta)
    ck.optimizer.tensors.emplace_back(m.name, oc.read_tensor(oc.optimizer.get(), "/optimizer", m));
  return ck;
}

bool is_valid_checkpoint(const std::string& path, std::string* why) {
  try {
    QuietHdf5 quiet;
    OpenCheckpoint oc(path);
    return true;
  } catch (const std::exception& e) {
    if (why) *why = e.what();
    return false;
  }
}

std::string describe_checkpoint(const std::string& path, bool verbose) {
  QuietHdf5 quiet;
  OpenCheckpoint oc(path);
  const Checkpoint& h = oc.head;
  std::ostringstream o;
  auto count = [](const std::vector<TensorMeta>& ms, int64_t& elems, int64_t& bytes) {
    elems = bytes = 0;
    for (const auto& m : ms) {
      elems += shape_numel(m.shape);
      bytes += shape_numel(m.shape) * int64_t(dtype_size(m.dtype));
    }
  };
  int64_t mp = 0, mb = 0, op = 0, ob = 0;
  count(oc.model_meta, mp, mb);
  count(oc.optim_meta, op, ob);
  o << "checkpoint:     " << path << "\n";
  o << "format:         " << kCheckpointFormatName << " version " << oc.version << ", "
    << human_bytes(double(fs::file_size(path))) << "\n";
  o << "step:           " << h.step << "\n";
  o << "epoch:          " << h.epoch << "\n";
  o << "adapter_only:   " << (h.adapter_only ? "true" : "false") << "\n";
  std::string mc;
  if (h.model_config.is_object()) {
    for (const char* k :
         {"model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
          "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size",
          "max_position_embeddings", "n_positions", "torch_dtype"})
      if (h.model_config.contains(k))
        mc += str_cat(mc.empty() ? "" : ", ", k, "=", json_brief(h.model_config[k]));
  }
  o << "model config:   " << (mc.empty() ? json_brief(h.model_config) : mc) << "\n";
  if (!h.adapter_config.is_null()) o << "adapter config: " << json_brief(h.adapter_config) << "\n";
  std::map<std::string, int64_t> by_dtype;
  for (const auto& m : oc.model_meta) by_dtype[dtype_name(m.dtype)] += 1;
  std::string dts;
  for (const auto& [k, v] : by_dtype) dts += str_cat(dts.empty() ? "" : ", ", v, " ", k);
  o << "model tensors:  " << oc.model_meta.size() << (dts.empty() ? "" : " (" + dts + ")") << ", "
    << mp << " parameters, " << human_bytes(double(mb)) << "\n";
  o << "optimizer:      step " << h.optimizer.step << ", " << oc.optim_meta.size() << " tensors, "
    << op << " values, " << human_bytes(double(ob)) << "\n";
  o << "trainer_state:  " << h.trainer_state.dump() << "\n";
  auto list = [&](const char* title, const std::vector<TensorMeta>& ms) {
    o << title << "\n";
    for (const auto& m : ms)
      o << "  " << m.name << "  " << dtype_name(m.dtype) << shape_str(m.shape) << "\n";
  };
  if (verbose) {
    list("model tensors:", oc.model_meta);
    list("optimizer tensors:", oc.optim_meta);
  }
  o << "recipe:\n";
  std::istringstream r(h.recipe_yaml);
  for (std::string line; std::getline(r, line);) o << "  " << line << "\n";
  return o.str();
}

// ------------------------------------------------------------------ sharded (issue 5)

namespace {

// "model/<name>" or "optimizer/<name>" -> (group, name); anything else -> an Error.
std::pair<std::string, std::string> split_tensor_path(const Ctx& c, const std::string& p) {
  const size_t slash = p.find('/');
  const std::string group = p.substr(0, slash == std::string::npos ? 0 : slash);
  if ((group != "model" && group != "optimizer") || slash + 1 >= p.size())
    c.fail("tensor \"", p, "\" is not \"model/<name>\" or \"optimizer/<name>\"");
  return {group, p.substr(slash + 1)};
}

// One tensor of a sharded save as this rank sees it.
struct Part {
  std::string group, name;
  Tensor local;      // this rank's tensor, on the CPU, contiguous
  Shape full_shape;  // the dataset's shape
  int64_t dim = -1;  // -1: replicated
  int64_t offset = 0;
  int64_t blocks = 1;
  std::optional<Shape> flat_part;  // set: `local` is the flat range [flat_offset, ...) of it
  int64_t flat_offset = 0;
  bool write = true;  // this rank writes `local` into the file
};

// Checks this rank's arguments and pairs every local tensor with its slice (or none).
std::vector<Part> plan_parts(const Ctx& c, const Checkpoint& ck,
                             const std::vector<TensorSlice>& slices, int rank) {
  std::map<std::string, const TensorSlice*> by_name;
  for (const auto& s : slices) {
    split_tensor_path(c, s.name);
    if (!by_name.emplace(s.name, &s).second) c.fail("slice of \"", s.name, "\" given twice");
  }
  std::vector<Part> parts;
  auto add = [&](const char* group, const nn::NamedTensors& ts) {
    for (const auto& [name, t] : ts) {
      check_name(c, std::string("/") + group, name);
      if (!t.defined()) c.fail("tensor /", group, "/", name, " is undefined");
      Part p;
      p.group = group;
      p.name = name;
      p.local = t.to(Device::cpu()).contiguous();
      p.full_shape = p.local.shape();
      p.write = rank == 0;
      auto it = by_name.find(std::string(group) + "/" + name);
      if (it != by_name.end()) {
        const TensorSlice& s = *it->second;
        // The rank's part of the full tensor; with a flat range, `local` holds those elements of it.
        const bool flat = s.flat_count >= 0;
        Shape ls = p.local.shape();
        const std::string what = str_cat("/", group, "/", name, " (local ", shape_str(ls),
                                         ", full ", shape_str(s.full_shape), ")");
        if (flat) {
          if (p.local.numel() != s.flat_count)
            c.fail(what, ": flat_count ", s.flat_count, " but the local tensor has ",
                   p.local.numel(), " elements");
          if (s.dim >= 0 && s.count < 0) c.fail(what, ": a flat range of a split part needs count");
          ls = s.full_shape;
          if (s.dim >= 0 && s.dim < int64_t(ls.size())) ls[size_t(s.dim)] = s.count * s.blocks;
          if (s.flat_offset < 0 || s.flat_offset + s.flat_count > shape_numel(ls))
            c.fail(what, ": flat range [", s.flat_offset, ", ", s.flat_offset + s.flat_count,
                   ") is out of range of the part ", shape_str(ls));
          p.flat_part = ls;
          p.flat_offset = s.flat_offset;
        }
        if (s.dim < 0) {  // whole (or a flat range of it), written by the ranks that say so
          if (s.full_shape != ls) c.fail(what, ": not split, but the shapes differ");
          p.full_shape = s.full_shape;
          p.write = s.write;
          by_name.erase(it);
          parts.push_back(std::move(p));
          continue;
        }
        if (s.dim >= int64_t(ls.size()) || s.full_shape.size() != ls.size())
          c.fail(what, ": split dimension ", s.dim, " does not fit");
        for (size_t d = 0; d < ls.size(); ++d)
          if (int64_t(d) != s.dim && ls[d] != s.full_shape[d])
            c.fail(what, ": the shapes differ outside the split dimension ", s.dim);
        const int64_t full = s.full_shape[size_t(s.dim)];
        if (s.blocks < 1 || full % s.blocks != 0 || ls[size_t(s.dim)] % s.blocks != 0)
          c.fail(what, ": dimension ", s.dim, " does not split into ", s.blocks, " equal blocks");
        const int64_t n = ls[size_t(s.dim)] / s.blocks;  // per block
        if (s.count >= 0 && s.count != n)
          c.fail(what, ": count ", s.count, " but the local tensor has ", n,
                 s.blocks > 1 ? " per block" : "");
        if (s.offset < 0 || s.offset + n > full / s.blocks)
          c.fail(what, ": slice [", s.offset, ", ", s.offset + n, ") is out of range",
                 s.blocks > 1 ? str_cat(" (", full / s.blocks, " per block)") : "");
        p.full_shape = s.full_shape;
        p.dim = s.dim;
        p.offset = s.offset;
        p.blocks = s.blocks;
        p.write = s.write;
        by_name.erase(it);
      }
      parts.push_back(std::move(p));
    }
  };
  add("model", ck.model);
  add("optimizer", ck.optimizer.tensors);
  if (!by_name.empty()) c.fail("slice of \"", by_name.begin()->first, "\" names no tensor");
  // Names must be unique per group (the serial save checks the same).
  std::map<std::string, int> seen;
  for (const auto& p : parts)
    if (++seen[p.group + "/" + p.name] > 1) c.fail("tensor /", p.group, "/", p.name, " twice");
  return parts;
}

}  // namespace

void save_checkpoint_sharded(const std::string& path, const Checkpoint& local,
                             const std::vector<TensorSlice>& slices, void* mpi_comm) {
  const Ctx c{path};
  if (!mpi_comm) {
    // One process: the slices must be the whole tensors; then it is an ordinary save.
    plan_parts(c, local, slices, 0);
    for (const auto& s : slices) {
      const auto [group, name] = split_tensor_path(c, s.name);
      const auto& ts = group == "model" ? local.model : local.optimizer.tensors;
      for (const auto& [n, t] : ts)
        if (n == name && t.shape() != s.full_shape)
          c.fail("/", s.name, " is a slice ", shape_str(t.shape()), " of ", shape_str(s.full_shape),
                 ", but this process is the only writer");
    }
    save_checkpoint(path, local);
    return;
  }
#if !defined(FTUNE_HAVE_MPI) || !defined(H5_HAVE_PARALLEL)
  c.fail(
      "this build's HDF5 has no MPI-IO (parallel HDF5): a sharded save needs one "
      "(Debian: libhdf5-openmpi-dev)");
#else
  MPI_Comm comm = *static_cast<MPI_Comm*>(mpi_comm);
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);

  // Every rank learns whether any rank failed, so all throw together instead of some waiting in a
  // collective for the others.
  auto agree = [&](std::exception_ptr& my_error) {
    int mine = my_error ? 1 : 0, any = 0;
    MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_MAX, comm);
    if (my_error) std::rethrow_exception(my_error);
    if (any) c.fail("another rank of the sharded save failed (see its error)");
  };

  std::vector<Part> parts;
  std::exception_ptr err;
  try {
    parts = plan_parts(c, local, slices, rank);
  } catch (...) {
    err = std::current_exception();
  }
  agree(err);

  // The same metadata on every rank: names, order, dtypes, full shapes, steps (FNV-1a hash; max of
  // h and of ~h over ranks equal h and ~h only when every rank has h).
  std::string meta = str_cat(local.step, ";", local.optimizer.step, ";");
  for (const auto& p : parts)
    meta += str_cat(p.group, "/", p.name, ":", dtype_name(p.local.dtype()), shape_str(p.full_shape),
                    ";");
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : meta) h = (h ^ ch) * 1099511628211ull;
  uint64_t hs[2] = {h, ~h}, mx[2] = {0, 0};
  MPI_Allreduce(hs, mx, 2, MPI_UINT64_T, MPI_MAX, comm);
  if (mx[0] != h || mx[1] != ~h)
    c.fail(
        "the ranks disagree on the tensors of the checkpoint (names, order, dtypes, full "
        "shapes) or on the step; this rank has ",
        meta.size() > 300 ? meta.substr(0, 300) + "..." : meta);

  // The written slices must cover every tensor: elements written, summed over ranks.
  std::vector<int64_t> written(parts.size()), total(parts.size());
  for (size_t i = 0; i < parts.size(); ++i)
    written[i] = parts[i].write ? parts[i].local.numel() : 0;
  MPI_Allreduce(written.data(), total.data(), int(parts.size()), MPI_INT64_T, MPI_SUM, comm);
  for (size_t i = 0; i < parts.size(); ++i)
    if (total[i] != shape_numel(parts[i].full_shape))
      c.fail("/", parts[i].group, "/", parts[i].name, shape_str(parts[i].full_shape), ": the ranks",
             " write ", total[i], " elements, the tensor has ", shape_numel(parts[i].full_shape),
             " (slices missing or written twice: set TensorSlice::write on one replica only)");

  // Rank 0 names the temp file and makes the folder before anyone opens it.
  int64_t pid = 0;
  const std::string dir = path_dirname(path);
  if (rank == 0) {
    pid = ::getpid();
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) {
      try {
        c.fail("cannot create the folder ", dir, ": ", ec.message());
      } catch (...) {
        err = std::current_exception();
      }
    }
  }
  agree(err);
  MPI_Bcast(&pid, 1, MPI_INT64_T, 0, comm);
  const std::string tmp = path + ".tmp-" + std::to_string(pid);

  // Phase 1, collective (MPI-IO): groups, datasets with their attributes, each rank's slices.
  // Variable-length strings cannot be written as parallel raw data, so they wait for phase 2.
  try {
    QuietHdf5 quiet;
    Id fapl = c.check(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "H5Pcreate");
    c.check(H5Pset_fapl_mpio(fapl.get(), comm, MPI_INFO_NULL), "H5Pset_fapl_mpio");
    Id file = c.check(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose,
                      "cannot create ", tmp);
    Id dxpl = c.check(H5Pcreate(H5P_DATASET_XFER), H5Pclose, "H5Pcreate");
    c.check(H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE), "H5Pset_dxpl_mpio");
    for (const char* group : {"model", "optimizer"}) {
      Id g = create_group(c, file.get(), group);
      if (std::string(group) == "optimizer")
        write_attr_i64(c, g.get(), "step", local.optimizer.step);
      const std::string where = std::string("/") + group;
      for (const auto& p : parts) {
        if (p.group != group) continue;
        const std::string what = where + "/" + p.name;
        Id d = create_tensor_dataset(c, g.get(), where, p.name, p.local.dtype(), p.full_shape);
        if (p.write && p.local.numel() > 0) {
          write_tensor_slice(c, d.get(), what, p.local, p.dim, p.offset, p.blocks, dxpl.get(),
                             p.flat_part, p.flat_offset);
        } else {  // a collective write: this rank takes part with an empty selection
          Id fspace = c.check(H5Dget_space(d.get()), H5Sclose, "H5Dget_space");
          Id mspace = c.check(H5Scopy(fspace.get()), H5Sclose, "H5Scopy");
          H5Sselect_none(fspace.get());
          H5Sselect_none(mspace.get());
          Id mtype = file_type(p.local.dtype(), true);
          char dummy[16] = {};
          c.check(H5Dwrite(d.get(), mtype.get(), mspace.get(), fspace.get(), dxpl.get(), dummy),
                  "cannot write ", what);
        }
      }
    }
    if (!file.close()) c.fail_h5("cannot close ", tmp);
  } catch (...) {
    if (rank == 0) ::unlink(tmp.c_str());
    throw;  // the other ranks may be inside a collective: main() takes the job down
  }
  MPI_Barrier(comm);  // every rank's data is in the file

  // Phase 2, rank 0 alone (POSIX driver): the header, the strings, complete=1, fsync, rename.
  if (rank == 0) {
    try {
      {
        QuietHdf5 quiet;
        Id fapl = make_fapl(c);
        Id file = c.check(H5Fopen(tmp.c_str(), H5F_ACC_RDWR, fapl.get()), H5Fclose,
                          "cannot reopen ", tmp);
        write_root_attrs(c, file.get(), local);
        write_trailer(c, tmp, file.get(), local);
        if (!file.close()) c.fail_h5("cannot close ", tmp);
      }
      fsync_path(tmp, false);
      if (::rename(tmp.c_str(), path.c_str()) != 0)
        c.fail("cannot rename ", tmp, " onto it: ", std::strerror(errno));
      fsync_path(dir, true);
    } catch (...) {
      ::unlink(tmp.c_str());
      err = std::current_exception();
    }
  }
  agree(err);  // the second barrier: after it the final file is in place for every rank
#endif
}

Tensor load_checkpoint_slice(const std::string& path, const std::string& name, int64_t dim,
                             int64_t offset, int64_t count, int64_t blocks) {
  QuietHdf5 quiet;
  OpenCheckpoint oc(path);
  const auto [group, tname] = split_tensor_path(oc.c, name);
  const bool model = group == "model";
  for (const auto& m : model ? oc.model_meta : oc.optim_meta)
    if (m.name == tname)
      return oc.read_tensor_part(model ? oc.model.get() : oc.optimizer.get(), "/" + group, m, dim,
                                 offset, count, blocks);
  oc.c.fail("no tensor /", name);
}

Checkpoint load_checkpoint_sharded(
    const std::string& path,
    const std::function<std::optional<TensorSlice>(const std::string&, const Shape&)>& slice_of) {
  QuietHdf5 quiet;
  OpenCheckpoint oc(path);
  Checkpoint ck = std::move(oc.head);
  auto read = [&](const char* group, hid_t g, const std::vector<TensorMeta>& metas,
                  nn::NamedTensors& out) {
    const std::string where = std::string("/") + group;
    for (const auto& m : metas) {
      const std::optional<TensorSlice> s = slice_of(std::string(group) + "/" + m.name, m.shape);
      if (s && s->flat_count >= 0)
        out.emplace_back(m.name, oc.read_tensor_flat(g, where, m, *s));
      else
        out.emplace_back(m.name, !s || s->dim < 0 ? oc.read_tensor(g, where, m)
                                                  : oc.read_tensor_part(g, where, m, s->dim,
                                                                        s->offset, s->count,
                                                                        s->blocks));
    }
  };
  read("model", oc.model.get(), oc.model_meta, ck.model);
  read("optimizer", oc.optimizer.get(), oc.optim_meta, ck.optimizer.tensors);
  return ck;
}

Checkpoint load_checkpoint_sharded(const std::string& path,
                                   const std::vector<TensorSlice>& slices) {
  const Ctx c{path};
  std::map<std::string, const TensorSlice*> by_name;
  for (const auto& s : slices) {
    split_tensor_path(c, s.name);
    by_name[s.name] = &s;
  }
  Checkpoint ck = load_checkpoint_sharded(
      path, [&](const std::string& name, const Shape& full) -> std::optional<TensorSlice> {
        auto it = by_name.find(name);
        if (it == by_name.end()) return std::nullopt;
        const TensorSlice s = *it->second;
        by_name.erase(it);
        if (!s.full_shape.empty() && s.full_shape != full)
          c.fail("/", name, " is ", shape_str(full), " in the file, the model expects ",
                 shape_str(s.full_shape));
        return s;
      });
  if (!by_name.empty()) c.fail("no tensor /", by_name.begin()->first);
  return ck;
}

#endif  // FTUNE_HAVE_HDF5

}  // namespace ftune
