#include "analysis/trace_h5.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <cerrno>
#include <ctime>
#include <limits>
#include <map>
#include <mutex>
#include <set>

#include "core/error.hpp"
#include "core/json_bounded.hpp"

namespace moelab::analysis::h5 {

namespace {

// ---------------------------------------------------------------------------------------------------
// Setup

// The tag of the opaque type that variable-length string descriptors are "converted" to: the
// conversion leaves the bytes as they are on disk (length, global heap address, object index).
constexpr const char* kRawVlenTag = "moelab: raw variable-length descriptor";

herr_t raw_vlen_conversion(hid_t src, hid_t dst, H5T_cdata_t* cdata, size_t, size_t, size_t, void*, void*, hid_t) {
  switch (cdata->command) {
    case H5T_CONV_INIT: {
      if (H5Tis_variable_str(src) <= 0 || H5Tget_class(dst) != H5T_OPAQUE) return -1;
      char* tag = H5Tget_tag(dst);
      const bool ours = tag && std::strcmp(tag, kRawVlenTag) == 0;
      H5free_memory(tag);
      if (!ours) return -1;
      cdata->need_bkg = H5T_BKG_NO;
      return 0;
    }
    case H5T_CONV_CONV:
      // In place and of equal size: the descriptors stay as read from the file.
      return H5Tget_size(src) == H5Tget_size(dst) ? 0 : -1;
    default:
      return 0;
  }
}

bool setup_once() {
  H5dont_atexit();  // fails (harmlessly) if the library was already started by someone else
  H5open();
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const Id vlen(H5Tcopy(H5T_C_S1));
  H5Tset_size(vlen, H5T_VARIABLE);
  const Id raw(H5Tcreate(H5T_OPAQUE, 16));
  H5Tset_tag(raw, kRawVlenTag);
  H5Tregister(H5T_PERS_SOFT, "moelab_raw_vlen", vlen, raw, raw_vlen_conversion);
  H5Eclear2(H5E_DEFAULT);
  return true;
}

// Before main: H5dont_atexit only works before the library starts.
[[maybe_unused]] const bool kSetUpEarly = (setup(), true);

// Limits on what a file may make us read.
constexpr uint64_t kMaxAttrElements = uint64_t(1) << 20;
constexpr uint64_t kMaxAttrBytes = uint64_t(1) << 30;
constexpr uint64_t kMaxAttributes = 4096;

}  // namespace

void setup() {
  static const bool done = setup_once();
  (void)done;
}

// ---------------------------------------------------------------------------------------------------
// Errors

std::string error_text() {
  std::string text;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD,
           [](unsigned, const H5E_error2_t* e, void* data) -> herr_t {
             auto& s = *static_cast<std::string*>(data);
             if (s.empty() && e->desc && *e->desc) s = e->desc;
             return 0;
           },
           &text);
  H5Eclear2(H5E_DEFAULT);
  if (text.empty()) return "HDF5 error";
  // A failed system call reads "file write failed: time = ...\n, filename = ..., errno = 28, error
  // message = 'No space left on device', ...": keep what failed and what the system said.
  const std::string marker = "error message = '";
  if (const auto at = text.find(marker); at != std::string::npos) {
    const auto from = at + marker.size(), to = text.find('\'', from);
    const auto head = text.substr(0, std::min(text.find(':'), text.find('\n')));
    return fmt::format("{} ({})", head, text.substr(from, to == std::string::npos ? std::string::npos : to - from));
  }
  std::replace(text.begin(), text.end(), '\n', ' ');
  return text;
}

void H5Context::fail(const std::string& what) const { throw Error(fmt::format("{}: {}: {}", path, what, error_text())); }

void H5Context::damaged(const std::string& what) const {
  H5Eclear2(H5E_DEFAULT);
  throw Error(fmt::format("{}: damaged trace: {}", path, what));
}

// ---------------------------------------------------------------------------------------------------
// Types and shapes

Id half_type() {
  Id t(H5Tcopy(H5T_IEEE_F32LE));
  H5Tset_fields(t, 15, 10, 5, 0, 10);  // sign bit, exponent at 10 (5 bits), mantissa at 0 (10 bits)
  H5Tset_size(t, 2);
  H5Tset_precision(t, 16);
  H5Tset_ebias(t, 15);
  return t;
}

Id latest_format_fapl() {
  Id fapl(H5Pcreate(H5P_FILE_ACCESS));
  H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST);
  return fapl;
}

std::vector<hsize_t> dims_of(const H5Context& cx, hid_t dset, const std::string& name) {
  Id space(cx.id(H5Dget_space(dset), "cannot read the shape of /" + name));
  const int rank = H5Sget_simple_extent_ndims(space);
  if (rank < 0 || rank > 8) cx.damaged(fmt::format("/{} has no usable shape", name));
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (H5Sget_simple_extent_dims(space, dims.data(), nullptr) < 0) cx.fail("cannot read the shape of /" + name);
  for (hsize_t d : dims)
    if (d > (hsize_t(1) << 40)) cx.damaged(fmt::format("/{} claims a dimension of {}", name, d));
  return dims;
}

