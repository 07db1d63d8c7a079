#pragma once
// cuda-nf4 kernels of the decoder layer around the NF4 products: embedding gather, RoPE, residual add, and the MoE gather / weighted combine. FP32 throughout (first
// version). Host-callable launchers over device pointers; each checks its launch.
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace moelab::cuda {

// out[t] = table[tokens[t]] (rows of `dim`).
void embed(const float* table, const int32_t* tokens, int n, int dim, float* out, cudaStream_t stream);

// Rotate-half RoPE in place on x [n, heads * head_dim] for positions start .. start + n - 1:
// dimension d pairs with d + head_dim / 2; angle = inv_freq[d % (head_dim / 2)] * position (FP32, as
// transformers computes it with autocast off).
void rope(float* x, int n, int heads, int head_dim, int start, const float* inv_freq, cudaStream_t stream);

// y += x (count elements).
void add_inplace(float* y, const float* x, int64_t count, cudaStream_t stream);

// out[r] = x[rows[r]] for r < count (rows of `dim`): gathers one expert's tokens.
void gather_rows(const float* x, const int32_t* rows, int count, int dim, float* out, cudaStream_t stream);

// out[t] += sum_k gates[t, k] * y[row_of[t * top_k + k]] (rows of `dim`), k in rank order: the MoE
// combine, deterministic (a fixed order per token, no atomics).
void moe_combine(const float* y, const int32_t* row_of, const float* gates, int n, int top_k, int dim,
                 float* out, cudaStream_t stream);

}  // namespace moelab::cuda
