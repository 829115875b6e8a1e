#include "io/safetensors.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <regex>
#include <tuple>
#include <unordered_set>

#include "io/file_util.h"

namespace ftune {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swaps");

using json = nlohmann::json;

// ---------------------------------------------------------------- dtypes

namespace {

struct StDTypeInfo {
  StDType t;
  const char* name;
  int bits;
};

constexpr StDTypeInfo kStDTypes[] = {
    {StDType::BOOL, "BOOL", 8},
    {StDType::F4, "F4", 4},
    {StDType::F6_E2M3, "F6_E2M3", 6},
    {StDType::F6_E3M2, "F6_E3M2", 6},
    {StDType::U8, "U8", 8},
    {StDType::I8, "I8", 8},
    {StDType::F8_E5M2, "F8_E5M2", 8},
    {StDType::F8_E4M3, "F8_E4M3", 8},
    {StDType::F8_E8M0, "F8_E8M0", 8},
    {StDType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {StDType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {StDType::I16, "I16", 16},
    {StDType::U16, "U16", 16},
    {StDType::F16, "F16", 16},
    {StDType::BF16, "BF16", 16},
    {StDType::I32, "I32", 32},
    {StDType::U32, "U32", 32},
    {StDType::F32, "F32", 32},
    {StDType::C64, "C64", 64},
    {StDType::F64, "F64", 64},
    {StDType::I64, "I64", 64},
    {StDType::U64, "U64", 64},
};

}  // namespace

const char* st_dtype_name(StDType t) { return kStDTypes[size_t(t)].name; }
int st_dtype_bits(StDType t) { return kStDTypes[size_t(t)].bits; }

std::optional<StDType> st_dtype_from_name(std::string_view s) {
  for (const auto& d : kStDTypes)
    if (s == d.name) return d.t;
  return std::nullopt;
}

std::optional<DType> st_to_dtype(StDType t) {
  switch (t) {
    case StDType::F32:
      return DType::f32;
    case StDType::F64:
      return DType::f64;
    case StDType::F16:
      return DType::f16;
    case StDType::BF16:
      return DType::bf16;
    case StDType::I32:
      return DType::i32;
    case StDType::I64:
      return DType::i64;
    case StDType::BOOL:
      return DType::b8;
    default:
      return std::nullopt;
  }
}

StDType st_from_dtype(DType t) {
  switch (t) {
    case DType::f32:
      return StDType::F32;
    case DType::f64:
      return StDType::F64;
    case DType::f16:
      return StDType::F16;
    case DType::bf16:
      return StDType::BF16;
    case DType::i32:
      return StDType::I32;
    case DType::i64:
      return StDType::I64;
    case DType::b8:
      return StDType::BOOL;
  }
  FTUNE_THROW("[safetensors] bad dtype");
}

// ---------------------------------------------------------------- header parsing

namespace {

const char* json_type(const json& v) { return v.type_name(); }

constexpr int kMaxJsonDepth = 128;

// JSON parse that refuses duplicate keys at any depth (the spec disallows them; a JSON parser
// would silently keep one of two tensors of the same name).
json parse_json_unique_keys(const char* begin, const char* end, const std::string& what) {
  std::vector<std::unordered_set<std::string>> keys;  // one set per open object
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) -> bool {
    // serde_json (the reference) stops at 128 levels; so do we, which also keeps every later
    // recursive walk of the value (copies, dumps) shallow.
    if (depth > kMaxJsonDepth)
      FTUNE_THROW("[safetensors] ", what, ": header nests deeper than ", kMaxJsonDepth, " levels");
    switch (ev) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second)
          FTUNE_THROW("[safetensors] ", what, ": header has the key \"", parsed.get<std::string>(),
                      "\" twice (duplicate keys are not allowed)");
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(begin, end, cb, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    FTUNE_THROW("[safetensors] ", what, ": header is not valid JSON: ", e.what());
  }
}

// A non-negative JSON integer that fits int64 (shapes) or uint64 (offsets); nullopt otherwise.
std::optional<uint64_t> as_uint(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return uint64_t(v.get<int64_t>());
  return std::nullopt;
}

SafetensorsEntry parse_entry(const std::string& name, const json& v, uint64_t data_size,
                             const std::string& what) {
  const std::string where = str_cat("[safetensors] ", what, ": tensor '", name, "'");
  FTUNE_CHECK(v.is_object(), where, ": expected an object {dtype, shape, data_offsets}, got ",
              json_type(v));
  SafetensorsEntry e;
  e.name = name;
  // Other keys are ignored, as the reference does.
  auto dt = v.find("dtype");
  FTUNE_CHECK(dt != v.end(), where, ": missing \"dtype\"");
  FTUNE_CHECK(dt->is_string(), where, ": \"dtype\" must be a string, got ", json_type(*dt));
  auto st = st_dtype_from_name(dt->get_ref<const std::string&>());
  FTUNE_CHECK(st.has_value(), where, ": unknown dtype '", dt->get_ref<const std::string&>(), "'");
  e.dtype = *st;

  auto sh = v.find("shape");
  FTUNE_CHECK(sh != v.end(), where, ": missing \"shape\"");
  FTUNE_CHECK(sh->is_array(), where, ": \"shape\" must be a list, got ", json_type(*sh));
  uint64_t numel = 1;
  bool overflow = false;
  for (const json& d : *sh) {
    if (d.is_number_integer() && !d.is_number_unsigned() && d.get<int64_t>() < 0)
      FTUNE_THROW(where, ": negative dimension ", d.get<int64_t>(), " in shape ", json_brief(*sh));
    auto u = as_uint(d);
    FTUNE_CHECK(u.has_value(), where, ": shape ", json_brief(*sh),
                " must hold non-negative integers");
    FTUNE_CHECK(*u <= uint64_t(INT64_MAX), where, ": dimension ", *u, " is too large");
    e.shape.push_back(int64_t(*u));
    overflow = overflow || __builtin_mul_overflow(numel, *u, &numel);
  }
  uint64_t nbits = 0;
  overflow = overflow || numel > uint64_t(INT64_MAX) ||
             __builtin_mul_overflow(numel, uint64_t(st_dtype_bits(e.dtype)), &nbits);
  FTUNE_CHECK(!overflow, where, ": shape ", shape_str(e.shape), " of ", st_dtype_name(e.dtype),
              " overflows (numel * itemsize does not fit 64 bits)");
  FTUNE_CHECK(nbits % 8 == 0, where, ": ", numel, " elements of ", st_dtype_name(e.dtype),
              " are not a whole number of bytes");
  uint64_t nbytes = nbits / 8;

  auto off = v.find("data_offsets");
  FTUNE_CHECK(off != v.end(), where, ": missing \"data_offsets\"");
  FTUNE_CHECK(off->is_array() && off->size() == 2, where,
              ": \"data_offsets\" must be [begin, end], got ", json_brief(*off));
  auto b = as_uint((*off)[0]);
  auto en = as_uint((*off)[1]);
  FTUNE_CHECK(b && en, where, ": \"data_offsets\" must be two non-negative integers, got ",
              json_brief(*off));
  e.begin = *b;
  e.end = *en;
  FTUNE_CHECK(e.begin <= e.end, where, ": data_offsets [", e.begin, ", ", e.end,
              "] has begin > end");
  FTUNE_CHECK(e.end <= data_size, where, ": data_offsets [", e.begin, ", ", e.end,
              "] end past the data buffer (", data_size, " bytes)");
  FTUNE_CHECK(e.end - e.begin == nbytes, where, ": data_offsets [", e.begin, ", ", e.end, "] hold ",
              e.end - e.begin, " bytes but ", st_dtype_name(e.dtype), shape_str(e.shape), " needs ",
              nbytes, " bytes (byte size != numel * itemsize)");
  return e;
}

}  // namespace

const SafetensorsEntry* SafetensorsHeader::find(const std::string& name) const {
  auto it = index.find(name);
  return it == index.end() ? nullptr : &entries[it->second];
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size,
                                           const std::string& what) {
  const std::string where = str_cat("[safetensors] ", what);
  FTUNE_CHECK(size >= 8, where, ": file is ", size,
              " bytes, shorter than the 8-byte header length (not a safetensors file?)");
  uint64_t n = 0;
  std::memcpy(&n, data, 8);  // little-endian (static_assert above)
  FTUNE_CHECK(n <= kSafetensorsMaxHeader, where, ": header length ", n,
              " is absurdly large (limit ", kSafetensorsMaxHeader,
              " bytes; not a safetensors file?)");
  FTUNE_CHECK(n <= size - 8, where, ": header length ", n, " runs past the end of the file (", size,
              " bytes; truncated file?)");
  FTUNE_CHECK(n > 0, where, ": header is empty");
  const char* hb = reinterpret_cast<const char*>(data + 8);
  FTUNE_CHECK(hb[0] == '{', where, ": header does not start with '{' (not a JSON object)");
  // nlohmann stops at a NUL as at end of input; JSON never holds a raw NUL, so refuse it here.
  if (const void* z = std::memchr(hb, 0, n))
    FTUNE_THROW(where, ": header is not valid JSON: NUL byte at header offset ",
                static_cast<const char*>(z) - hb);
  json root = parse_json_unique_keys(hb, hb + n, what);
  FTUNE_CHECK(root.is_object(), where, ": header is not a JSON object");

  SafetensorsHeader h;
  h.header_len = n;
  const uint64_t data_size = size - 8 - n;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it->is_null()) continue;  // the reference reads null as "no metadata"
      FTUNE_CHECK(it->is_object(), where, ": \"__metadata__\" must be an object of strings, got ",
                  json_type(*it));
      for (auto m = it->begin(); m != it->end(); ++m) {
        FTUNE_CHECK(m->is_string(), where, ": \"__metadata__\" value for \"", m.key(),
                    "\" must be a string, got ", json_type(*m));
        h.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    h.entries.push_back(parse_entry(it.key(), *it, data_size, what));
  }