std::vector<hsize_t> dims_of(const H5Context& cx, hid_t dset, const std::string& name, int rank) {
  auto dims = dims_of(cx, dset, name);
  if (int(dims.size()) != rank)
    throw Error(fmt::format("{}: not a moelab trace: /{} has {} dimensions, a trace's has {}", cx.path, name, dims.size(),
                            rank));
  return dims;
}

void check_type(const H5Context& cx, hid_t dset, const std::string& name, H5T_class_t cls, const char* what, size_t size) {
  Id type(cx.id(H5Dget_type(dset), "cannot read the type of /" + name));
  const size_t got = H5Tget_size(type);
  if (H5Tget_class(type) != cls || got == 0 || got > 16 || (size > 0 && got != size))
    throw Error(fmt::format("{}: not a moelab trace: /{} is not {}", cx.path, name, what));
}

void check_read_size(const H5Context& cx, hid_t dset, const std::string& name, uint64_t bytes) {
  const uint64_t stored = H5Dget_storage_size(dset);
  // Deflate never compresses better than about 1032:1; allow twice that, plus room for small datasets.
  const uint64_t limit = (uint64_t(64) << 20) + std::min<uint64_t>(stored, uint64_t(1) << 50) * 2048;
  if (bytes > limit)
    cx.damaged(fmt::format("/{} claims {} bytes of rows but stores only {} bytes", name, bytes, stored));
}

// ---------------------------------------------------------------------------------------------------
// Attributes

namespace {

void delete_attribute_if_present(hid_t obj, const char* name) {
  if (H5Aexists(obj, name) > 0) H5Adelete(obj, name);
}

// A fixed-length, NUL-padded UTF-8 string type of `len` bytes (at least 1).
Id fixed_string_type(size_t len) {
  Id t(H5Tcopy(H5T_C_S1));
  H5Tset_size(t, std::max<size_t>(len, 1));
  H5Tset_strpad(t, H5T_STR_NULLPAD);
  H5Tset_cset(t, H5T_CSET_UTF8);
  return t;
}

void write_fixed_strings(const H5Context& cx, hid_t obj, const char* name, const std::vector<std::string>& values,
                         bool scalar) {
  delete_attribute_if_present(obj, name);
  size_t len = 1;
  for (const auto& v : values) {
    if (v.find('\0') != std::string::npos)
      throw Error(fmt::format("{}: attribute {}: a string holds a NUL character", cx.path, name));
    len = std::max(len, v.size());
  }
  const Id type = fixed_string_type(len);
  const hsize_t n = values.size();
  Id space(scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr));
  Id attr(cx.id(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), fmt::format("cannot create attribute {}", name)));
  if (values.empty()) return;  // nothing to write into a zero-length array
  std::vector<char> buf(values.size() * len, '\0');
  for (size_t i = 0; i < values.size(); ++i) std::memcpy(buf.data() + i * len, values[i].data(), values[i].size());
  cx.ok(H5Awrite(attr, type, buf.data()), fmt::format("cannot write attribute {}", name));
}

// Our own reads of the file's bytes (for the global heap), bounded by its size.
class FileBytes {
 public:
  explicit FileBytes(const H5Context& cx) {
    fd_ = ::open(cx.path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat st {};
    if (fd_ < 0 || ::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode))
      throw Error(fmt::format("{}: cannot read ({})", cx.path, std::strerror(errno)));
    size_ = uint64_t(st.st_size);
  }
  ~FileBytes() { ::close(fd_); }
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  uint64_t size() const { return size_; }
  // False when [at, at + n) is not inside the file or cannot be read.
  bool read(uint64_t at, void* out, uint64_t n) const {
    if (at > size_ || n > size_ - at) return false;
    auto* p = static_cast<char*>(out);
    while (n > 0) {
      const ssize_t got = ::pread(fd_, p, size_t(std::min<uint64_t>(n, 1 << 30)), off_t(at));
      if (got <= 0) return false;
      p += got, at += uint64_t(got), n -= uint64_t(got);
    }
    return true;
  }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
};

uint64_t little_endian(const unsigned char* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = n; i-- > 0;) v = (v << 8) | p[i];
  return v;
}

