#pragma once
// One table of op cases, as llama.cpp's test-backend-ops has: the matrix shapes and token counts every
// backend's kernels are run on against a float64 host result (tests/ops/test_op_table.cpp for the CPU
// kernel sets, tests/ops/test_op_table_cuda.cpp for the device), and the shapes the benchmarks time
// (benchmarks/bench_kernels.cpp registers the rows marked `benchmark`). A plain header: no test or
// benchmark library needed to read it.
//
// Two families: the NF4 matrix products (kMatrixShapes x kTokenCounts: GEMV, dequantize, the int8
// path, the GEMM prefill path, the lm_head formats), and the decoder-layer ops around them (RMSNorm,
// RoPE, attention decode and prefill, router top-k; tests/ops/layer_op_checks.hpp holds their inputs,
// float64 results and derived limits, shared by the CPU and device tables).
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
    // Folded in from the former per-kernel tests (test_cpu_kernels.cpp, test_q8_kernels.cpp): a single
    // 32-column group, cols % 128 == 64 (an int8 width only AVX2 takes whole), 4096 + 32, blocks of 4096
    // that span rows (and a matrix smaller than one block), the batch kernels' four-row blocks on a
    // small x (11 rows) and on a w2-like row with blocksize 64.
    {"bs64_cols32", 9, 32, 64, true, false},
    {"bs64_cols128", 9, 128, 64, true, false},
    {"bs64_cols192", 6, 192, 64, true, false},
    {"bs64_4096_plus_32", 5, 4096 + 32, 64, true, false},
    {"bs32_cols384", 4, 384, 32, true, false},
    {"bs128_cols256", 3, 256, 128, false, false},
    {"bs256_cols512", 2, 512, 256, true, false},
    {"bs1024_no_dq", 2, 2048, 1024, false, false},
    {"bs4096_cols512", 2, 512, 4096, true, false},
    {"bs4096_cols6144", 3, 6144, 4096, true, false},
    {"bs64_rows5_cols1024", 5, 1024, 64, true, false},
    // The int8 kernels decode a row's absmax a vector of blocks at a time when blocks of 64 fill whole
    // vectors (8 per AVX2 vector, 16 per AVX-512 one), block by block otherwise: 512 columns take the first
    // on AVX2 and the second on AVX-512; the FP32 absmax (no double quantization) takes the vector path too.
    {"bs64_cols512", 3, 512, 64, true, false},
    {"bs64_no_dq_cols1024", 3, 1024, 64, false, false},
    {"bs64_rows11_cols1024", 11, 1024, 64, true, false},
    {"w2_like_bs64_rows4", 4, 8192 + 128, 64, true, false},
    {"w2_like_bs64", 11, 8192 + 128, 64, true, false},
    {"bs64_cols96_rows5", 5, 96, 64, false, false},
};

// Tokens per call: decode (1), the multi-token kernels (2-8), the FP32 path's switch from GEMV to the
// dequantize + GEMM prefill path (above 4), and prefill tiles (16, 64).
inline constexpr int kTokenCounts[] = {1, 2, 3, 4, 5, 6, 7, 8, 16, 64};

// The FP32 lm_head product (fp32_linear: Eigen's dot products, rows split over the pool): n tokens x a
// [rows, cols] matrix; the sizes straddle the parallel threshold (kMinParallelMacs) and the row chunking
// (rows not a multiple of the chunk).
struct DenseCase {
  const char* name;
  int n;
  int64_t rows, cols;
};
inline constexpr DenseCase kFp32LinearCases[] = {
    {"rows33000_cols128", 1, 33000, 128},
    {"rows5000_cols300", 3, 5000, 300},
    {"rows1500_cols64", 4, 1500, 64},
    {"rows2000_cols96", 9, 2000, 96},
};

