#pragma once
// Y = X · Wᵀ with NF4 W, FP32 X and Y, on the engine's thread pool.
//
// Two activation modes (DESIGN.md "Activation precision"):
//  - int8 (the fast path): X quantized per 32 elements, integer dot products with the NF4 codes as int8,
//    every token count (decode and prefill) through the same kernels, tiled so a row chunk of codes
//    stays in cache while a tile of tokens reads it;
//  - fp32 (the exact check mode): up to kGemvMaxTokens tokens stream the packed weights through the
//    FP32 GEMV; more dequantize row tiles and multiply with Eigen's GEMM.
#include <span>
#include <vector>

#include "core/engine.hpp"
#include "core/lora.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::cpu {

enum class Activations { Int8, Fp32 };
Activations parse_activations(const std::string& name);  // "int8", "fp32"
std::string activations_name(Activations a);

struct LinearContext {
  Isa isa = Isa::Scalar;
  Activations activations = Activations::Fp32;
  ThreadPool* pool = nullptr;  // null: the calling thread only
};

// X: [n, cols]; returns [n, rows].
MatrixRF nf4_linear(const LinearContext& ctx, const Nf4Matrix& w, const MatrixRF& x);
// Several matrices applied to the same X (q/k/v, an expert's w1/w3): in the int8 mode X is quantized
// once and all their rows are one parallel section; the results are those of nf4_linear on each.
std::vector<MatrixRF> nf4_linear_many(const LinearContext& ctx, std::span<const Nf4Matrix* const> ws, const MatrixRF& x);
// The FP32 check mode on the process-wide default pool (tests and benchmarks of the FP32 kernels).
MatrixRF nf4_linear(Isa isa, const Nf4Matrix& w, const MatrixRF& x);

// Work below this many multiply-adds (about a tenth of a millisecond on one core) runs on the calling
// thread: handing it to the pool costs more than it saves.
inline constexpr int64_t kMinParallelMacs = int64_t(1) << 22;

// Y = X · Wᵀ with FP32 W (the lm_head and embedding in their exact form), rows split over the pool.
MatrixRF fp32_linear(const MatrixRF& x, const MatrixRF& w, ThreadPool* pool = nullptr);

// FP32-mode batches up to this many tokens use the GEMV path; up to this many tokens per call (or per
// token tile), the int8 path and the lm_head formats read each matrix once and use long read-once work
// items (streaming_row_chunk, row_chunks.hpp).
inline constexpr int kGemvMaxTokens = 4;

// y += scale · (x Aᵀ) Bᵀ in FP32 for a LoRA-adapted weight (peft's unmerged lora.Linear: the base product,
// then lora_B(lora_A(x)) * scaling added); nothing when `lora` is null. x: [n, in], y: [n, out].
void add_lora(const LoraFactors* lora, const MatrixRF& x, MatrixRF& y);

// A pool of physical_cores() threads shared by callers that have none of their own.
ThreadPool& default_pool();

}  // namespace moelab::cpu