// Global heap collections, parsed by us with every offset checked (HDF5 1.10's own parser loops for ever
// or overruns on a damaged one). Format (HDF5 file format spec, "Global Heap"): "GCOL", version 1, 3
// reserved bytes, the collection size (a length); then objects: index (2 bytes), reference count (2),
// reserved (4), size (a length), the data padded to 8 bytes; index 0 is the free space that ends them.
class GlobalHeap {
 public:
  GlobalHeap(const H5Context& cx, const std::string& attr, uint64_t base, size_t sizeof_size)
      : cx_(cx), attr_(attr), file_(cx), base_(base), sizeof_size_(sizeof_size) {}

  std::string object(uint64_t addr, uint32_t index, uint64_t length) {
    const auto& c = collection(addr);
    const size_t header = align8(8 + sizeof_size_), obj_header = align8(8 + sizeof_size_);
    uint64_t at = header;
    while (at + obj_header <= c.size()) {
      const auto* p = reinterpret_cast<const unsigned char*>(c.data() + at);
      const auto idx = uint32_t(little_endian(p, 2));
      const uint64_t size = little_endian(p + 8, sizeof_size_);
      if (idx == 0) break;  // free space: no objects after it
      const uint64_t data = at + obj_header;
      if (size > c.size() - data) bad(fmt::format("heap object {} overruns its collection", idx));
      if (idx == index) {
        if (length > size) bad(fmt::format("string of {} bytes in a heap object of {}", length, size));
        return std::string(c.data() + data, size_t(length));
      }
      at = data + align8(size);
    }
    bad(fmt::format("heap object {} not found", index));
  }

 private:
  static uint64_t align8(uint64_t n) { return (n + 7) & ~uint64_t(7); }

  [[noreturn]] void bad(const std::string& what) const {
    cx_.damaged(fmt::format("attribute {}: {}", attr_, what));
  }

  const std::vector<char>& collection(uint64_t addr) {
    if (const auto it = cache_.find(addr); it != cache_.end()) return it->second;
    unsigned char head[24] = {};
    const size_t head_size = 8 + sizeof_size_;
    if (addr > file_.size() || !file_.read(base_ + addr, head, head_size))
      bad(fmt::format("its global heap address {} is outside the file", addr));
    if (std::memcmp(head, "GCOL", 4) != 0 || head[4] != 1) bad(fmt::format("no global heap at address {}", addr));
    const uint64_t size = little_endian(head + 8, sizeof_size_);
    if (size < head_size || size > kMaxAttrBytes || !(base_ + addr <= file_.size() && size <= file_.size() - base_ - addr))
      bad(fmt::format("global heap at address {} claims {} bytes", addr, size));
    std::vector<char> bytes(size_t(size), '\0');
    if (!file_.read(base_ + addr, bytes.data(), size)) bad(fmt::format("cannot read the global heap at address {}", addr));
    return cache_.emplace(addr, std::move(bytes)).first->second;
  }

  const H5Context& cx_;
  std::string attr_;
  FileBytes file_;
  uint64_t base_;
  size_t sizeof_size_;
  std::map<uint64_t, std::vector<char>> cache_;
};

// Variable-length strings: HDF5 hands us each element's descriptor (length, heap address, object
// index) unread, and we read the heap ourselves.
// Issue 13's "HDF5 leak inside read_all_attrs" lived in the H5Aread (HDF5 allocates each string) /
// H5Dvlen_reclaim pair this replaces; HDF5 now allocates nothing for strings, so nothing can leak there.
std::vector<std::string> read_vlen_strings(const H5Context& cx, hid_t attr, const std::string& name, uint64_t n) {
  Id file(cx.id(H5Iget_file_id(attr), "cannot read attribute " + name));
  Id fcpl(cx.id(H5Fget_create_plist(file), "cannot read attribute " + name));
  size_t sizeof_addr = 0, sizeof_size = 0;
  hsize_t userblock = 0;
  cx.ok(H5Pget_sizes(fcpl, &sizeof_addr, &sizeof_size), "cannot read attribute " + name);
  cx.ok(H5Pget_userblock(fcpl, &userblock), "cannot read attribute " + name);
  if (sizeof_addr < 2 || sizeof_addr > 8 || sizeof_size < 2 || sizeof_size > 8)
    cx.damaged(fmt::format("address size {}, length size {}", sizeof_addr, sizeof_size));
  const size_t desc = 4 + sizeof_addr + 4;
  if (H5Aget_storage_size(attr) != n * desc)
    cx.damaged(fmt::format("attribute {} stores {} bytes for {} strings", name, H5Aget_storage_size(attr), n));
  Id raw(H5Tcreate(H5T_OPAQUE, desc));
  H5Tset_tag(raw, kRawVlenTag);
  std::vector<unsigned char> buf(size_t(n) * desc);
  cx.ok(H5Aread(attr, raw, buf.data()), "cannot read attribute " + name);
  GlobalHeap heap(cx, name, userblock, sizeof_size);
  std::vector<std::string> out;
  for (uint64_t i = 0; i < n; ++i) {
    const unsigned char* d = buf.data() + i * desc;
    const uint64_t length = little_endian(d, 4), addr = little_endian(d + 4, sizeof_addr);
    const auto index = uint32_t(little_endian(d + 4 + sizeof_addr, 4));
    out.push_back(length == 0 ? std::string() : heap.object(addr, index, length));
  }
  return out;
}

}  // namespace

