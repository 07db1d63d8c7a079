#pragma once
// One table of op cases, as llama.cpp's test-backend-ops has: the matrix shapes and token counts every
// backend's kernels are run on against a float64 host result (tests/ops/test_op_table.cpp for the CPU
// kernel sets, tests/ops/test_op_table_cuda.cpp for the device), and the shapes the benchmarks time
// (benchmarks/bench_kernels.cpp registers the rows marked `benchmark`). A plain header: no test or
// benchmark library needed to read it.
#include <cstdint>

namespace moelab::ops {

struct MatrixShape {
  const char* name;
  int64_t rows, cols;
  int blocksize;
  bool double_quant;
  bool benchmark;  // a Mixtral-8x7B matrix: benchmarked, and tested at one token (a float64 sum of 59M terms)
};

inline constexpr MatrixShape kMatrixShapes[] = {
    // Mixtral-8x7B's matrices.
    {"w1_w3", 14336, 4096, 64, true, true},
    {"w2", 4096, 14336, 64, true, true},
    {"q_o", 4096, 4096, 64, true, true},
    {"k_v", 1024, 4096, 64, true, true},
    // Every blocksize bitsandbytes allows, rows that begin inside a block, widths that are not a
    // multiple of any vector (scalar tails, kernels' fallbacks), one row, and > 8192 columns with a
    // block other than 64 (AVX-512's four-row kernel with x beyond L1).
    {"bs32_rows_mid_block", 33, 160, 32, true, false},
    {"bs64_one_row", 1, 64, 64, true, false},
    {"bs64_cols96", 7, 96, 64, false, false},
    {"bs64_cols40", 4, 40, 64, true, false},
    {"bs64_cols7", 3, 7, 64, true, false},
    {"bs64_4096_plus_64", 5, 4160, 64, true, false},
    {"bs128", 3, 640, 128, true, false},
    {"bs256", 2, 1024, 256, false, false},
    {"bs512", 3, 1024, 512, true, false},
    {"bs1024", 2, 2048, 1024, true, false},
    {"bs2048", 3, 6144, 2048, true, false},
    {"bs4096", 2, 8192, 4096, true, false},
    {"w2_like_bs128", 11, 8192 + 128, 128, true, false},
    {"w2_wide_bs64", 9, 14336, 64, true, false},
};

// Tokens per call: decode (1), the multi-token kernels (2-8), the FP32 path's switch from GEMV to the
// dequantize + GEMM prefill path (above 4), and prefill tiles (16, 64).
inline constexpr int kTokenCounts[] = {1, 2, 3, 4, 5, 6, 7, 8, 16, 64};

}  // namespace moelab::ops
