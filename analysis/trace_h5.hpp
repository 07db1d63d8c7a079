#pragma once
// HDF5 helpers of the routing traces (analysis/trace.hpp): owned ids, errors in our words, attribute
// reading and writing that stays safe on damaged files, row datasets, and opening trace files for reading
// and writing. Internal to analysis/trace*.cpp.
//
// Untrusted files. A trace may come from anywhere, damaged or crafted. libhdf5 1.10 trusts some of
// what it reads: a damaged global heap (where variable-length strings live; it has no checksum) makes
// it loop for ever or write out of bounds. So these helpers
//   - never let HDF5 read a variable-length string: strings are written fixed-length, and old files'
//     variable-length strings are read by our own bounds-checked global-heap parser (read_strings);
//   - check every attribute's and dataset's type class, rank and storage size against each other
//     before reading it, and bound what a read may allocate (check_read_size).
// The object headers holding attributes and dataset shapes are checksummed in the format traces use.
#include <fcntl.h>
#include <fmt/format.h>
#include <hdf5.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/error.hpp"

namespace moelab::analysis::h5 {

// Once per process, before any HDF5 use (a static initializer also runs it before main): HDF5's own
// error printing off (errors become one line of ours, see H5Context), no library shutdown at exit
// (after a failed write, 1.10's shutdown closes the half-closed datasets again and crashes; every file
// is closed by its owner before exit, and a writer whose write failed abandons its file on purpose),
// and the conversion that reads variable-length string descriptors raw (read_strings).
void setup();

// An HDF5 id closed (its reference dropped) when it goes out of scope.
class Id {
 public:
  Id() = default;
  explicit Id(hid_t id) : id_(id) {}
  Id(Id&& o) noexcept : id_(o.id_) { o.id_ = -1; }
  Id& operator=(Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      o.id_ = -1;
    }
    return *this;
  }
  ~Id() { reset(); }
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Drops the reference (closing the object when it is the last); negative when HDF5 failed.
  herr_t reset() {
    const herr_t rc = id_ >= 0 ? H5Idec_ref(id_) : 0;
    id_ = -1;
    return rc < 0 ? rc : 0;
  }
  // Forgets the id without closing it (a writer abandoning a file after a failed write).
  void abandon() { id_ = -1; }

 private:
  hid_t id_ = -1;
};

// HDF5's current error stack as one line (its innermost message; for a failed system call, what the
// system said), cleared.
std::string error_text();

// Every HDF5 call goes through one of these, so a failure becomes "<file>: <what>: <hdf5 message>".
struct H5Context {
  std::string path;
  [[noreturn]] void fail(const std::string& what) const;
  [[noreturn]] void damaged(const std::string& what) const;  // "<file>: damaged trace: <what>"
  hid_t id(hid_t id, const std::string& what) const {
    if (id < 0) fail(what);
    return id;
  }
  void ok(herr_t rc, const std::string& what) const {
    if (rc < 0) fail(what);
  }
};

// Layout names.
constexpr const char* kTokens = "tokens";
constexpr const char* kOffsets = "sequence_offsets";
constexpr const char* kDomain = "sequence_domain";
constexpr const char* kExperts = "experts";
constexpr const char* kGates = "gates";
constexpr const char* kLogits = "router_logits";
constexpr const char* kGuess = "prefetch_guess";
inline constexpr uint8_t kNoGuess = 255;  // /prefetch_guess at layer 0: nothing precedes it

Id half_type();           // IEEE binary16, little-endian (what h5py and numpy read as float16)
Id latest_format_fapl();  // file access with the newest format (superblock v3): SWMR needs it

// Shape of a dataset; its rank must be `rank` (else the file is damaged or not a trace).
std::vector<hsize_t> dims_of(const H5Context& cx, hid_t dset, const std::string& name);
std::vector<hsize_t> dims_of(const H5Context& cx, hid_t dset, const std::string& name, int rank);
// Checks a dataset's type class (and, with size > 0, its size), naming the dataset otherwise.
void check_type(const H5Context& cx, hid_t dset, const std::string& name, H5T_class_t cls, const char* what,
                size_t size = 0);
// Refuses to read `bytes` from a dataset holding only `stored` bytes on disk: more than deflate's best
// ratio allows means a shape or chunk index that lies (a crafted file must not make us allocate
// terabytes).
void check_read_size(const H5Context& cx, hid_t dset, const std::string& name, uint64_t bytes);

// Attributes. Strings are written fixed-length (NUL-padded, UTF-8); see the file comment.
void write_string_attr(const H5Context& cx, hid_t obj, const char* name, const std::string& value);
void write_strings_attr(const H5Context& cx, hid_t obj, const char* name, const std::vector<std::string>& values);
void write_int_attr(const H5Context& cx, hid_t obj, const char* name, int64_t value);
// A string or 1-D string array attribute, fixed- or variable-length (older moelab and h5py write
// variable-length); variable-length ones are read without HDF5 touching the global heap.
std::vector<std::string> read_strings(const H5Context& cx, hid_t obj, const std::string& name);
// An attribute as JSON: strings (model_config and runs parsed), integers, floats, 1-D arrays of them;
// null for kinds a trace never holds.
nlohmann::json read_attr_json(const H5Context& cx, hid_t obj, const std::string& name);
nlohmann::json read_all_attrs(const H5Context& cx, hid_t obj);
std::optional<int64_t> read_int_attr(const H5Context& cx, hid_t obj, const char* name);