void write_string_attr(const H5Context& cx, hid_t obj, const char* name, const std::string& value) {
  write_fixed_strings(cx, obj, name, {value}, /*scalar=*/true);
}

void write_strings_attr(const H5Context& cx, hid_t obj, const char* name, const std::vector<std::string>& values) {
  write_fixed_strings(cx, obj, name, values, /*scalar=*/false);
}

void write_int_attr(const H5Context& cx, hid_t obj, const char* name, int64_t value) {
  delete_attribute_if_present(obj, name);
  Id space(H5Screate(H5S_SCALAR));
  Id attr(cx.id(H5Acreate2(obj, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT),
                fmt::format("cannot create attribute {}", name)));
  cx.ok(H5Awrite(attr, H5T_NATIVE_INT64, &value), fmt::format("cannot write attribute {}", name));
}

namespace {

// Element count of an attribute (scalar: 1), checked to be a scalar or 1-D and bounded.
uint64_t attr_elements(const H5Context& cx, hid_t attr, const std::string& name, bool* scalar = nullptr) {
  Id space(cx.id(H5Aget_space(attr), "cannot read attribute " + name));
  const auto cls = H5Sget_simple_extent_type(space);
  const int rank = H5Sget_simple_extent_ndims(space);
  const hssize_t n = H5Sget_simple_extent_npoints(space);
  if (cls == H5S_NULL) return 0;
  if ((cls != H5S_SCALAR && cls != H5S_SIMPLE) || rank < 0 || rank > 1 || n < 0 || uint64_t(n) > kMaxAttrElements)
    cx.damaged(fmt::format("attribute {} has an unusable shape", name));
  if (scalar) *scalar = cls == H5S_SCALAR;
  return uint64_t(n);
}

std::vector<std::string> read_strings_of(const H5Context& cx, hid_t attr, const std::string& name) {
  Id ftype(cx.id(H5Aget_type(attr), "cannot read attribute " + name));
  if (H5Tget_class(ftype) != H5T_STRING) throw Error(fmt::format("{}: attribute {} is not a string", cx.path, name));
  const uint64_t n = attr_elements(cx, attr, name);
  std::vector<std::string> out;
  if (n == 0) return out;
  if (H5Tis_variable_str(ftype) > 0) return read_vlen_strings(cx, attr, name, n);
  const size_t len = H5Tget_size(ftype);
  if (len == 0 || len > kMaxAttrBytes || n * len > kMaxAttrBytes || H5Aget_storage_size(attr) != n * len)
    cx.damaged(fmt::format("attribute {} stores {} bytes for {} strings of {}", name, H5Aget_storage_size(attr), n, len));
  Id mtype(H5Tcopy(ftype));
  std::vector<char> buf(size_t(n * len));
  cx.ok(H5Aread(attr, mtype, buf.data()), "cannot read attribute " + name);
  const bool space_padded = H5Tget_strpad(ftype) == H5T_STR_SPACEPAD;
  for (uint64_t i = 0; i < n; ++i) {
    const char* p = buf.data() + i * len;
    size_t m = strnlen(p, len);
    if (space_padded)
      while (m > 0 && p[m - 1] == ' ') --m;
    out.emplace_back(p, m);
  }
  return out;
}

}  // namespace

std::vector<std::string> read_strings(const H5Context& cx, hid_t obj, const std::string& name) {
  Id attr(cx.id(H5Aopen(obj, name.c_str(), H5P_DEFAULT), "cannot open attribute " + name));
  return read_strings_of(cx, attr, name);
}

