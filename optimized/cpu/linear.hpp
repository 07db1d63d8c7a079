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

// Work below this many multiply-adds (about a tenth of a millisecond on one core) runs on the calling
// thread. A parallel region costs microseconds on an idle machine, but when another process holds the
// cores its barrier waits for a descheduled thread: with 2 threads beside a busy trainer, parallel
// regions of ~1M MACs made a small model's eval 100x slower than one thread (0.3 s -> 31 s).
inline constexpr int64_t kMinParallelMacs = int64_t(1) << 22;

// Y = X · Wᵀ with FP32 W (the lm_head and embedding cpu-nf4 keeps in full precision). Eigen runs a
// matrix-vector product on one thread; for Mixtral's 32000 x 4096 lm_head (524 MB read per decoded
// token) that alone would take a fifth of a decode step, so few-token products split W's rows over
// the threads.
MatrixRF fp32_linear(const MatrixRF& x, const MatrixRF& w);

// Batches up to this many tokens use the GEMV path.
inline constexpr int kGemvMaxTokens = 4;

}  // namespace moelab::cpu
