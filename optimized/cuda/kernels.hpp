#pragma once
// cuda-nf4 kernels, host-callable launchers over device pointers. NF4 weights in the bitsandbytes layout
// with plain FP32 absmax per block of 64; the inputs of the weight products (activations) in BF16 or
// FP32, always with FP32 accumulation and FP32 outputs. Every launcher checks its launch and throws
// moelab::Error on failure; none synchronizes.
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace moelab::cuda {

// The element type of an activation buffer that feeds a weight product. BF16 is the production choice
// (Mixtral's own dtype; tensor-core GEMMs in the prefill); FP32 is the exact mode the device tests use
// to check the kernels' arithmetic against the reference to FP32 rounding.
enum class ActType { f32, bf16 };
inline int act_bytes(ActType t) { return t == ActType::bf16 ? 2 : 4; }

// y[r] = sum_c dequant(W)[r, c] * x[c] for a [rows, cols] NF4 matrix, cols a multiple of 32 (the weight
// arena enforces it). One warp per row; each lane reads 16 packed bytes (32 codes) per 16-byte load, so
// every packed byte is read once; the 16-entry code table lives in shared memory.
void nf4_gemv(const uint8_t* codes, const float* absmax, int64_t rows, int64_t cols, const float* x, float* y,
              cudaStream_t stream);
// The same with x of either activation type (BF16 x is widened to FP32 as it is read).
void nf4_gemv(const uint8_t* codes, const float* absmax, int64_t rows, int64_t cols, const void* x, ActType x_type,
              float* y, cudaStream_t stream);

// Dequantizes rows [row_begin, row_begin + rows) of a [*, cols] NF4 matrix into out (row-major, FP32):
// the scratch band of the prefill path (prefill_tiles.hpp plans the bands).
void nf4_dequantize_rows(const uint8_t* codes, const float* absmax, int64_t row_begin, int64_t rows, int64_t cols,
                         float* out, cudaStream_t stream);
// The same into BF16 (code * absmax computed in FP32, then rounded to nearest even): the tensor-core band.
void nf4_dequantize_rows(const uint8_t* codes, const float* absmax, int64_t row_begin, int64_t rows, int64_t cols,
                         void* out, ActType out_type, cudaStream_t stream);

// out[i] = x[i] as `type` (round to nearest even for BF16; a plain copy for FP32).
void convert_activations(const float* x, int64_t count, void* out, ActType type, cudaStream_t stream);

// out[t] = weight * (x[t] * rsqrt(mean(x[t]^2) + eps)), n rows of `dim`; one block per row.
void rms_norm(const float* x, const float* weight, int n, int dim, float eps, float* out, cudaStream_t stream);

// h[t, i] = silu(g[t, i]) * u[t, i] for gate_up laid out [n, 2 * dim] (gate then up), out [n, dim].
void swiglu(const float* gate_up, int n, int dim, float* out, cudaStream_t stream);

// Per token: softmax over `experts` router logits, top_k largest (ties to the lower index, as
// torch.topk on CUDA does for distinct values), gates renormalized to sum to 1. experts <= 64.
void router_topk(const float* logits, int n, int experts, int top_k, int32_t* chosen, float* gates,
                 cudaStream_t stream);

}  // namespace moelab::cuda
