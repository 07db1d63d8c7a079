#pragma once
// Tokens grouped by expert, the index maps the cuda-nf4 MoE stage needs (host-callable, no CUDA).
//
// The router picks top_k experts per token. To run each expert once on all its tokens (a GEMM, not n
// GEMVs) the (token, rank) pairs are sorted by expert: rows [offsets[e], offsets[e+1]) of the grouped
// buffer belong to expert e. `token[r]` says which token row r gathers from, `rank[r]` which of that
// token's choices it is (so its gate is gates[token, rank]), and `row_of[t * top_k + k]` is the
// inverse permutation used to scatter-add the expert outputs back in a fixed order (deterministic:
// within an expert, rows are in increasing token order, so results do not depend on thread timing).
#include <cstdint>
#include <span>
#include <vector>

namespace moelab::cuda {

struct ExpertGroups {
  int num_experts = 0;
  int top_k = 0;
  std::vector<int32_t> offsets;  // [num_experts + 1], offsets[e+1] - offsets[e] = tokens routed to e
  std::vector<int32_t> token;    // [n * top_k] source token of each grouped row
  std::vector<int32_t> rank;     // [n * top_k] which choice (0 = highest probability) the row is
  std::vector<int32_t> row_of;   // [n * top_k] grouped row of (token t, choice k) at t * top_k + k
  int count(int expert) const { return offsets[expert + 1] - offsets[expert]; }
};

// experts: [n, top_k] row-major chosen experts. Throws moelab::Error on an expert outside
// [0, num_experts) or the same expert chosen twice for one token (the router never does that).
ExpertGroups group_by_expert(std::span<const int32_t> experts, int top_k, int num_experts);

}  // namespace moelab::cuda
