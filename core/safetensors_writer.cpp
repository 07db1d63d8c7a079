#include "core/safetensors_writer.hpp"

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

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Refuse anything the reader would reject: duplicate names, the reserved "__metadata__" key,
  // negative dimensions, sizes that are not whole bytes, data that does not match the shape.
  std::vector<const TensorToWrite*> order;
  std::set<std::string> names;
  for (const auto& t : tensors) {
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
    if (t.data.size() != expect)
      throw Error(fmt::format("{}: tensor '{}' has {} bytes of data, its shape needs {}", path, t.name,
                              t.data.size(), expect));
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) {
    const int aa = dtype_bits(a->dtype), bb = dtype_bits(b->dtype);
    return aa != bb ? aa > bb : a->name < b->name;
  });

  // Build the header by hand so entries appear in offset order (nlohmann sorts object keys).
  std::string header = "{";
  if (!metadata.empty()) header += "\"__metadata__\":" + nlohmann::json(metadata).dump();
  uint64_t offset = 0;
  for (const auto* t : order) {
    if (header.size() > 1) header += ",";
    nlohmann::json entry = {{"dtype", std::string(dtype_name(t->dtype))},
                            {"shape", t->shape},
                            {"data_offsets", {offset, offset + t->data.size()}}};
    header += nlohmann::json(t->name).dump() + ":" + entry.dump();
    offset += t->data.size();
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');

  std::string bytes;
  bytes.reserve(8 + header.size() + offset);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes.push_back(char((n >> (8 * i)) & 0xff));
  bytes += header;
  for (const auto* t : order) bytes.append(reinterpret_cast<const char*>(t->data.data()), t->data.size());
  write_file_atomic(path, bytes);
}

}  // namespace moelab