nlohmann::json read_attr_json(const H5Context& cx, hid_t obj, const std::string& name) {
  Id attr(cx.id(H5Aopen(obj, name.c_str(), H5P_DEFAULT), "cannot open attribute " + name));
  Id type(cx.id(H5Aget_type(attr), "cannot read attribute " + name));
  bool scalar = false;
  const uint64_t n = attr_elements(cx, attr, name, &scalar);
  nlohmann::json values = nlohmann::json::array();
  const auto check_storage = [&] {
    const size_t size = H5Tget_size(type);
    if (size == 0 || size > 16 || H5Aget_storage_size(attr) != n * size)
      cx.damaged(fmt::format("attribute {} stores {} bytes for {} numbers", name, H5Aget_storage_size(attr), n));
  };
  switch (H5Tget_class(type)) {
    case H5T_STRING:
      for (auto& s : read_strings_of(cx, attr, name)) values.push_back(std::move(s));
      break;
    case H5T_INTEGER: {
      check_storage();
      std::vector<int64_t> v(n);
      if (n) cx.ok(H5Aread(attr, H5T_NATIVE_INT64, v.data()), "cannot read attribute " + name);
      for (auto x : v) values.push_back(x);
      break;
    }
    case H5T_FLOAT: {
      check_storage();
      std::vector<double> v(n);
      if (n) cx.ok(H5Aread(attr, H5T_NATIVE_DOUBLE, v.data()), "cannot read attribute " + name);
      for (auto x : v) values.push_back(x);
      break;
    }
    default:
      return nullptr;  // kinds a trace never holds
  }
  if (!scalar) return values;
  if (values.empty()) return nullptr;
  // model_config, runs and inputs are JSON documents stored as strings; give them back as JSON.
  if ((name == "model_config" || name == "runs" || name == "inputs") && values[0].is_string()) {
    auto parsed = parse_json_bounded(values[0].get<std::string>(), cx.path + ": attribute " + name, false);
    if (!parsed.is_discarded()) return parsed;
  }
  return values[0];
}

nlohmann::json read_all_attrs(const H5Context& cx, hid_t obj) {
  std::vector<std::string> names;
  const herr_t rc = H5Aiterate2(obj, H5_INDEX_NAME, H5_ITER_INC, nullptr,
                                [](hid_t, const char* name, const H5A_info_t*, void* data) -> herr_t {
                                  auto& v = *static_cast<std::vector<std::string>*>(data);
                                  v.push_back(name);
                                  return v.size() > kMaxAttributes ? 1 : 0;  // stop: too many
                                },
                                &names);
  if (rc < 0) cx.fail("cannot list the attributes");
  if (names.size() > kMaxAttributes) cx.damaged(fmt::format("more than {} attributes", kMaxAttributes));
  nlohmann::json j = nlohmann::json::object();
  for (const auto& n : names) j[n] = read_attr_json(cx, obj, n);
  return j;
}

std::optional<int64_t> read_int_attr(const H5Context& cx, hid_t obj, const char* name) {
  if (H5Aexists(obj, name) <= 0) return std::nullopt;
  const auto j = read_attr_json(cx, obj, name);
  if (!j.is_number_integer()) return std::nullopt;
  return j.get<int64_t>();
}

std::string utc_now_iso8601() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// ---------------------------------------------------------------------------------------------------
// Row datasets

namespace {

// Rows per chunk: the requested count, fewer when rows are wide, so that a chunk stays near 4 MiB
// (HDF5 reads and decompresses whole chunks).
hsize_t chunk_rows_for(int64_t requested, size_t row_bytes) {
  const int64_t cap = std::max<int64_t>(64, int64_t((4u << 20) / std::max<size_t>(row_bytes, 1)));
  return hsize_t(std::max<int64_t>(1, std::min(requested, cap)));
}

// Chunk shape of a dataset (rank <= 3); 0 when it is not chunked.
int chunk_of(hid_t dset, hsize_t (&chunk)[3]) {
  chunk[0] = chunk[1] = chunk[2] = 1;
  Id dcpl(H5Dget_create_plist(dset));
  if (!dcpl.valid() || H5Pget_layout(dcpl) != H5D_CHUNKED) return 0;
  return H5Pget_chunk(dcpl, 3, chunk);
}

// A chunk cache big enough for the chunk being filled (the default 1 MiB would be bypassed by bigger
// chunks, making every partial-chunk write a read-modify-write of the compressed chunk).
Id row_dataset_access(hid_t dset) {
  hsize_t chunk[3];
  const int rank = chunk_of(dset, chunk);
  Id type(H5Dget_type(dset));
  uint64_t bytes = std::max<size_t>(H5Tget_size(type), 1);
  for (int i = 0; i < rank; ++i) bytes *= std::min<hsize_t>(chunk[i], hsize_t(1) << 20);
  Id dapl(H5Pcreate(H5P_DATASET_ACCESS));
  // (Bounded: a crafted chunk shape must not make HDF5 reserve gigabytes.)
  H5Pset_chunk_cache(dapl, 521, size_t(std::clamp<uint64_t>(4 * bytes, uint64_t(1) << 20, uint64_t(256) << 20)), 1.0);
  return dapl;
}

// Rows per chunk of a dataset (its first chunk dimension).
hsize_t chunk_rows_of(hid_t dset) {
  hsize_t chunk[3];
  return chunk_of(dset, chunk) > 0 ? std::clamp<hsize_t>(chunk[0], 1, hsize_t(1) << 30) : 4096;
}

// Reads rows [first, first + rows) into `out`; false if HDF5 fails.
bool read_row_block(hid_t dset, hid_t mem_type, int64_t first, int64_t rows, void* out) {
  Id fspace(H5Dget_space(dset));
  const int rank = H5Sget_simple_extent_ndims(fspace);
  if (rank < 1 || rank > 8) return false;
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  H5Sget_simple_extent_dims(fspace, dims.data(), nullptr);
  std::vector<hsize_t> start(dims.size(), 0), count = dims;
  start[0] = hsize_t(first);
  count[0] = hsize_t(rows);
  if (H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr) < 0) return false;
  Id mspace(H5Screate_simple(rank, count.data(), nullptr));
  return H5Dread(dset, mem_type, mspace, fspace, H5P_DEFAULT, out) >= 0;
}

}  // namespace

