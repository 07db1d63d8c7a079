#pragma once
// cpu-nf4's decoder-layer ops around the NF4 products, as free functions over plain arguments so the op
// table (tests/ops) can run each against a float64 result and the benchmarks can time them: RMSNorm,
// rotate-half RoPE, GQA attention over a KV cache (causal, optional sliding window) and the router's
// softmax -> top-k -> renormalize. FP32 throughout. The engine (engine.cpp) calls exactly these.
//
// These are cpu-nf4's own implementations, kept apart from reference/model.cpp on purpose: `moelab diff`
// and the engine tests compare the two layer by layer, and code shared between them would carry one bug
// into both sides of the comparison unseen. Do not merge them.
#include <span>
#include <vector>

#include "core/engine.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::cpu {

// out[t] = (x[t] * (1 / sqrt(mean(x[t]^2) + eps))) * weight, per row; out is resized to x's shape (no
// reallocation when it already has it).
void rms_norm(const MatrixRF& x, const Eigen::RowVectorXf& weight, float eps, MatrixRF& out);
inline MatrixRF rms_norm(const MatrixRF& x, const Eigen::RowVectorXf& weight, float eps) {
  MatrixRF out;
  rms_norm(x, weight, eps, out);
  return out;
}

// RoPE's inverse frequencies, head_dim / 2 of them: 1 / theta^(2i / head_dim), in FP32.
std::vector<float> rope_inv_freq(double theta, int head_dim);

// Rotate-half RoPE in place on x [n, heads * head_dim] for positions start .. start + n - 1: dimension
// d pairs with d + head_dim / 2, angle = float(position) * inv_freq[d] (FP32).
void rope(MatrixRF& x, int heads, int head_dim, int start, std::span<const float> inv_freq);

// GQA attention of q [n, heads * head_dim] (query t at position start + t) over a KV cache
// [>= start + n, kv_heads * head_dim]: query t sees keys p - window < j <= p (window 0: all j <= p),
// scores scaled by 1 / sqrt(head_dim), query head h reads KV head h / (heads / kv_heads). Writes every
// element of out, which must be [n, heads * head_dim]. Rows of the cache no query sees are never read.
// The (query, head) pairs run in parallel on `pool` when the work is large enough (null: the caller).
void attention(const MatrixRF& q, const MatrixRF& k_cache, const MatrixRF& v_cache, int start, int heads,
               int kv_heads, int head_dim, int window, MatrixRF& out, ThreadPool* pool);

// Per row of logits [n, experts]: softmax over all experts, the top_k most probable (equal
// probabilities: the lower index first), gates = their probabilities renormalized to sum to 1.
// experts and gates are resized to [n, top_k] (no reallocation when they already have that shape).
void route_top_k(const MatrixRF& logits, int top_k, MatrixRI& experts, MatrixRF& gates);

}  // namespace moelab::cpu
