// cuda-nf4 kernels (see kernels.hpp for the contracts).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "optimized/cuda/check.hpp"
#include "optimized/cuda/code_table.hpp"
#include "optimized/cuda/kernels.hpp"

namespace moelab::cuda {
namespace {

// bitsandbytes' NF4 table (optimized/nf4/code_values.hpp through code_table.hpp), initialized statically
// from the constexpr table (no run-time copy to get wrong or forget, no second list of the values).
#define MOELAB_NF4(i) nf4::kCodeValues[i]
__constant__ float kNf4[16] = {MOELAB_NF4(0),  MOELAB_NF4(1),  MOELAB_NF4(2),  MOELAB_NF4(3),
                               MOELAB_NF4(4),  MOELAB_NF4(5),  MOELAB_NF4(6),  MOELAB_NF4(7),
                               MOELAB_NF4(8),  MOELAB_NF4(9),  MOELAB_NF4(10), MOELAB_NF4(11),
                               MOELAB_NF4(12), MOELAB_NF4(13), MOELAB_NF4(14), MOELAB_NF4(15)};
#undef MOELAB_NF4

constexpr int kWarp = 32;
constexpr int kGemvWarps = 4;  // rows per block

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class X>
__global__ void nf4_gemv_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax, int64_t rows,
                                int64_t cols, const X* __restrict__ x, float* __restrict__ y) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = kNf4[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
  if (row >= rows) return;
  // cols % 32 == 0, so a row is whole 16-byte vectors and starts 16-byte aligned (arena regions are
  // 256-aligned and cols / 2 is a multiple of 16).
  const int64_t first = row * cols;  // element index of the row's first value
  const uint4* vec = reinterpret_cast<const uint4*>(codes + first / 2);
  const int64_t nvec = cols / 32;
  float acc = 0.0f;
  for (int64_t v = lane; v < nvec; v += kWarp) {
    const uint4 packed = __ldg(vec + v);
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    const int64_t e0 = first + v * 32;  // 32 elements: all in block e0 / 64 (32 | 64, aligned)
    const float scale = __ldg(absmax + e0 / 64);
    const X* xs = x + (e0 - first);
    float part = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (words[w] >> (8 * b)) & 0xFFu;  // little-endian: byte 4w+b
        const int k = (w * 4 + b) * 2;
        part += table[byte >> 4] * widen(xs[k]) + table[byte & 15u] * widen(xs[k + 1]);  // high nibble first
      }
    }
    acc += part * scale;
  }
  for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, off);
  if (lane == 0) y[row] = acc;
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <class Out>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                                      int64_t first, int64_t count, Out* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = first + i;
    store(out + i, kNf4[nf4::code_at(codes, e)] * absmax[e / 64]);
  }
}

__global__ void to_bf16_kernel(const float* __restrict__ x, int64_t count, __nv_bfloat16* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(x[i]);
}

__global__ void rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ w, int dim, float eps,
                                float* __restrict__ out) {
  __shared__ float partial[32];
  const float* row = x + int64_t(blockIdx.x) * dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += row[i] * row[i];
  for (int off = 16; off > 0; off /= 2) ss += __shfl_down_sync(0xFFFFFFFFu, ss, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    ss = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
    for (int off = 16; off > 0; off /= 2) ss += __shfl_down_sync(0xFFFFFFFFu, ss, off);
    if (threadIdx.x == 0) partial[0] = rsqrtf(ss / float(dim) + eps);
  }
  __syncthreads();
  const float inv = partial[0];
  for (int i = threadIdx.x; i < dim; i += blockDim.x) out[int64_t(blockIdx.x) * dim + i] = w[i] * (row[i] * inv);
}

__global__ void swiglu_kernel(const float* __restrict__ gu, int n, int dim, float* __restrict__ out) {
  const int64_t total = int64_t(n) * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / dim, c = i % dim;
    const float g = gu[t * 2 * dim + c], u = gu[t * 2 * dim + dim + c];
    out[i] = g / (1.0f + expf(-g)) * u;
  }
}

// One thread per token: `experts` is small (8 for Mixtral), so a serial softmax and selection is cheaper
// than any cooperative scheme and matches the reference's order of operations.
__global__ void router_topk_kernel(const float* __restrict__ logits, int n, int experts, int top_k,
                                   int32_t* __restrict__ chosen, float* __restrict__ gates) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const float* l = logits + int64_t(t) * experts;
  float mx = l[0];
  for (int e = 1; e < experts; ++e) mx = fmaxf(mx, l[e]);
  float p[64];
  float sum = 0.0f;
  for (int e = 0; e < experts; ++e) sum += (p[e] = expf(l[e] - mx));
  for (int e = 0; e < experts; ++e) p[e] /= sum;
  uint64_t taken = 0;
  float kept = 0.0f;
  for (int k = 0; k < top_k; ++k) {
    int best = -1;
    for (int e = 0; e < experts; ++e)
      if (!(taken >> e & 1u) && (best < 0 || p[e] > p[best])) best = e;
    taken |= uint64_t(1) << best;
    chosen[int64_t(t) * top_k + k] = best;
    gates[int64_t(t) * top_k + k] = p[best];
    kept += p[best];
  }
  for (int k = 0; k < top_k; ++k) gates[int64_t(t) * top_k + k] /= kept;
}

