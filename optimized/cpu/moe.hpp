#pragma once
// The MoE block's expert half on NF4 weights: tokens grouped by expert, each chosen expert run once
// on its tokens (SwiGLU: w2(silu(w1 x) · w3 x)), outputs added back with their gate weights.
#include <vector>

#include "core/engine.hpp"
#include "core/lora.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/linear.hpp"

namespace moelab::cpu {

struct Nf4Expert {
  Nf4Matrix w1, w3, w2;  // [ffn, hidden], [ffn, hidden], [hidden, ffn]
  // A LoRA adapter's factors for each (null: not adapted), owned by the engine's adapter.
  const LoraFactors* w1_lora = nullptr;
  const LoraFactors* w3_lora = nullptr;
  const LoraFactors* w2_lora = nullptr;
};

// x: [n, hidden]; experts, gates: [n, k]. Returns [n, hidden].
MatrixRF moe_block(const LinearContext& ctx, const std::vector<Nf4Expert>& experts, const MatrixRF& x, const MatrixRI& chosen,
                   const MatrixRF& gates);

}  // namespace moelab::cpu