Id create_row_dataset(const H5Context& cx, hid_t file, const char* name, hid_t type, std::vector<hsize_t> row_shape,
                      int64_t chunk_tokens, int deflate_level) {
  std::vector<hsize_t> dims{0}, maxdims{H5S_UNLIMITED};
  size_t row_bytes = H5Tget_size(type);
  for (hsize_t d : row_shape) dims.push_back(d), maxdims.push_back(d), row_bytes *= d;
  std::vector<hsize_t> chunk = dims;
  chunk[0] = chunk_rows_for(chunk_tokens, row_bytes);
  Id space(H5Screate_simple(int(dims.size()), dims.data(), maxdims.data()));
  Id dcpl(H5Pcreate(H5P_DATASET_CREATE));
  cx.ok(H5Pset_chunk(dcpl, int(chunk.size()), chunk.data()), fmt::format("cannot chunk /{}", name));
  H5Pset_shuffle(dcpl);
  H5Pset_deflate(dcpl, unsigned(deflate_level));
  return Id(cx.id(H5Dcreate2(file, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), fmt::format("cannot create /{}", name)));
}

Id open_row_dataset(const H5Context& cx, hid_t file, const char* name) {
  if (H5Lexists(file, name, H5P_DEFAULT) <= 0) throw Error(fmt::format("{}: not a moelab trace (no /{} dataset)", cx.path, name));
  H5O_info_t info{};
  if (H5Oget_info_by_name2(file, name, &info, H5O_INFO_BASIC, H5P_DEFAULT) < 0) cx.fail(fmt::format("cannot open /{}", name));
  if (info.type != H5O_TYPE_DATASET) throw Error(fmt::format("{}: not a moelab trace (/{} is not a dataset)", cx.path, name));
  Id probe(cx.id(H5Dopen2(file, name, H5P_DEFAULT), fmt::format("cannot open /{}", name)));
  // The layout (analysis/trace.hpp): rank and kind of number of each dataset.
  const std::string n = name;
  const bool rows_3d = n == kExperts || n == kGates || n == kLogits || n == kGuess;
  const bool floats = n == kGates || n == kLogits;
  dims_of(cx, probe, name, rows_3d ? 3 : 1);
  check_type(cx, probe, name, floats ? H5T_FLOAT : H5T_INTEGER, floats ? "floating-point" : "integer");
  // Integers exactly as the format stores them: they are read with HDF5's conversion, which saturates, so an
  // int8 -1 in /experts would read as expert 0 and an int64 token id past 2^31 as 2^31 - 1, without a word.
  if (!floats) {
    const bool one_byte = n == kExperts || n == kGuess;
    const size_t want_size = one_byte ? 1 : n == kOffsets ? 8 : 4;
    const H5T_sign_t want_sign = one_byte ? H5T_SGN_NONE : H5T_SGN_2;
    Id type(cx.id(H5Dget_type(probe), "cannot read the type of /" + n));
    const size_t size = H5Tget_size(type);
    const H5T_sign_t sign = H5Tget_sign(type);
    if (size != want_size || sign != want_sign)
      throw Error(fmt::format("{}: not a moelab trace: /{} holds {}-byte {} integers, the format's are {}-byte {}",
                              cx.path, n, size, sign == H5T_SGN_NONE ? "unsigned" : "signed", want_size,
                              want_sign == H5T_SGN_NONE ? "unsigned" : "signed"));
  }
  const Id dapl = row_dataset_access(probe);
  return Id(cx.id(H5Dopen2(file, name, dapl), fmt::format("cannot open /{}", name)));
}