  // The byte ranges must tile [0, data_size): sorted by offset, each starts where the last ended.
  std::sort(h.entries.begin(), h.entries.end(), [](const auto& a, const auto& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t expect = 0;
  for (size_t i = 0; i < h.entries.size(); ++i) {
    const SafetensorsEntry& e = h.entries[i];
    FTUNE_CHECK(e.begin >= expect, where, ": tensor '", e.name, "' [", e.begin, ", ", e.end,
                ") overlaps tensor '", h.entries[i - 1].name, "' [", h.entries[i - 1].begin, ", ",
                h.entries[i - 1].end, ")");
    FTUNE_CHECK(e.begin == expect, where, ": bytes [", expect, ", ", e.begin,
                ") of the data buffer belong to no tensor (holes are not allowed)");
    expect = e.end;
    h.index.emplace(e.name, i);
  }
  FTUNE_CHECK(expect == data_size, where, ": the last ", data_size - expect,
              " bytes of the file belong to no tensor (data buffer is ", data_size,
              " bytes, tensors end at ", expect, ")");
  return h;
}

Tensor safetensors_entry_to_tensor(const SafetensorsEntry& e, const uint8_t* data_buffer,
                                   const std::string& what) {
  auto dt = st_to_dtype(e.dtype);
  FTUNE_CHECK(dt.has_value(), "[safetensors] ", what, ": tensor '", e.name, "' has dtype ",
              st_dtype_name(e.dtype),
              ", which ftune has no type for (it reads F32, F64, F16, BF16, I32, I64 and BOOL)");
  Tensor t = Tensor::empty(e.shape, *dt);
  if (e.nbytes() == 0) return t;
  std::memcpy(t.raw_data(), data_buffer + e.begin, e.nbytes());
  if (*dt == DType::b8) {
    // Any nonzero byte is true; a C++ bool must hold exactly 0 or 1.
    auto* p = static_cast<uint8_t*>(t.raw_data());
    for (uint64_t i = 0; i < e.nbytes(); ++i) p[i] = p[i] != 0;
  }
  return t;
}

Tensor safetensors_entry_range_to_tensor(const SafetensorsEntry& e, const uint8_t* data_buffer,
                                         int dim, int64_t begin, int64_t end,
                                         const std::string& what) {
  auto dt = st_to_dtype(e.dtype);
  FTUNE_CHECK(dt.has_value(), "[safetensors] ", what, ": tensor '", e.name, "' has dtype ",
              st_dtype_name(e.dtype),
              ", which ftune has no type for (it reads F32, F64, F16, BF16, I32, I64 and BOOL)");
  const int nd = int(e.shape.size());
  FTUNE_CHECK(dim >= 0 && dim < nd && begin >= 0 && begin <= end && end <= e.shape[size_t(dim)],
              "[safetensors] ", what, ": range [", begin, ", ", end, ") of dim ", dim,
              " is outside tensor '", e.name, "' of shape ", shape_str(e.shape));
  int64_t outer = 1, inner = int64_t(dtype_size(*dt));
  for (int d = 0; d < dim; ++d) outer *= e.shape[size_t(d)];
  for (int d = dim + 1; d < nd; ++d) inner *= e.shape[size_t(d)];
  Shape shape = e.shape;
  shape[size_t(dim)] = end - begin;
  Tensor t = Tensor::empty(shape, *dt);
  const int64_t run = (end - begin) * inner, stride = e.shape[size_t(dim)] * inner;
  auto* out = static_cast<uint8_t*>(t.raw_data());
  if (run > 0)
    for (int64_t o = 0; o < outer; ++o)
      std::memcpy(out + o * run, data_buffer + e.begin + uint64_t(o * stride + begin * inner),
                  size_t(run));
  if (*dt == DType::b8)
    for (int64_t i = 0; i < outer * run; ++i) out[i] = out[i] != 0;
  return t;
}

// ---------------------------------------------------------------- MappedFile

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  FTUNE_CHECK(fd >= 0, "[io] cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  int stat_rc = ::fstat(fd, &st);
  if (stat_rc != 0 || !S_ISREG(st.st_mode)) {
    int err = stat_rc != 0 ? errno : 0;
    bool is_dir = S_ISDIR(st.st_mode);
    ::close(fd);
    FTUNE_THROW("[io] cannot map ", path, ": ", is_dir ? "is a directory" : "not a regular file",
                err ? str_cat(" (", std::strerror(err), ")") : std::string());
  }
  size_ = size_t(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      FTUNE_THROW("[io] cannot mmap ", path, " (", size_, " bytes): ", std::strerror(err));
    }
    addr_ = p;
  }
  ::close(fd);  // the mapping keeps the file referenced
}

MappedFile::~MappedFile() { release(); }

void MappedFile::release() {
  if (addr_) ::munmap(addr_, size_);
  addr_ = nullptr;
  size_ = 0;
}

MappedFile::MappedFile(MappedFile&& o) noexcept
    : path_(std::move(o.path_)), addr_(o.addr_), size_(o.size_) {
  o.addr_ = nullptr;
  o.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    addr_ = o.addr_;
    size_ = o.size_;
    o.addr_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

// ---------------------------------------------------------------- SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path)
    : path_(path), map_(std::make_shared<const MappedFile>(path)) {
  header_ = parse_safetensors_header(map_->data(), map_->size(), path_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(header_.entries.size());
  for (const auto& e : header_.entries) out.push_back(e.name);
  return out;
}

const SafetensorsEntry& SafetensorsFile::info(const std::string& name) const {
  const SafetensorsEntry* e = header_.find(name);
  if (!e) {
    std::string some;
    for (size_t i = 0; i < header_.entries.size() && i < 5; ++i)
      some += str_cat(i ? ", " : "", "'", header_.entries[i].name, "'");
    FTUNE_THROW("[safetensors] ", path_, ": no tensor named '", name, "' (the file has ",
                header_.entries.size(), " tensors", some.empty() ? "" : ": ", some,
                header_.entries.size() > 5 ? ", ..." : "", ")");
  }
  return *e;
}

Tensor SafetensorsFile::get(const std::string& name) const {
  return safetensors_entry_to_tensor(info(name), map_->data() + header_.data_start(), path_);
}

Tensor SafetensorsFile::get_range(const std::string& name, int dim, int64_t begin,
                                  int64_t end) const {
  return safetensors_entry_range_to_tensor(info(name), map_->data() + header_.data_start(), dim,
                                           begin, end, path_);
}

// ---------------------------------------------------------------- SafetensorsModel

namespace {

// Shard names come from a file we did not write: keep them inside the model folder.
bool safe_relative_path(const std::string& p) {
  if (p.empty() || p.front() == '/') return false;
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find('/', start);
    if (end == std::string::npos) end = p.size();
    std::string part = p.substr(start, end - start);
    if (part == ".." || part.empty()) return false;
    start = end + 1;
  }
  return p.find('\0') == std::string::npos;
}

}  // namespace

SafetensorsModel SafetensorsModel::open_folder(const std::string& dir) {
  FTUNE_CHECK(dir_exists(dir), "[safetensors] model folder ", dir, " does not exist");
  std::string index = path_join(dir, "model.safetensors.index.json");
  if (file_exists(index)) return open_index(index);
  std::string single = path_join(dir, "model.safetensors");
  if (file_exists(single)) return open_file(single);
  FTUNE_THROW("[safetensors] ", dir,
              ": no model.safetensors or model.safetensors.index.json in this folder");
}

SafetensorsModel SafetensorsModel::open_file(const std::string& path) {
  SafetensorsModel m;
  m.source_ = path;
  auto s = std::make_unique<Shard>();
  s->path = path;
  s->file = std::make_unique<SafetensorsFile>(path);
  std::call_once(s->once, [] {});  // already open
  for (const auto& e : s->file->entries()) m.where_.emplace(e.name, 0);
  m.shards_.push_back(std::move(s));
  return m;
}

SafetensorsModel SafetensorsModel::open_index(const std::string& index_path) {
  SafetensorsModel m;
  m.source_ = index_path;
  std::string text = read_text_file(index_path, "safetensors");
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    FTUNE_THROW("[safetensors] ", index_path, ": not valid JSON: ", e.what());
  }
  FTUNE_CHECK(j.is_object(), "[safetensors] ", index_path, ": expected a JSON object");
  auto wm = j.find("weight_map");
  FTUNE_CHECK(wm != j.end() && wm->is_object(), "[safetensors] ", index_path,
              ": missing the \"weight_map\" object {tensor: shard file}");
  auto md = j.find("metadata");
  if (md != j.end() && md->is_object()) {
    for (auto it = md->begin(); it != md->end(); ++it)
      m.index_metadata_[it.key()] = it->is_string() ? it->get<std::string>() : json_brief(*it);
  }

  const std::string dir = path_dirname(index_path);
  std::map<std::string, size_t> shard_ids;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    FTUNE_CHECK(it->is_string(), "[safetensors] ", index_path, ": weight_map[\"", it.key(),
                "\"] must be a file name, got ", it->type_name());
    const std::string& f = it->get_ref<const std::string&>();
    FTUNE_CHECK(safe_relative_path(f), "[safetensors] ", index_path, ": weight_map[\"", it.key(),
                "\"] = \"", f, "\": shard files must be relative paths inside the model folder");
    auto [sid, fresh] = shard_ids.emplace(f, m.shards_.size());
    if (fresh) {
      auto s = std::make_unique<Shard>();
      s->path = path_join(dir, f);
      FTUNE_CHECK(file_exists(s->path), "[safetensors] ", index_path, ": shard ", f, " (", s->path,
                  ", holding '", it.key(), "') does not exist");
      m.shards_.push_back(std::move(s));
    }
    m.where_.emplace(it.key(), sid->second);
  }
  return m;
}

std::vector<std::string> SafetensorsModel::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [n, s] : where_) out.push_back(n);
  std::sort(out.begin(), out.end());
  return out;
}

