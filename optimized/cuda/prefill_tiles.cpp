#include "optimized/cuda/prefill_tiles.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.hpp"

namespace moelab::cuda {

std::vector<RowBand> plan_row_bands(int64_t rows, int64_t cols, int64_t scratch_elems, int64_t row_align) {
  if (rows <= 0 || cols <= 0 || row_align <= 0) throw Error("plan_row_bands: empty shape");
  const int64_t fit = scratch_elems / cols / row_align * row_align;  // whole aligned bands that fit
  if (scratch_elems < std::min(rows, row_align) * cols)
    throw Error(fmt::format("plan_row_bands: a scratch of {} values cannot hold {} rows of {}", scratch_elems,
                            std::min(rows, row_align), cols));
  const int64_t band = std::max<int64_t>(fit, std::min(rows, row_align));
  std::vector<RowBand> out;
  for (int64_t r = 0; r < rows; r += band) out.push_back({r, std::min(band, rows - r)});
  return out;
}

}  // namespace moelab::cuda
