#pragma once
// cuda-nf4 kernels, host-callable launchers over device pointers (first version: FP32 activations with
// FP32 accumulation; NF4 weights in the bitsandbytes layout with plain FP32 absmax per block of 64).
// Every launcher checks its launch and throws moelab::Error on failure; none synchronizes.
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace moelab::cuda {

// y[r] = sum_c dequant(W)[r, c] * x[c] for a [rows, cols] NF4 matrix, cols a multiple of 32 (the weight
// arena enforces it). One warp per row; each lane reads 16 packed bytes (32 codes) per 16-byte load, so
// every packed byte is read once; the 16-entry code table lives in shared memory.
void nf4_gemv(const uint8_t* codes, const float* absmax, int64_t rows, int64_t cols, const float* x, float* y,
              cudaStream_t stream);

// Dequantizes rows [row_begin, row_begin + rows) of a [*, cols] NF4 matrix into out (row-major, FP32):
// the scratch band of the prefill path (prefill_tiles.hpp plans the bands).
void nf4_dequantize_rows(const uint8_t* codes, const float* absmax, int64_t row_begin, int64_t rows, int64_t cols,
                         float* out, cudaStream_t stream);

// out[t] = weight * (x[t] * rsqrt(mean(x[t]^2) + eps)), n rows of `dim`; one block per row.
void rms_norm(const float* x, const float* weight, int n, int dim, float eps, float* out, cudaStream_t stream);

// h[t, i] = silu(g[t, i]) * u[t, i] for gate_up laid out [n, 2 * dim] (gate then up), out [n, dim].
void swiglu(const float* gate_up, int n, int dim, float* out, cudaStream_t stream);

// Per token: softmax over `experts` router logits, top_k largest (ties to the lower index, as
// torch.topk on CUDA does for distinct values), gates renormalized to sum to 1. experts <= 64.
void router_topk(const float* logits, int n, int experts, int top_k, int32_t* chosen, float* gates,
                 cudaStream_t stream);

}  // namespace moelab::cuda