void write_rows(const H5Context& cx, hid_t dset, const char* name, hid_t mem_type, const void* data, size_t data_elems,
                int64_t first, int64_t rows) {
  if (rows == 0) return;
  auto dims = dims_of(cx, dset, name);
  uint64_t row_elems = 1;
  for (size_t i = 1; i < dims.size(); ++i) row_elems *= dims[i];
  if (dims.empty() || row_elems * uint64_t(rows) != data_elems)
    throw Error(fmt::format("{}: /{} has rows of {} values in the file, this run writes rows of {}; write to a new file",
                            cx.path, name, row_elems, data_elems / size_t(rows)));
  dims[0] = hsize_t(first + rows);
  cx.ok(H5Dset_extent(dset, dims.data()), fmt::format("cannot extend /{}", name));
  Id fspace(cx.id(H5Dget_space(dset), fmt::format("cannot extend /{}", name)));
  std::vector<hsize_t> start(dims.size(), 0), count = dims;
  start[0] = hsize_t(first);
  count[0] = hsize_t(rows);
  cx.ok(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr),
        fmt::format("cannot select rows of /{}", name));
  Id mspace(H5Screate_simple(int(count.size()), count.data(), nullptr));
  cx.ok(H5Dwrite(dset, mem_type, mspace, fspace, H5P_DEFAULT, data), fmt::format("cannot write /{}", name));
}

std::vector<uint8_t> read_rows_raw(const H5Context& cx, hid_t dset, const char* name, hid_t mem_type, size_t elem_size,
                                   int64_t rows, size_t row_elems, bool salvage) {
  if (rows < 0 || row_elems == 0 || uint64_t(rows) > (uint64_t(1) << 40) / row_elems)
    cx.damaged(fmt::format("/{}: {} rows of {} values", name, rows, row_elems));
  const uint64_t row_bytes = row_elems * elem_size;
  check_read_size(cx, dset, name, uint64_t(rows) * row_bytes);
  std::vector<uint8_t> out(size_t(uint64_t(rows) * row_bytes));
  const auto chunk = int64_t(chunk_rows_of(dset));
  // Whole chunks at a time, about 256k rows (fewer when rows are wide).
  const int64_t block = chunk * std::max<int64_t>(1, int64_t((64u << 20) / std::max<uint64_t>(row_bytes, 1)) / chunk);
  int64_t done = 0;
  while (done < rows) {
    const int64_t n = std::min(block, rows - done);
    if (read_row_block(dset, mem_type, done, n, out.data() + size_t(done) * row_bytes)) {
      done += n;
      continue;
    }
    const std::string why = error_text();
    if (!salvage)
      throw Error(fmt::format("{}: cannot read /{} rows {}..{}: {} (if a writer was killed while writing it, "
                              "`moelab trace --repair {}` keeps what is readable)",
                              cx.path, name, done, done + n - 1, why, cx.path));
    // Salvage: chunk by chunk up to the first that fails.
    for (int64_t at = done; at < done + n; at += chunk) {
      const int64_t m = std::min(chunk, rows - at);
      if (!read_row_block(dset, mem_type, at, m, out.data() + size_t(at) * row_bytes)) {
        H5Eclear2(H5E_DEFAULT);
        out.resize(size_t(at) * row_bytes);
        return out;
      }
    }
    done += n;
  }
  return out;
}

void read_row_range(const H5Context& cx, hid_t dset, const char* name, hid_t mem_type, size_t elem_size, int64_t first,
                    int64_t rows, size_t row_elems, void* out) {
  if (rows <= 0) return;
  if (first < 0 || row_elems == 0 || uint64_t(rows) > (uint64_t(1) << 40) / (row_elems * elem_size))
    cx.damaged(fmt::format("/{}: rows {}..{} of {} values", name, first, first + rows - 1, row_elems));
  if (read_row_block(dset, mem_type, first, rows, out)) return;
  const std::string why = error_text();
  throw Error(fmt::format("{}: cannot read /{} rows {}..{}: {} (if a writer was killed while writing it, "
                          "`moelab trace --repair {}` keeps what is readable)",
                          cx.path, name, first, first + rows - 1, why, cx.path));
}

void shrink_rows(const H5Context& cx, hid_t dset, const char* name, int64_t rows) {
  auto dims = dims_of(cx, dset, name);
  if (dims.empty() || int64_t(dims[0]) <= rows) return;
  dims[0] = hsize_t(rows);
  cx.ok(H5Dset_extent(dset, dims.data()), fmt::format("cannot truncate /{}", name));
}

// ---------------------------------------------------------------------------------------------------
// Opening files

namespace {

// SWMR readers retry metadata whose checksum fails, assuming a live writer is mid-update, with a
// doubling sleep: HDF5's default of 100 attempts never ends on a block torn by a dead writer. 24
// attempts sleep about 16 ms in all, plenty for a live writer's update to land.
constexpr unsigned kSwmrReadAttempts = 24;

Id swmr_read_access() {
  Id fapl(H5Pcreate(H5P_FILE_ACCESS));
  H5Pset_metadata_read_attempts(fapl, kSwmrReadAttempts);
  return fapl;
}

// A regular file we may read; HDF5 would block for ever opening a FIFO.
void check_regular_file(const H5Context& cx) {
  struct stat st {};
  if (::stat(cx.path.c_str(), &st) != 0) throw Error(fmt::format("{}: cannot open ({})", cx.path, std::strerror(errno)));
  if (!S_ISREG(st.st_mode)) throw Error(fmt::format("{}: not a regular file", cx.path));
}

}  // namespace

