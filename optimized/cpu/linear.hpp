#pragma once
// Y = X · Wᵀ with NF4 W, FP32 X and Y, on all threads. Decode-sized batches stream each packed weight
// byte once per token through the GEMV kernel, row chunk by row chunk so a chunk stays in cache across
// tokens; larger batches dequantize row tiles into a per-thread buffer and multiply with Eigen's
// blocked GEMM.
#include "core/engine.hpp"
#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu {

// X: [n, cols]; returns [n, rows].
MatrixRF nf4_linear(Isa isa, const Nf4Matrix& w, const MatrixRF& x);

// Batches up to this many tokens use the GEMV path.
inline constexpr int kGemvMaxTokens = 4;

}  // namespace moelab::cpu