int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return int(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace

void nf4_gemv(const uint8_t* codes, const float* absmax, int64_t rows, int64_t cols, const void* x, ActType x_type,
              float* y, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || cols % 32 != 0) throw Error("cuda-nf4: nf4_gemv needs cols a positive multiple of 32");
  const unsigned blocks = unsigned((rows + kGemvWarps - 1) / kGemvWarps);
  if (x_type == ActType::bf16)
    nf4_gemv_kernel<<<blocks, kGemvWarps * kWarp, 0, stream>>>(codes, absmax, rows, cols,
                                                               static_cast<const __nv_bfloat16*>(x), y);
  else
    nf4_gemv_kernel<<<blocks, kGemvWarps * kWarp, 0, stream>>>(codes, absmax, rows, cols,
                                                               static_cast<const float*>(x), y);
  MOELAB_CUDA_CHECK_LAUNCH("nf4_gemv");
}

void nf4_gemv(const uint8_t* codes, const float* absmax, int64_t rows, int64_t cols, const float* x, float* y,
              cudaStream_t stream) {
  nf4_gemv(codes, absmax, rows, cols, static_cast<const void*>(x), ActType::f32, y, stream);
}

void nf4_dequantize_rows(const uint8_t* codes, const float* absmax, int64_t row_begin, int64_t rows, int64_t cols,
                         void* out, ActType out_type, cudaStream_t stream) {
  const int64_t count = rows * cols;
  if (count <= 0) return;
  if (out_type == ActType::bf16)
    nf4_dequantize_kernel<<<grid_for(count, 256), 256, 0, stream>>>(codes, absmax, row_begin * cols, count,
                                                                    static_cast<__nv_bfloat16*>(out));
  else
    nf4_dequantize_kernel<<<grid_for(count, 256), 256, 0, stream>>>(codes, absmax, row_begin * cols, count,
                                                                    static_cast<float*>(out));
  MOELAB_CUDA_CHECK_LAUNCH("nf4_dequantize_rows");
}

void nf4_dequantize_rows(const uint8_t* codes, const float* absmax, int64_t row_begin, int64_t rows, int64_t cols,
                         float* out, cudaStream_t stream) {
  nf4_dequantize_rows(codes, absmax, row_begin, rows, cols, static_cast<void*>(out), ActType::f32, stream);
}

void convert_activations(const float* x, int64_t count, void* out, ActType type, cudaStream_t stream) {
  if (count <= 0) return;
  if (type == ActType::f32) {
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(out, x, size_t(count) * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    return;
  }
  to_bf16_kernel<<<grid_for(count, 256), 256, 0, stream>>>(x, count, static_cast<__nv_bfloat16*>(out));
  MOELAB_CUDA_CHECK_LAUNCH("convert_activations");
}

void rms_norm(const float* x, const float* weight, int n, int dim, float eps, float* out, cudaStream_t stream) {
  if (n <= 0) return;
  rms_norm_kernel<<<n, 256, 0, stream>>>(x, weight, dim, eps, out);
  MOELAB_CUDA_CHECK_LAUNCH("rms_norm");
}

void swiglu(const float* gate_up, int n, int dim, float* out, cudaStream_t stream) {
  if (n <= 0) return;
  swiglu_kernel<<<grid_for(int64_t(n) * dim, 256), 256, 0, stream>>>(gate_up, n, dim, out);
  MOELAB_CUDA_CHECK_LAUNCH("swiglu");
}

void router_topk(const float* logits, int n, int experts, int top_k, int32_t* chosen, float* gates,
                 cudaStream_t stream) {
  if (experts < 1 || experts > 64 || top_k < 1 || top_k > experts)
    throw Error("cuda-nf4: router_topk needs 1 <= top_k <= experts <= 64");
  if (n <= 0) return;
  router_topk_kernel<<<(n + 127) / 128, 128, 0, stream>>>(logits, n, experts, top_k, chosen, gates);
  MOELAB_CUDA_CHECK_LAUNCH("router_topk");
}

}  // namespace moelab::cuda