// RMSNorm over n rows of `dim` (Mixtral: 4096, eps 1e-5). The rows' inputs are scaled in turn by 1,
// 1e-3, 100 and 0 (an all-zero row: eps alone under the square root).
struct NormCase {
  const char* name;
  int n, dim;
  bool benchmark;
};
inline constexpr NormCase kNormCases[] = {
    {"hidden4096_decode", 1, 4096, true},
    {"hidden4096_prefill64", 64, 4096, true},
    {"hidden4096_n7", 7, 4096, false},
    {"dim1", 4, 1, false},
    {"dim7", 5, 7, false},
    {"dim33", 3, 33, false},
    {"dim4095", 4, 4095, false},
    {"dim14336", 2, 14336, false},
};

// Rotate-half RoPE on n tokens from position `start`, `heads` heads of head_dim (Mixtral: q 32 heads,
// k 8, head_dim 128, theta 1e6). Position 0 (the identity), one rotation pair (head_dim 2), head_dim 64,
// and positions near Mixtral's 32768 context, where the FP32 angle's rounding is largest.
struct RopeCase {
  const char* name;
  int n, start, heads, head_dim;
  double theta;
  bool benchmark;
};
inline constexpr RopeCase kRopeCases[] = {
    {"q_decode_mixtral", 1, 4095, 32, 128, 1e6, true},
    {"k_prefill64_mixtral", 64, 0, 8, 128, 1e6, true},
    {"q_prefill7_at13", 7, 13, 32, 128, 1e6, false},
    {"position0", 1, 0, 3, 64, 1e4, false},
    {"hd64_theta1e4", 5, 1000, 4, 64, 1e4, false},
    {"hd2_one_pair", 3, 2, 5, 2, 1e4, false},
    {"far_positions", 2, 32766, 8, 128, 1e6, false},
};

// GQA attention: n queries at positions start .. start + n - 1 over a KV cache of start + n rows,
// causal, window 0 (none) or a sliding window (query p sees keys p - window < j <= p). n = 1 is decode;
// n > 1 prefill. Mixtral: 32 heads, 8 KV heads, head_dim 128, no window (Mistral-7B's 4096 window).
struct AttentionCase {
  const char* name;
  int n, start, heads, kv_heads, head_dim, window;
  bool benchmark;
};
inline constexpr AttentionCase kAttentionCases[] = {
    {"decode_mixtral_4k", 1, 4095, 32, 8, 128, 0, true},
    {"prefill64_mixtral", 64, 0, 32, 8, 128, 0, true},
    {"decode_position0", 1, 0, 32, 8, 128, 0, false},  // one key: the output is that key's value
    {"decode_odd_777", 1, 777, 32, 8, 128, 0, false},
    {"decode_window37", 1, 300, 32, 8, 128, 37, false},  // window smaller than the sequence
    {"decode_window4096", 1, 5000, 32, 8, 128, 4096, false},
    {"prefill7_causal", 7, 0, 32, 8, 128, 0, false},
    {"prefill13_after50", 13, 50, 32, 8, 128, 0, false},
    {"prefill33_window5", 33, 20, 8, 2, 64, 5, false},  // window smaller than n
    {"hd64_mha", 5, 3, 4, 4, 64, 0, false},
    {"hd64_mqa_window4", 3, 9, 6, 1, 64, 4, false},
    {"window_covers_all", 9, 0, 8, 2, 64, 4096, false},
};

// Router: softmax over `experts` logits per token, the top_k most probable, gates renormalized. Tokens
// cycle through logit patterns (layer_op_checks.hpp): random, an exact tie at the top, an exact tie
// across the top-k boundary, all equal, a near tie (one ulp) across the boundary, one dominant logit.
struct RouterCase {
  const char* name;
  int n, experts, top_k;
  bool benchmark;
};
inline constexpr RouterCase kRouterCases[] = {
    {"mixtral_top2_of_8_decode", 1, 8, 2, true},
    {"mixtral_top2_of_8_prefill64", 64, 8, 2, true},
    {"top1_of_8", 24, 8, 1, false},
    {"top2_of_8", 30, 8, 2, false},
    {"top3_of_5", 12, 5, 3, false},
    {"top8_of_8", 12, 8, 8, false},
};

}  // namespace moelab::ops