const SafetensorsFile& SafetensorsModel::shard(size_t i) const {
  Shard& s = *shards_[i];
  // Throws propagate and leave the flag unset, so a later call tries again.
  std::call_once(s.once, [&] { s.file = std::make_unique<SafetensorsFile>(s.path); });
  return *s.file;
}

const SafetensorsEntry& SafetensorsModel::entry_in_shard(const std::string& name,
                                                         size_t& shard_i) const {
  auto it = where_.find(name);
  FTUNE_CHECK(it != where_.end(), "[safetensors] ", source_, ": no tensor named '", name, "' (",
              where_.size(), " tensors)");
  shard_i = it->second;
  const SafetensorsFile& f = shard(shard_i);
  const SafetensorsEntry* e = f.header().find(name);
  FTUNE_CHECK(e != nullptr, "[safetensors] ", source_, ": the index puts tensor '", name, "' in ",
              f.path(), ", which has no such tensor");
  return *e;
}

const SafetensorsEntry& SafetensorsModel::info(const std::string& name) const {
  size_t i;
  return entry_in_shard(name, i);
}

Tensor SafetensorsModel::get(const std::string& name) const {
  size_t i;
  entry_in_shard(name, i);
  return shard(i).get(name);
}

Tensor SafetensorsModel::get_range(const std::string& name, int dim, int64_t begin,
                                   int64_t end) const {
  size_t i;
  entry_in_shard(name, i);
  return shard(i).get_range(name, dim, begin, end);
}

