#include "core/safetensors_shards.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace moelab {

namespace fs = std::filesystem;

SafetensorsShardWriter::SafetensorsShardWriter(fs::path dir, int64_t shard_bytes,
                                               std::map<std::string, std::string> metadata)
    : dir_(std::move(dir)), spill_path_(dir_ / ".spill.tmp"), limit_(shard_bytes), metadata_(std::move(metadata)) {
  spill_fd_ = ::open(spill_path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (spill_fd_ < 0) throw Error(fmt::format("{}: cannot create ({})", spill_path_.string(), std::strerror(errno)));
}

SafetensorsShardWriter::~SafetensorsShardWriter() {
  if (spill_fd_ >= 0) ::close(spill_fd_);
  std::error_code ec;
  fs::remove(spill_path_, ec);
}

void SafetensorsShardWriter::add(const TensorToWrite& t) {
  const auto size = int64_t(t.data.size());
  if (!pending_.empty() && bytes_ + size > limit_) flush();
  const auto offset = uint64_t(bytes_);
  write_all(spill_fd_, t.data.data(), t.data.size(), spill_path_.string());
  pending_.push_back({TensorLayout{t.name, t.dtype, t.shape, uint64_t(size)}, offset});
  bytes_ += size;
  total_ += size;
}

void SafetensorsShardWriter::flush() {
  if (pending_.empty()) return;
  const auto path = dir_ / fmt::format("shard-{}.safetensors.part", parts_.size());
  std::vector<TensorLayout> layouts;
  for (const auto& p : pending_) layouts.push_back(p.layout);
  std::vector<char> buffer(size_t(8) << 20);
  write_safetensors_streamed(path.string(), layouts, metadata_, [&](size_t i, int out_fd) {
    uint64_t at = pending_[i].offset, left = pending_[i].layout.size;
    while (left > 0) {
      const ssize_t n = ::pread(spill_fd_, buffer.data(), std::min<uint64_t>(left, buffer.size()), off_t(at));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        throw Error(fmt::format("{}: cannot read back ({})", spill_path_.string(), n < 0 ? std::strerror(errno) : "short file"));
      write_all(out_fd, buffer.data(), size_t(n), path.string());
      at += uint64_t(n);
      left -= uint64_t(n);
    }
  });
  std::vector<std::string> names;
  for (const auto& p : pending_) names.push_back(p.layout.name);
  parts_.emplace_back(path, std::move(names));
  pending_.clear();
  bytes_ = 0;
  if (::ftruncate(spill_fd_, 0) != 0 || ::lseek(spill_fd_, 0, SEEK_SET) != 0)
    throw Error(fmt::format("{}: cannot reuse ({})", spill_path_.string(), std::strerror(errno)));
}

void SafetensorsShardWriter::finish() {
  flush();
  ::close(spill_fd_);
  spill_fd_ = -1;
  std::error_code ec;
  fs::remove(spill_path_, ec);
  if (parts_.size() == 1) {
    fs::rename(parts_[0].first, dir_ / "model.safetensors");
    return;
  }
  nlohmann::json index = {{"metadata", {{"total_size", total_}}}, {"weight_map", nlohmann::json::object()}};
  for (size_t i = 0; i < parts_.size(); ++i) {
    const auto name = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, parts_.size());
    fs::rename(parts_[i].first, dir_ / name);
    for (const auto& tensor : parts_[i].second) index["weight_map"][tensor] = name;
  }
  write_file_atomic((dir_ / "model.safetensors.index.json").string(), index.dump(2) + "\n");
}

}  // namespace moelab
