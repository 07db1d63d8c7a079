#include "core/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.hpp"
#include "core/json_bounded.hpp"
#include "core/regular_file.hpp"

namespace moelab {

using nlohmann::json;

int64_t shape_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

int64_t TensorInfo::numel() const { return shape_numel(shape); }

std::string shape_str(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// Names and keys come from the file: control characters in them would break the one-line message,
// so they are shown escaped (\n, \xNN).
std::string printable(std::string_view s) {
  std::string out;
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += ch;
  }
  return out;
}

std::string printable_name(std::string_view s) {
  constexpr size_t kWhole = 256, kEnd = 120;
  if (s.size() <= kWhole) return printable(s);
  // Cut on UTF-8 character boundaries (the header parser has checked the text is UTF-8).
  auto continuation = [&](size_t i) { return (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80; };
  size_t head = kEnd, tail = s.size() - kEnd;
  while (head > 0 && continuation(head)) --head;
  while (tail < s.size() && continuation(tail)) ++tail;
  return printable(s.substr(0, head)) + "..." + printable(s.substr(tail));
}

namespace {

// nlohmann keeps the last of duplicate keys silently; the format forbids duplicates, so we look
// for them with a parser callback while parsing.
json parse_header_json(const std::string& path, std::string_view text) {
  std::string duplicate;
  std::vector<std::set<std::string>> keys_by_depth(4);
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    // A header is three levels deep; far deeper is refused before anything walks it (core/json_bounded.hpp).
    if (opens_past<json>(depth, event, kJsonNestingLimit))
      throw Error(fmt::format("{}: safetensors header nested more than {} levels deep", path, kJsonNestingLimit));
    if (event == json::parse_event_t::object_start && depth < 3) keys_by_depth[depth + 1].clear();
    if (event == json::parse_event_t::key && depth <= 2) {
      const auto key = parsed.get<std::string>();
      if (!keys_by_depth[depth].insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text.begin(), text.end(), callback);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: safetensors header is not valid JSON ({})", path, e.what()));
  }
  if (!duplicate.empty())
    throw Error(fmt::format("{}: safetensors header has duplicate key '{}'", path, printable_name(duplicate)));
  return header;
}

TensorInfo parse_entry(const std::string& path, const std::string& name, const json& entry) {
  auto bad = [&](const std::string& what) {
    return Error(fmt::format("{}: tensor '{}': {}", path, printable_name(name), what));
  };
  if (!entry.is_object()) throw bad("header entry is not an object");
  if (!entry.contains("dtype") || !entry["dtype"].is_string()) throw bad("missing or non-string 'dtype'");
  if (!entry.contains("shape") || !entry["shape"].is_array()) throw bad("missing or non-array 'shape'");
  if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() ||
      entry["data_offsets"].size() != 2)
    throw bad("missing 'data_offsets' [begin, end]");
  for (const auto& [key, _] : entry.items())
    if (key != "dtype" && key != "shape" && key != "data_offsets") throw bad("unknown field '" + printable_name(key) + "'");

  TensorInfo t;
  t.name = name;
  const auto dtype_text = entry["dtype"].get<std::string>();
  auto dtype = parse_dtype(dtype_text);
  if (!dtype) throw bad("unknown dtype '" + printable_name(dtype_text) + "'");
  t.dtype = *dtype;
  for (const auto& d : entry["shape"]) {
    if (!d.is_number_unsigned()) throw bad("shape entries must be non-negative integers");
    t.shape.push_back(d.get<int64_t>());
  }
  for (int i = 0; i < 2; ++i)
    if (!entry["data_offsets"][i].is_number_unsigned()) throw bad("data_offsets must be non-negative integers");
  t.begin = entry["data_offsets"][0].get<uint64_t>();
  t.end = entry["data_offsets"][1].get<uint64_t>();
  if (t.end < t.begin) throw bad(fmt::format("data_offsets [{}, {}] end before begin", t.begin, t.end));

  // numel * bits must not overflow, and must be whole bytes.
  unsigned __int128 bits = dtype_bits(t.dtype);
  for (auto d : t.shape) {
    bits *= uint64_t(d);
    if (bits > std::numeric_limits<uint64_t>::max()) throw bad("shape " + shape_str(t.shape) + " overflows");
  }
  if (bits % 8 != 0) throw bad("shape " + shape_str(t.shape) + " is not a whole number of bytes");
  const uint64_t expect = uint64_t(bits / 8);
  if (t.nbytes() != expect)
    throw bad(fmt::format("shape {} of {} needs {} bytes but data_offsets [{}, {}] span {}",
                          shape_str(t.shape), dtype_text, expect, t.begin, t.end, t.nbytes()));
  return t;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  // O_NONBLOCK + fstat first: a FIFO named as a shard would otherwise block open() forever.
  fd_ = open_regular_file(path, "safetensors file", &file_size_);
  try {
    if (file_size_ < 8)
      throw Error(fmt::format("{}: file is {} bytes, too small for a safetensors header", path, file_size_));
    void* m = ::mmap(nullptr, file_size_, PROT_READ, MAP_SHARED, fd_, 0);
    if (m == MAP_FAILED) throw Error(fmt::format("{}: mmap failed ({})", path, std::strerror(errno)));
    map_ = static_cast<const std::byte*>(m);

    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | uint64_t(map_[i]);  // little-endian
    if (header_len > kMaxHeaderBytes)
      throw Error(fmt::format("{}: header length {} exceeds the {} byte limit (corrupt or not safetensors)",
                              path, header_len, kMaxHeaderBytes));
    if (header_len > file_size_ - 8)
      throw Error(fmt::format("{}: header length {} points past the end of the {}-byte file (truncated?)",
                              path, header_len, file_size_));
    std::string_view text(reinterpret_cast<const char*>(map_ + 8), header_len);
    if (text.empty() || text.front() != '{')
      throw Error(fmt::format("{}: safetensors header does not start with '{{'", path));
    // nlohmann treats a NUL byte as the end of input, so "{...}\0<anything>" would parse; a raw NUL is
    // never valid JSON (serde_json, in the Rust reader, rejects it).
    if (const auto nul = text.find('\0'); nul != std::string_view::npos)
      throw Error(fmt::format("{}: safetensors header is not valid JSON (NUL byte at header offset {})", path, nul));
    const json header = parse_header_json(path, text);
    if (!header.is_object()) throw Error(fmt::format("{}: safetensors header is not a JSON object", path));

    data_ = map_ + 8 + header_len;
    const uint64_t buffer_size = file_size_ - 8 - header_len;
    std::vector<const TensorInfo*> by_offset;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object()) throw Error(fmt::format("{}: __metadata__ is not an object", path));
        for (const auto& [k, v] : entry.items()) {
          if (!v.is_string()) throw Error(fmt::format("{}: __metadata__ value '{}' is not a string", path, printable_name(k)));
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      auto [it, _] = tensors_.emplace(name, parse_entry(path, name, entry));
      by_offset.push_back(&it->second);
    }
    // Tensors must tile the buffer exactly: sorted by offset, each starts where the previous ended.
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    uint64_t cursor = 0;
    for (const TensorInfo* t : by_offset) {
      if (t->end > buffer_size)
        throw Error(fmt::format("{}: tensor '{}': data [{}, {}] runs past the end of the {}-byte data buffer "
                                "(file truncated?)", path, printable_name(t->name), t->begin, t->end, buffer_size));
      if (t->begin < cursor)
        throw Error(fmt::format("{}: tensor '{}': data [{}, {}] overlaps the previous tensor (ends at {})",
                                path, printable_name(t->name), t->begin, t->end, cursor));
      if (t->begin > cursor)
        throw Error(fmt::format("{}: tensor '{}': gap of {} unused bytes before its data at {}", path,
                                printable_name(t->name), t->begin - cursor, t->begin));
      cursor = t->end;
    }
    if (cursor != buffer_size)
      throw Error(fmt::format("{}: data buffer is {} bytes but the tensors cover {} (trailing bytes)", path,
                              buffer_size, cursor));
  } catch (...) {
    if (map_) ::munmap(const_cast<std::byte*>(map_), file_size_);
    ::close(fd_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<std::byte*>(map_), file_size_);
  if (fd_ >= 0) ::close(fd_);
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(fmt::format("{}: no tensor named '{}'", path_, printable_name(name)));
  return it->second;
}

std::span<const std::byte> SafetensorsFile::bytes(const TensorInfo& t) const {
  return {data_ + t.begin, t.nbytes()};
}

void SafetensorsFile::release(const TensorInfo& t) const {
  // Whole pages around the tensor: a shared read-only file mapping refaults any page dropped here from
  // the page cache, so a neighbour's first and last page cost at most a refault.
  const auto page = uintptr_t(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(data_ + t.begin) & ~(page - 1);
  const auto end = reinterpret_cast<uintptr_t>(data_ + t.end);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

void SafetensorsFile::read_f32(const TensorInfo& t, int64_t first, int64_t count, float* dst, bool check_finite) const {
  if (!dtype_is_float_convertible(t.dtype))
    throw Error(fmt::format("{}: tensor '{}' has dtype {}, expected a float type (F32, F16, BF16, F64)", path_,
                            printable_name(t.name), dtype_name(t.dtype)));
  if (first < 0 || count < 0 || first + count > t.numel())
    throw Error(fmt::format("{}: tensor '{}': element range [{}, {}) outside its {} elements", path_, printable_name(t.name),
                            first, first + count, t.numel()));
  const int bytes_per = dtype_bits(t.dtype) / 8;
  const std::byte* src = data_ + t.begin + uint64_t(first) * bytes_per;
  if (!check_finite) {
    convert_to_f32(t.dtype, src, size_t(count), dst);
    return;
  }
  // Converted and checked a cache-sized chunk at a time, so the check reads what was just written.
  constexpr int64_t kChunk = 1 << 14;
  for (int64_t at = 0; at < count; at += kChunk) {
    const int64_t n = std::min(kChunk, count - at);
    convert_to_f32(t.dtype, src + uint64_t(at) * bytes_per, size_t(n), dst + at);
    if (const int64_t bad = first_non_finite(dst + at, size_t(n)); bad >= 0)
      throw non_finite_error(t, first + at + bad, dst[at + bad]);
  }
}

Error SafetensorsFile::non_finite_error(const TensorInfo& t, int64_t element, float value) const {
  return Error(fmt::format("{}: tensor '{}': element {} is {} (a non-finite weight: the checkpoint is corrupt)", path_,
                           printable_name(t.name), element, std::isnan(value) ? "NaN" : value > 0 ? "+Inf" : "-Inf"));
}

int64_t SafetensorsFile::check_finite(const TensorInfo& t) const {
  if (!dtype_is_float_convertible(t.dtype)) return 0;
  constexpr int64_t kChunk = 1 << 14;
  std::vector<float> buf(size_t(std::min<int64_t>(kChunk, t.numel())));
  for (int64_t at = 0; at < t.numel(); at += kChunk) {
    const int64_t n = std::min(kChunk, t.numel() - at);
    read_f32(t, at, n, buf.data(), /*check_finite=*/true);
  }
  return t.numel();
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name, bool check_finite) const {
  const auto& t = info(name);
  std::vector<float> out(size_t(t.numel()));
  read_f32(t, 0, t.numel(), out.data(), check_finite);
  return out;
}

}  // namespace moelab