const std::string& SafetensorsModel::shard_path(const std::string& name) const {
  auto it = where_.find(name);
  FTUNE_CHECK(it != where_.end(), "[safetensors] ", source_, ": no tensor named '", name, "'");
  return shards_[it->second]->path;
}

void SafetensorsModel::check_all() const {
  for (const auto& [name, s] : where_) info(name);
}

// ---------------------------------------------------------------- writing

namespace {

bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = uint8_t(s[i]);
    int len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + size_t(len) > s.size()) return false;
    for (int k = 1; k < len; ++k) {
      auto cc = uint8_t(s[i + size_t(k)]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += size_t(len);
  }
  return true;
}

// JSON string escaping as serde_json writes it (the reference writer), for byte-identical headers.
void append_json_string(std::string& out, std::string_view s, const char* what) {
  FTUNE_CHECK(valid_utf8(s), "[safetensors] ", what, " is not valid UTF-8");
  out += '"';
  for (char ch : s) {
    auto c = uint8_t(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

struct Planned {
  const std::string* name;
  const Tensor* tensor;
  StDType dtype;
  uint64_t nbytes;
};

uint64_t tensor_nbytes(const Tensor& t) { return uint64_t(t.numel()) * dtype_size(t.dtype()); }

// Sorts tensors as the reference writer does and builds the padded header.
std::string plan_file(const NamedTensors& tensors, const StringMap& metadata,
                      std::vector<Planned>& plan) {
  std::unordered_set<std::string_view> seen;
  plan.clear();
  for (const auto& [name, t] : tensors) {
    FTUNE_CHECK(t.defined(), "[safetensors] tensor '", name, "' is undefined");
    FTUNE_CHECK(name != "__metadata__", "[safetensors] a tensor may not be named __metadata__");
    FTUNE_CHECK(seen.insert(name).second, "[safetensors] tensor name '", name, "' given twice");
    plan.push_back({&name, &t, st_from_dtype(t.dtype()), tensor_nbytes(t)});
  }
  std::sort(plan.begin(), plan.end(), [](const Planned& a, const Planned& b) {
    if (a.dtype != b.dtype) return a.dtype > b.dtype;
    return *a.name < *b.name;
  });
  std::string h = "{";
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      if (!first) h += ',';
      first = false;
      append_json_string(h, k, "metadata key");
      h += ':';
      append_json_string(h, v, "metadata value");
    }
    h += '}';
  }
  uint64_t off = 0;
  for (const Planned& p : plan) {
    if (h.size() > 1) h += ',';
    append_json_string(h, *p.name, "tensor name");
    h += ":{\"dtype\":\"";
    h += st_dtype_name(p.dtype);
    h += "\",\"shape\":[";
    for (size_t i = 0; i < p.tensor->shape().size(); ++i)
      h += str_cat(i ? "," : "", p.tensor->shape()[i]);
    h += str_cat("],\"data_offsets\":[", off, ",", off + p.nbytes, "]}");
    off += p.nbytes;
  }
  h += '}';
  while (h.size() % 8) h += ' ';
  FTUNE_CHECK(h.size() <= kSafetensorsMaxHeader, "[safetensors] header of ", h.size(),
              " bytes exceeds the format's limit of ", kSafetensorsMaxHeader);
  std::string out(8, '\0');
  uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  return out + h;
}

// The tensor's bytes as stored: CPU, contiguous, in its own dtype (one tensor at a time, so a GPU
// model is never copied to the host whole).
Tensor host_contiguous(const Tensor& t) {
  Tensor c = t.detach();
  if (!c.device().is_cpu()) c = c.to(Device::cpu());
  return c.contiguous();
}

template <class Sink>
void write_file_bytes(const NamedTensors& tensors, const StringMap& metadata, Sink&& sink) {
  std::vector<Planned> plan;
  std::string head = plan_file(tensors, metadata, plan);
  sink(head.data(), head.size());
  for (const Planned& p : plan) {
    if (p.nbytes == 0) continue;
    Tensor c = host_contiguous(*p.tensor);
    sink(c.raw_data(), size_t(p.nbytes));
  }
}

}  // namespace

