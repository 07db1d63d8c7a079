// Decoder-layer kernels of cuda-nf4 (see layer_kernels.hpp for the contracts).
#include <cuda_runtime.h>

#include <cmath>

#include "optimized/cuda/check.hpp"
#include "optimized/cuda/layer_kernels.hpp"

namespace moelab::cuda {
namespace {

int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return int(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

__global__ void embed_kernel(const float* table, const int32_t* tokens, int n, int dim, float* out) {
  const int64_t total = int64_t(n) * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = table[int64_t(tokens[i / dim]) * dim + i % dim];
}

__global__ void rope_kernel(float* x, int n, int heads, int head_dim, int start, const float* inv_freq) {
  const int half = head_dim / 2;
  const int64_t total = int64_t(n) * heads * half;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int d = int(i % half);
    const int64_t th = i / half;  // token * heads + head
    const int t = int(th / heads);
    const float angle = inv_freq[d] * float(start + t);  // FP32 product, as transformers
    const float c = cosf(angle), s = sinf(angle);
    float* v = x + th * head_dim;
    const float a = v[d], b = v[d + half];
    v[d] = a * c - b * s;         // x * cos + rotate_half(x) * sin, rotate_half = (-x2, x1)
    v[d + half] = b * c + a * s;
  }
}

__global__ void add_kernel(float* y, const float* x, int64_t count) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

__global__ void gather_kernel(const float* x, const int32_t* rows, int count, int dim, float* out) {
  const int64_t total = int64_t(count) * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = x[int64_t(rows[i / dim]) * dim + i % dim];
}

__global__ void combine_kernel(const float* y, const int32_t* row_of, const float* gates, int n, int top_k, int dim,
                               float* out) {
  const int64_t total = int64_t(n) * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / dim, c = i % dim;
    float acc = 0.0f;
    for (int k = 0; k < top_k; ++k) acc += gates[t * top_k + k] * y[int64_t(row_of[t * top_k + k]) * dim + c];
    out[i] += acc;
  }
}

}  // namespace

void embed(const float* table, const int32_t* tokens, int n, int dim, float* out, cudaStream_t stream) {
  embed_kernel<<<grid_for(int64_t(n) * dim, 256), 256, 0, stream>>>(table, tokens, n, dim, out);
  MOELAB_CUDA_CHECK_LAUNCH("embed");
}

void rope(float* x, int n, int heads, int head_dim, int start, const float* inv_freq, cudaStream_t stream) {
  rope_kernel<<<grid_for(int64_t(n) * heads * (head_dim / 2), 256), 256, 0, stream>>>(x, n, heads, head_dim, start,
                                                                                      inv_freq);
  MOELAB_CUDA_CHECK_LAUNCH("rope");
}

void add_inplace(float* y, const float* x, int64_t count, cudaStream_t stream) {
  add_kernel<<<grid_for(count, 256), 256, 0, stream>>>(y, x, count);
  MOELAB_CUDA_CHECK_LAUNCH("add_inplace");
}

void gather_rows(const float* x, const int32_t* rows, int count, int dim, float* out, cudaStream_t stream) {
  if (count <= 0) return;
  gather_kernel<<<grid_for(int64_t(count) * dim, 256), 256, 0, stream>>>(x, rows, count, dim, out);
  MOELAB_CUDA_CHECK_LAUNCH("gather_rows");
}

void moe_combine(const float* y, const int32_t* row_of, const float* gates, int n, int top_k, int dim, float* out,
                 cudaStream_t stream) {
  combine_kernel<<<grid_for(int64_t(n) * dim, 256), 256, 0, stream>>>(y, row_of, gates, n, top_k, dim, out);
  MOELAB_CUDA_CHECK_LAUNCH("moe_combine");
}

}  // namespace moelab::cuda
