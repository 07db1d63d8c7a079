#pragma once
// cuda-nf4 attention over the device KV cache: causal GQA with an optional sliding window, FP32 with an
// online softmax (no limit on the number of keys). Layout: q [n, heads * head_dim]; k/v cache
// [max_context, kv_heads * head_dim] with rows [0, start + n) written; out [n, heads * head_dim]. Query
// t sits at position start + t and sees keys (p - window, p] (window 0: [0, p]); query head h reads KV
// head h / (heads / kv_heads), as transformers' repeat_kv; scores are scaled by 1 / sqrt(head_dim).
// head_dim <= 256. Launchers check their launches and never synchronize.
#include <cstdint>

#include "optimized/cuda/attention_plan.hpp"

typedef struct CUstream_st* cudaStream_t;

namespace moelab::cuda {

// Up to this many queries take the split-KV (decode) path; more take the tiled prefill path. Decode
// gives each (query, head) pair its own blocks, which pays while n * heads alone cannot fill the GPU;
// prefill shares each staged key tile among kPrefillQueries queries, which pays once there are several.
inline constexpr int kMaxDecodeQueries = 4;

// The workspace `attention` needs for these queries (0 on the prefill path).
int64_t attention_workspace_floats(int n, int start, int window, int heads, int head_dim, int sm_count);

// Dispatches to the split-KV decode kernels (n <= kMaxDecodeQueries) or the tiled prefill kernel.
// workspace: device memory of at least attention_workspace_floats(n, start, window, heads, head_dim,
// sm_count) floats (unused, may be null, on the prefill path); sm_count: the device's multiprocessors
// (sizes the split; the same value must size the workspace). Throws moelab::Error on bad shapes
// (heads % kv_heads, head_dim outside 1 .. 256, n < 1, start < 0, window < 0) or a short workspace,
// before launching anything. Asynchronous on `stream`.
void attention(const float* q, const float* k_cache, const float* v_cache, int n, int start, int heads, int kv_heads,
               int head_dim, int window, float* out, float* workspace, int64_t workspace_floats, int sm_count,
               cudaStream_t stream);

// The two paths, callable directly (the device tests run both on the same inputs). The decode path
// takes any n (up to 65535) and needs the workspace; the prefill path needs none.
void attention_decode_split_kv(const float* q, const float* k_cache, const float* v_cache, int n, int start,
                               int heads, int kv_heads, int head_dim, int window, float* out, float* workspace,
                               int64_t workspace_floats, int sm_count, cudaStream_t stream);
void attention_prefill_tiled(const float* q, const float* k_cache, const float* v_cache, int n, int start, int heads,
                             int kv_heads, int head_dim, int window, float* out, cudaStream_t stream);

}  // namespace moelab::cuda
