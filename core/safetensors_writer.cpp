#include "core/safetensors_writer.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.hpp"
#include "core/safetensors.hpp"

namespace moelab {

namespace {
template <typename T>
TensorToWrite make_tensor(std::string name, DType dtype, std::vector<int64_t> shape, const T* values) {
  TensorToWrite t{std::move(name), dtype, std::move(shape), {}};
  t.data.resize(size_t(shape_numel(t.shape)) * sizeof(T));
  if (!t.data.empty()) std::memcpy(t.data.data(), values, t.data.size());
  return t;
}
}  // namespace

TensorToWrite make_f32_tensor(std::string name, std::vector<int64_t> shape, const float* values) {
  return make_tensor(std::move(name), DType::F32, std::move(shape), values);
}
TensorToWrite make_i32_tensor(std::string name, std::vector<int64_t> shape, const int32_t* values) {
  return make_tensor(std::move(name), DType::I32, std::move(shape), values);
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(fmt::format("{}: cannot create ({})", tmp, std::strerror(errno)));
    out.write(contents.data(), std::streamsize(contents.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      throw Error(fmt::format("{}: write failed ({})", tmp, std::strerror(errno)));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw Error(fmt::format("{}: cannot rename into place ({})", path, ec.message()));
  }
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw Error(fmt::format("{}: write failed ({})", path, w < 0 ? std::strerror(errno) : "no progress"));
    p += w;
    n -= size_t(w);
  }
}

void write_safetensors_streamed(const std::string& path, const std::vector<TensorLayout>& tensors,
                                const std::map<std::string, std::string>& metadata, const TensorDataWriter& write_data) {
  // Refuse anything the reader would reject: duplicate names, the reserved "__metadata__" key,
  // negative dimensions, sizes that are not whole bytes, data that does not match the shape.
  std::vector<size_t> order;
  std::set<std::string> names;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (t.name == "__metadata__")
      throw Error(fmt::format("{}: a tensor cannot be named '__metadata__' (reserved key)", path));
    if (!names.insert(t.name).second)
      throw Error(fmt::format("{}: tensor '{}' appears more than once", path, t.name));
    for (auto d : t.shape)
      if (d < 0) throw Error(fmt::format("{}: tensor '{}' has a negative dimension {}", path, t.name, d));
    const unsigned __int128 bits = (unsigned __int128)uint64_t(shape_numel(t.shape)) * uint64_t(dtype_bits(t.dtype));
    if (bits % 8 != 0)
      throw Error(fmt::format("{}: tensor '{}' of {} x {}-bit elements is not a whole number of bytes", path,
                              t.name, shape_numel(t.shape), dtype_bits(t.dtype)));
    const uint64_t expect = uint64_t(bits / 8);
    if (t.size != expect)
      throw Error(fmt::format("{}: tensor '{}' has {} bytes of data, its shape needs {}", path, t.name, t.size, expect));
    order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const int aa = dtype_bits(tensors[a].dtype), bb = dtype_bits(tensors[b].dtype);
    return aa != bb ? aa > bb : tensors[a].name < tensors[b].name;
  });

  // Build the header by hand so entries appear in offset order (nlohmann sorts object keys).
  std::string header = "{";
  if (!metadata.empty()) header += "\"__metadata__\":" + nlohmann::json(metadata).dump();
  uint64_t offset = 0;
  for (const size_t i : order) {
    const auto& t = tensors[i];
    if (header.size() > 1) header += ",";
    nlohmann::json entry = {{"dtype", std::string(dtype_name(t.dtype))},
                            {"shape", t.shape},
                            {"data_offsets", {offset, offset + t.size}}};
    header += nlohmann::json(t.name).dump() + ":" + entry.dump();
    offset += t.size;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');

  // To a temporary name, renamed over `path` only when every byte is written.
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw Error(fmt::format("{}: cannot create ({})", tmp, std::strerror(errno)));
  try {
    char length[8];
    for (int i = 0; i < 8; ++i) length[i] = char((uint64_t(header.size()) >> (8 * i)) & 0xff);
    write_all(fd, length, 8, tmp);
    write_all(fd, header.data(), header.size(), tmp);
    uint64_t at = 8 + header.size();
    for (const size_t i : order) {
      write_data(i, fd);
      at += tensors[i].size;
      const off_t now = ::lseek(fd, 0, SEEK_CUR);
      if (now < 0 || uint64_t(now) != at)
        throw Error(fmt::format("{}: tensor '{}' was not written as {} bytes", tmp, tensors[i].name, tensors[i].size));
    }
    const int closed = ::close(fd);
    fd = -1;
    if (closed != 0) throw Error(fmt::format("{}: write failed ({})", tmp, std::strerror(errno)));
  } catch (...) {
    if (fd >= 0) ::close(fd);
    std::remove(tmp.c_str());
    throw;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw Error(fmt::format("{}: cannot rename into place ({})", path, ec.message()));
  }
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorLayout> layouts;
  layouts.reserve(tensors.size());
  for (const auto& t : tensors) layouts.push_back({t.name, t.dtype, t.shape, uint64_t(t.data.size())});
  write_safetensors_streamed(path, layouts, metadata,
                             [&](size_t i, int fd) { write_all(fd, tensors[i].data.data(), tensors[i].data.size(), path); });
}

}  // namespace moelab
