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

// Up to this many queries take the split-KV (decode) path; more take the tiled prefill path.
inline constexpr int kMaxDecodeQueries = 4;

// The workspace `attention` needs for these queries (0 on the prefill path).
int64_t attention_workspace_floats(int n, int start, int window, int heads, int head_dim, int sm_count);

// Dispatches to the split-KV decode kernels (n <= kMaxDecodeQueries) or the tiled prefill kernel.
// workspace: at least attention_workspace_floats(...) floats; sm_count: the device's multiprocessors
// (sizes the split); throws moelab::Error on bad shapes or a short workspace.
void attention(const float* q, const float* k_cache, const float* v_cache, int n, int start, int heads, int kv_heads,
               int head_dim, int window, float* out, float* workspace, int64_t workspace_floats, int sm_count,
               cudaStream_t stream);

// The two paths, callable directly (the device tests run both on the same inputs).
void attention_decode_split_kv(const float* q, const float* k_cache, const float* v_cache, int n, int start,
                               int heads, int kv_heads, int head_dim, int window, float* out, float* workspace,
                               int64_t workspace_floats, int sm_count, cudaStream_t stream);
void attention_prefill_tiled(const float* q, const float* k_cache, const float* v_cache, int n, int start, int heads,
                             int kv_heads, int head_dim, int window, float* out, cudaStream_t stream);

}  // namespace moelab::cuda
