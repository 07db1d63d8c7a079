#pragma once
// Tile bookkeeping for the cuda-nf4 prefill path (host-callable, no CUDA): an NF4 weight [rows, cols]
// is dequantized a band of rows at a time into a scratch buffer of at most `scratch_elems` FP16
// values, and each band feeds one cuBLAS GEMM (Y[:, band] = X * band^T). Bands are whole multiples of
// `row_align` rows (64: a dequantization block never straddles two bands when cols is a multiple of
// 64, and GEMM tiles stay full), except the last, which takes what remains.
#include <cstdint>
#include <vector>

namespace moelab::cuda {

struct RowBand {
  int64_t row_begin = 0, rows = 0;
};

// Throws moelab::Error when the scratch cannot hold even `row_align` rows.
std::vector<RowBand> plan_row_bands(int64_t rows, int64_t cols, int64_t scratch_elems, int64_t row_align = 64);

}  // namespace moelab::cuda
