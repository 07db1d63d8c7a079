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

// One block per (query token, head). Scores for the visible keys in shared memory, then a softmax and
// the weighted sum of values, threads over the head dimension.
__global__ void attention_kernel(const float* q, const float* kc, const float* vc, int start, int heads, int kv_heads,
                                 int head_dim, int window, float* out) {
  extern __shared__ float scores[];
  __shared__ float red[32];
  const int t = blockIdx.x / heads, h = blockIdx.x % heads;
  const int kvh = h / (heads / kv_heads);  // repeat_kv: query head h uses KV head h / groups
  const int p = start + t;
  const int first = window > 0 ? max(0, p - window + 1) : 0;
  const int count = p - first + 1;
  const float* qv = q + (int64_t(t) * heads + h) * head_dim;
  const float scale = rsqrtf(float(head_dim));
  const int kv_stride = kv_heads * head_dim;
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    const float* kv = kc + int64_t(first + j) * kv_stride + kvh * head_dim;
    float s = 0.0f;
    for (int d = 0; d < head_dim; ++d) s += qv[d] * kv[d];
    scores[j] = s * scale;
  }
  __syncthreads();
  // max
  float m = -INFINITY;
  for (int j = threadIdx.x; j < count; j += blockDim.x) m = fmaxf(m, scores[j]);
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_down_sync(0xFFFFFFFFu, m, off));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float mm = red[0];
    for (int w = 1; w < int(blockDim.x / 32); ++w) mm = fmaxf(mm, red[w]);
    red[0] = mm;
  }
  __syncthreads();
  m = red[0];
  __syncthreads();
  float sum = 0.0f;
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    const float e = expf(scores[j] - m);
    scores[j] = e;
    sum += e;
  }
  for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xFFFFFFFFu, sum, off);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float ss = 0.0f;
    for (int w = 0; w < int(blockDim.x / 32); ++w) ss += red[w];
    red[0] = ss;
  }
  __syncthreads();
  const float inv = 1.0f / red[0];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < count; ++j) acc += scores[j] * vc[int64_t(first + j) * kv_stride + kvh * head_dim + d];
    out[(int64_t(t) * heads + h) * head_dim + d] = acc * inv;
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

void attention(const float* q, const float* k_cache, const float* v_cache, int n, int start, int heads, int kv_heads,
               int head_dim, int window, float* out, cudaStream_t stream) {
  if (heads % kv_heads != 0) throw Error("cuda-nf4: attention heads must be a multiple of kv_heads");
  const int keys = window > 0 ? std::min(window, start + n) : start + n;
  const size_t shared = size_t(keys) * sizeof(float);
  static constexpr size_t kMaxShared = 48 * 1024;  // without opting in to more: 12288 keys
  if (shared > kMaxShared)
    throw Error("cuda-nf4: attention over " + std::to_string(keys) +
                " keys exceeds this first kernel's shared-memory score buffer (12288 keys)");
  attention_kernel<<<n * heads, 128, shared, stream>>>(q, k_cache, v_cache, start, heads, kv_heads, head_dim, window,
                                                       out);
  MOELAB_CUDA_CHECK_LAUNCH("attention");
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