bool left_by_dead_writer(const H5Context& cx) {
  hid_t f = H5Fopen(cx.path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f >= 0) {
    H5Fclose(f);
    return false;
  }
  f = H5Fopen(cx.path.c_str(), H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, swmr_read_access());
  if (f >= 0) H5Fclose(f);
  H5Eclear2(H5E_DEFAULT);
  return f >= 0;
}

namespace {
std::mutex abandoned_mutex;
std::set<std::pair<dev_t, ino_t>> abandoned_files;  // (device, inode)
}  // namespace

void WriterLock::mark_abandoned() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return;
  const std::lock_guard guard(abandoned_mutex);
  abandoned_files.insert({st.st_dev, st.st_ino});
}

void WriterLock::check_not_abandoned() {
  struct stat st {};
  bool abandoned = false;
  if (::fstat(fd_, &st) == 0) {
    const std::lock_guard guard(abandoned_mutex);
    abandoned = abandoned_files.count({st.st_dev, st.st_ino}) > 0;
  }
  if (abandoned) {
    ::close(fd_);
    fd_ = -1;
    throw Error(fmt::format("{}: a write to this trace failed earlier in this process; continue or repair it from a "
                            "new process", path_));
  }
}

bool left_by_dead_writer_quietly(const std::string& path) {
  setup();
  return left_by_dead_writer(H5Context{path});
}

Id open_for_writing(const H5Context& cx) {
  check_regular_file(cx);
  if (H5Fis_hdf5(cx.path.c_str()) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Error(fmt::format("{}: exists and is not an HDF5 file; refusing to overwrite it", cx.path));
  }
  const Id fapl = latest_format_fapl();
  const hid_t f = H5Fopen(cx.path.c_str(), H5F_ACC_RDWR, fapl);
  if (f < 0) throw Error(fmt::format("{}: cannot open for appending: {}", cx.path, error_text()));
  return Id(f);
}

Id open_for_reading(const H5Context& cx) {
  if (::access(cx.path.c_str(), R_OK) != 0) throw Error(fmt::format("{}: cannot open ({})", cx.path, std::strerror(errno)));
  check_regular_file(cx);
  if (H5Fis_hdf5(cx.path.c_str()) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Error(fmt::format("{}: not an HDF5 file", cx.path));
  }
  hid_t f = H5Fopen(cx.path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f >= 0) return Id(f);
  const std::string why = error_text();
  f = H5Fopen(cx.path.c_str(), H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, swmr_read_access());
  if (f >= 0) return Id(f);
  H5Eclear2(H5E_DEFAULT);
  throw Error(fmt::format("{}: cannot open: {}", cx.path, why));
}

Committed read_committed(const H5Context& cx, hid_t offsets_dset) {
  const auto dims = dims_of(cx, offsets_dset, kOffsets, 1);
  if (dims[0] < 1) cx.damaged(fmt::format("/{} is empty (it starts with a 0)", kOffsets));
  // Every offset, not only the last (8 bytes a sequence): an append shrinks every dataset to the last one, so
  // offsets that decrease somewhere before it (a damaged file) would have it cut committed rows and write over
  // them, where read_trace refuses the same file.
  const int64_t n = int64_t(dims[0]);
  const auto raw = read_rows_raw(cx, offsets_dset, kOffsets, H5T_NATIVE_INT64, sizeof(int64_t), n, 1, false);
  std::vector<int64_t> offsets(static_cast<size_t>(n));
  std::memcpy(offsets.data(), raw.data(), raw.size());
  if (offsets[0] != 0) cx.damaged(fmt::format("/{} starts at {}, not 0", kOffsets, offsets[0]));
  for (int64_t i = 1; i < n; ++i)
    if (offsets[size_t(i)] < offsets[size_t(i) - 1])
      cx.damaged(fmt::format("/{} decreases at entry {} ({} after {})", kOffsets, i, offsets[size_t(i)],
                             offsets[size_t(i) - 1]));
  return {n - 1, offsets.back()};
}

void check_rows_cover(const H5Context& cx, const Committed& c, std::initializer_list<std::pair<hid_t, const char*>> row_sets,
                      hid_t domain) {
  for (auto [dset, name] : row_sets)
    if (dset >= 0 && int64_t(dims_of(cx, dset, name).at(0)) < c.tokens)
      cx.damaged(fmt::format("/{} has fewer rows than /sequence_offsets says ({})", name, c.tokens));
  if (int64_t(dims_of(cx, domain, kDomain).at(0)) < c.sequences)
    cx.damaged(fmt::format("/sequence_domain is shorter than the {} sequences", c.sequences));
}

}  // namespace moelab::analysis::h5