// Row datasets: [rows, ...row_shape], chunked, shuffled, deflated, unlimited along rows.
Id create_row_dataset(const H5Context& cx, hid_t file, const char* name, hid_t type, std::vector<hsize_t> row_shape,
                      int64_t chunk_tokens, int deflate_level);
Id open_row_dataset(const H5Context& cx, hid_t file, const char* name);
// Writes `rows` rows at row `first`, growing the dataset to first + rows. `data_elems` is how many elements
// `data` holds: a dataset whose rows in the file are of another width (a damaged or foreign trace appended
// to) is an error naming it, never a read past `data`.
void write_rows(const H5Context& cx, hid_t dset, const char* name, hid_t mem_type, const void* data, size_t data_elems,
                int64_t first, int64_t rows);
// Reads rows [0, rows) of a dataset whose row holds `row_elems` elements of `elem_size` bytes, a few
// chunks at a time. An unreadable chunk (a torn index block of a killed writer, damage) throws, naming
// `moelab trace --repair`; with `salvage`, the rows before the first unreadable chunk come back instead.
std::vector<uint8_t> read_rows_raw(const H5Context& cx, hid_t dset, const char* name, hid_t mem_type, size_t elem_size,
                                   int64_t rows, size_t row_elems, bool salvage);
template <typename T>
std::vector<T> read_rows(const H5Context& cx, hid_t dset, const char* name, hid_t mem_type, int64_t rows,
                         size_t row_elems, bool salvage = false) {
  const auto raw = read_rows_raw(cx, dset, name, mem_type, sizeof(T), rows, row_elems, salvage);
  std::vector<T> out(raw.size() / sizeof(T));
  if (!raw.empty()) std::memcpy(out.data(), raw.data(), out.size() * sizeof(T));
  return out;
}
// Reads rows [first, first + rows) (each of `row_elems` elements of `elem_size` bytes) into `out`, throwing
// as read_rows_raw does when HDF5 cannot read them: a streaming reader's block (analysis/trace_stream.hpp).
void read_row_range(const H5Context& cx, hid_t dset, const char* name, hid_t mem_type, size_t elem_size, int64_t first,
                    int64_t rows, size_t row_elems, void* out);
void shrink_rows(const H5Context& cx, hid_t dset, const char* name, int64_t rows);

// Opening files.
// True if a writer left the file open (plain opens fail, an SWMR reader opens it); the caller holds the
// writer lock, so that writer is dead.
bool left_by_dead_writer(const H5Context& cx);
Id open_for_writing(const H5Context& cx);
// Plainly, or, when a writer holds it or died, as an SWMR reader (which HDF5 allows exactly for that).
Id open_for_reading(const H5Context& cx);

// The committed extent of a trace: S sequences ending at token offsets[S]. Rows beyond it in the token
// datasets were written by a writer that died before committing them.
struct Committed {
  int64_t sequences = 0, tokens = 0;
};
Committed read_committed(const H5Context& cx, hid_t offsets_dset);
// Every row dataset must hold at least the committed rows (fewer means damage, not an interruption: a
// flush writes the rows before the offsets).
void check_rows_cover(const H5Context& cx, const Committed& c, std::initializer_list<std::pair<hid_t, const char*>> row_sets,
                      hid_t domain);

std::string utc_now_iso8601();

// ---------------------------------------------------------------------------------------------------
// Shared by the writer and the repair

// An open-file-description lock on the trace, held for a writer's lifetime and dropped by the kernel
// when the process dies. HDF5's own lock cannot serve: SWMR writing releases it so readers can open.
// (OFD locks, unlike classic fcntl locks, survive HDF5 opening and closing its own descriptors.)
class WriterLock {
 public:
  // Opens (creating if absent) and locks `path`; throws if another writer holds it.
  explicit WriterLock(const std::string& path) : path_(path) {
    // (O_NONBLOCK: a FIFO must not block the open; it is refused below. A directory fails with EISDIR.)
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NONBLOCK, 0644);
    if (fd_ < 0) throw Error(fmt::format("{}: cannot open for writing ({})", path, std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd_);
      throw Error(fmt::format("{}: not a regular file; a trace must be one", path));
    }
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    if (::fcntl(fd_, F_OFD_SETLK, &fl) != 0) {
      const int err = errno;
      ::close(fd_);
      if (err == EAGAIN || err == EACCES)
        throw Error(fmt::format("{}: another process is writing this trace", path));
      throw Error(fmt::format("{}: cannot lock ({})", path, std::strerror(err)));
    }
    check_not_abandoned();
  }
  ~WriterLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;
  int64_t size() const {
    struct stat st {};
    return ::fstat(fd_, &st) == 0 ? int64_t(st.st_size) : 0;
  }
  // A writer of this process whose write failed abandoned this file (TraceWriter): HDF5 still holds it
  // open, with whatever that writer had not written, so nothing in this process may write it again.
  void mark_abandoned() const;

 private:
  void check_not_abandoned();

  std::string path_;
  int fd_ = -1;
};

// left_by_dead_writer for a path, with the library set up.
bool left_by_dead_writer_quietly(const std::string& path);

// repair_trace for a caller that holds the writer lock (trace_reader.cpp).
int64_t repair_locked(const std::string& path);

}  // namespace moelab::analysis::h5
