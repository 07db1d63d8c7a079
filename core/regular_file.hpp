#pragma once
// Opening a file a user named (a shard, config.json, an index, tokenizer.model) for reading, safely:
// a FIFO would block open() forever and a directory or device is never what was meant, so the file is
// opened with O_NONBLOCK, its type checked with fstat, and only a regular file is read. Errors name the
// path and say what it is instead.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <fmt/format.h>
#include <string>
#include <system_error>

#include "core/error.hpp"

namespace moelab {

// "a directory", "a FIFO", ... for a message.
inline const char* file_type_name(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

// What `path` is, following links; not_found when nothing is there. Any other failure (a symlink loop, a
// folder that cannot be searched) is a moelab::Error naming the path: std::filesystem's throwing forms
// would end the program as an "internal error" without saying which file the user should look at.
inline std::filesystem::file_type path_type(const std::filesystem::path& path) {
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) return st.type();
  if (ec) throw Error(fmt::format("{}: cannot be read ({})", path.string(), ec.message()));
  return st.type();
}

// Copies the regular file `from` to `to` (replacing it) when `from` exists; a link loop, a FIFO or a folder
// there, or a failed copy, is a moelab::Error naming the file (std::filesystem's throwing forms would end the
// program as an "internal error").
inline void copy_if_present(const std::filesystem::path& from, const std::filesystem::path& to) {
  const auto type = path_type(from);
  if (type == std::filesystem::file_type::not_found) return;
  if (type != std::filesystem::file_type::regular)
    throw Error(fmt::format("{}: not a regular file; nothing was copied from it", from.string()));
  std::error_code ec;
  std::filesystem::copy_file(from, to, std::filesystem::copy_options::overwrite_existing, ec);
  if (ec) throw Error(fmt::format("{}: cannot copy to {} ({})", from.string(), to.string(), ec.message()));
}

// Opens `path` read-only; throws moelab::Error "<path>: cannot open <what> (<reason>)" or
// "<path>: <what> is a FIFO (named pipe), not a regular file" without ever blocking. The returned
// descriptor is blocking again and close-on-exec; `size` receives the file's size.
inline int open_regular_file(const std::string& path, const char* what, uint64_t* size = nullptr) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error(fmt::format("{}: cannot open {} ({})", path, what, std::strerror(errno)));
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw Error(fmt::format("{}: cannot stat {} ({})", path, what, std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(fmt::format("{}: {} is {}, not a regular file", path, what, file_type_name(st.st_mode)));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  if (size) *size = uint64_t(st.st_size);
  return fd;
}

// Reads `path`'s regular file to its end: on_open(size) first, with the size fstat gave (it may refuse by
// throwing), then chunk(data, n) for each piece of up to `chunk_bytes` (which may throw too); the file is
// closed either way. Errors name the path: cannot open, not a regular file, cannot read.
template <class OnOpen, class Chunk>
void read_regular_file_chunks(const std::string& path, const char* what, size_t chunk_bytes, const OnOpen& on_open,
                              const Chunk& chunk) {
  uint64_t size = 0;
  const int fd = open_regular_file(path, what, &size);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  on_open(size);
  const std::unique_ptr<char[]> buf(new char[chunk_bytes]);
  for (;;) {
    const ssize_t n = ::read(fd, buf.get(), chunk_bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(fmt::format("{}: cannot read {} ({})", path, what, std::strerror(errno)));
    if (n == 0) return;
    chunk(buf.get(), size_t(n));
  }
}

// The whole of a regular file, at most `max_bytes` (a config or index larger than that is refused).
inline std::string read_regular_file(const std::string& path, const char* what, uint64_t max_bytes = 1ull << 30) {
  std::string text;
  read_regular_file_chunks(
      path, what, size_t(1) << 16,
      [&](uint64_t size) {
        if (size > max_bytes)
          throw Error(fmt::format("{}: {} is {} bytes, more than the {} bytes allowed", path, what, size, max_bytes));
        text.reserve(size_t(size));
      },
      [&](const char* data, size_t n) {
        text.append(data, n);
        if (text.size() > max_bytes)
          throw Error(fmt::format("{}: {} grew past the {} bytes allowed while being read", path, what, max_bytes));
      });
  return text;
}

}  // namespace moelab