std::vector<uint8_t> serialize_safetensors(const NamedTensors& tensors, const StringMap& metadata) {
  std::vector<uint8_t> out;
  write_file_bytes(tensors, metadata, [&](const void* p, size_t n) {
    auto* b = static_cast<const uint8_t*>(p);
    out.insert(out.end(), b, b + n);
  });
  return out;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const StringMap& metadata) {
  AtomicFile f(path, "safetensors");
  write_file_bytes(tensors, metadata, [&](const void* p, size_t n) { f.write(p, n); });
  f.commit();
}

std::vector<std::string> save_safetensors_model(const std::string& dir, const NamedTensors& tensors,
                                                uint64_t max_shard_bytes,
                                                const StringMap& metadata) {
  FTUNE_CHECK(max_shard_bytes > 0, "[safetensors] max_shard_bytes must be positive");
  FTUNE_CHECK(dir_exists(dir), "[safetensors] output folder ", dir, " does not exist");
  // Shard assignment exactly as huggingface_hub's split_state_dict_into_shards_factory.
  std::unordered_set<std::string_view> seen;
  for (const auto& [name, t] : tensors)
    FTUNE_CHECK(seen.insert(name).second, "[safetensors] tensor name '", name, "' given twice");
  std::vector<std::vector<size_t>> shards;
  std::vector<size_t> cur;
  uint64_t cur_size = 0, total_size = 0, total_params = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i].second;
    FTUNE_CHECK(t.defined(), "[safetensors] tensor '", tensors[i].first, "' is undefined");
    uint64_t sz = tensor_nbytes(t);
    total_size += sz;
    total_params += uint64_t(t.numel());
    if (sz > max_shard_bytes) {
      shards.push_back({i});
      continue;
    }
    if (cur_size + sz > max_shard_bytes) {
      shards.push_back(std::move(cur));
      cur.clear();
      cur_size = 0;
    }
    cur.push_back(i);
    cur_size += sz;
  }
  if (!cur.empty() || shards.empty()) shards.push_back(std::move(cur));

  StringMap md = metadata;
  md.emplace("format", "pt");
  const size_t n = shards.size();
  std::vector<std::string> names(n), written;
  json weight_map = json::object();
  for (size_t s = 0; s < n; ++s) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", s + 1, n);
    names[s] = n == 1 ? "model.safetensors" : buf;
    NamedTensors part;
    for (size_t i : shards[s]) {
      part.push_back(tensors[i]);
      weight_map[tensors[i].first] = names[s];
    }
    std::string path = path_join(dir, names[s]);
    save_safetensors(path, part, md);
    written.push_back(path);
  }
  if (n > 1) {
    json index = {{"metadata", {{"total_parameters", total_params}, {"total_size", total_size}}},
                  {"weight_map", weight_map}};
    std::string path = path_join(dir, "model.safetensors.index.json");
    write_file_atomic(path, index.dump(2) + "\n", "safetensors");
    written.push_back(path);
  }

  // Remove what an earlier save left that a loader could pick up instead of (or mix with) ours.
  std::unordered_set<std::string> keep(names.begin(), names.end());
  if (n > 1) keep.insert("model.safetensors.index.json");
  static const std::regex kShard(R"(model-\d{5}-of-\d{5}\.safetensors)");
  std::vector<std::string> stale;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* ent = ::readdir(d)) {
      std::string f = ent->d_name;
      bool ours = std::regex_match(f, kShard) || f == "model.safetensors" ||
                  f == "model.safetensors.index.json";
      if (ours && !keep.count(f)) stale.push_back(f);
    }
    ::closedir(d);
  }
  for (const auto& f : stale) ::unlink(path_join(dir, f).c_str());
  return written;
}

}  // namespace ftune
