#include "optimized/cuda/weight_arena.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace moelab::cuda {

int64_t WeightArena::reserve(int64_t bytes) {
  const int64_t at = align_up(end_, kArenaAlign);
  end_ = at + bytes;
  return at;
}

int64_t WeightArena::add_raw(int64_t bytes) {
  if (bytes < 0) throw Error("weight arena: negative size");
  return reserve(bytes);
}

int WeightArena::add(std::string name, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0 || cols % 32 != 0)
    throw Error(fmt::format("weight arena: {} is [{}, {}]; the cuda-nf4 GEMV needs columns in multiples of 32",
                            name, rows, cols));
  Nf4Region r;
  r.name = std::move(name);
  r.rows = rows;
  r.cols = cols;
  const int64_t n = rows * cols;
  r.codes_bytes = (n + 1) / 2;
  r.absmax_count = (n + kNf4Block - 1) / kNf4Block;
  r.codes_offset = reserve(r.codes_bytes);
  r.absmax_offset = reserve(r.absmax_count * int64_t(sizeof(float)));
  regions_.push_back(std::move(r));
  return int(regions_.size()) - 1;
}

}  // namespace moelab::cuda
