// cuda-nf4 attention kernels (see attention.hpp and attention_plan.hpp).
//
// Both paths give each (query, head) to warps that walk keys with an online softmax: a running max m,
// a running sum l of exp(s - m) and an output accumulator rescaled by exp(m_old - m_new) whenever the
// max grows. A warp computes one score at a time: lanes hold head_dim / 32 elements of q, multiply by
// the key row (consecutive lanes, consecutive addresses: one coalesced read per key) and sum with xor
// shuffles so every lane has the score. FP32 throughout.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "optimized/cuda/attention.hpp"
#include "optimized/cuda/check.hpp"

namespace moelab::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxHeadDim = 256;
constexpr int kPerLane = kMaxHeadDim / kWarp;  // accumulator elements per lane
constexpr int kDecodeWarps = 4;

__device__ __forceinline__ int first_visible_key_device(int position, int window) {
  return window > 0 ? max(0, position - window + 1) : 0;  // as first_visible_key (attention_plan.cpp)
}

struct OnlineSoftmax {
  float m = -INFINITY, l = 0.0f;
  float acc[kPerLane];
  __device__ OnlineSoftmax() {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  }
  // Adds key with score s and value row v (lane holds d = lane + 32 i).
  __device__ void add(float s, const float* v, int head_dim, int lane) {
    const float m_new = fmaxf(m, s);
    const float scale = __expf(m - m_new);  // m == -inf on the first key: exp(-inf) = 0
    const float p = __expf(s - m_new);
    l = l * scale + p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + kWarp * i;
      acc[i] = acc[i] * scale + (d < head_dim ? p * v[d] : 0.0f);
    }
    m = m_new;
  }
};

__device__ __forceinline__ float warp_dot(const float (&qr)[kPerLane], const float* k, int head_dim, int lane) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + kWarp * i;
    if (d < head_dim) s += qr[i] * k[d];
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
  return s;
}

__device__ __forceinline__ void load_query(const float* q, int head_dim, int lane, float (&qr)[kPerLane]) {
  const float scale = rsqrtf(float(head_dim));
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + kWarp * i;
    qr[i] = d < head_dim ? q[d] * scale : 0.0f;
  }
}

// Grid (splits, heads, n), kDecodeWarps warps. Block: query t, head h, keys of split s that t sees;
// warp w takes every kDecodeWarps-th of them; the warps merge in shared memory and the block writes its
// (m, l, acc[head_dim]) to the workspace at ((t * heads + h) * splits + s) * (head_dim + 2).
__global__ void decode_split_kernel(const float* __restrict__ q, const float* __restrict__ kc,
                                    const float* __restrict__ vc, int start, int heads, int kv_heads, int head_dim,
                                    int window, int first_key, int keys, int keys_per_split, float* __restrict__ work) {
  __shared__ float sm_m[kDecodeWarps], sm_l[kDecodeWarps];
  __shared__ float sm_acc[kDecodeWarps][kMaxHeadDim];
  const int s = blockIdx.x, h = blockIdx.y, t = blockIdx.z, splits = gridDim.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int p = start + t;
  const int kvh = h / (heads / kv_heads);
  const int64_t stride = int64_t(kv_heads) * head_dim;
  const int lo = max(first_key + s * keys_per_split, first_visible_key_device(p, window));
  const int hi = min(first_key + min(keys, (s + 1) * keys_per_split), p + 1);  // exclusive
  float qr[kPerLane];
  load_query(q + (int64_t(t) * heads + h) * head_dim, head_dim, lane, qr);
  OnlineSoftmax st;
  for (int j = lo + warp; j < hi; j += kDecodeWarps) {
    const float* krow = kc + int64_t(j) * stride + int64_t(kvh) * head_dim;
    st.add(warp_dot(qr, krow, head_dim, lane), vc + int64_t(j) * stride + int64_t(kvh) * head_dim, head_dim, lane);
  }
  if (lane == 0) sm_m[warp] = st.m, sm_l[warp] = st.l;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    if (lane + kWarp * i < head_dim) sm_acc[warp][lane + kWarp * i] = st.acc[i];
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) m = fmaxf(m, sm_m[w]);
  float* out = work + ((int64_t(t) * heads + h) * splits + s) * (head_dim + 2);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w)
      if (sm_m[w] != -INFINITY) a += sm_acc[w][d] * __expf(sm_m[w] - m);
    out[2 + d] = a;
  }
  if (threadIdx.x == 0) {
    float l = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w)
      if (sm_m[w] != -INFINITY) l += sm_l[w] * __expf(sm_m[w] - m);
    out[0] = m;  // -inf when this split holds no key the query sees
    out[1] = l;
  }
}

// Grid (heads, n), threads over head_dim: merges the splits of one (query, head).
__global__ void decode_combine_kernel(const float* __restrict__ work, int heads, int head_dim, int splits,
                                      float* __restrict__ out) {
  const int h = blockIdx.x, t = blockIdx.y;
  const float* base = work + (int64_t(t) * heads + h) * splits * (head_dim + 2);
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, base[int64_t(s) * (head_dim + 2)]);
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = base[int64_t(s) * (head_dim + 2)];
    if (ms != -INFINITY) l += base[int64_t(s) * (head_dim + 2) + 1] * __expf(ms - m);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = base[int64_t(s) * (head_dim + 2)];
      if (ms != -INFINITY) a += base[int64_t(s) * (head_dim + 2) + 2 + d] * __expf(ms - m);
    }
    out[(int64_t(t) * heads + h) * head_dim + d] = a / l;  // l > 0: every query sees its own key
  }
}

// Grid (query tiles, heads), kPrefillQueries warps, warp w = query t0 + w. The block stages each key
// tile's K and V rows of its KV head in shared memory (every thread helps), then each warp walks the
// keys of the tile that its query sees. Tile bounds are the same for the whole block, so the
// __syncthreads() calls are in uniform control flow.
__global__ void prefill_kernel(const float* __restrict__ q, const float* __restrict__ kc,
                               const float* __restrict__ vc, int n, int start, int heads, int kv_heads, int head_dim,
                               int window, float* __restrict__ out) {
  extern __shared__ float tile[];  // K then V: [kPrefillKeys][head_dim] each
  float* ks = tile;
  float* vs = tile + kPrefillKeys * head_dim;
  const int h = blockIdx.y, t0 = blockIdx.x * kPrefillQueries;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int t = t0 + warp;
  const bool active = t < n;
  const int p = start + t;
  const int kvh = h / (heads / kv_heads);
  const int64_t stride = int64_t(kv_heads) * head_dim;
  const int count = min(kPrefillQueries, n - t0);
  const int tile_lo = first_visible_key_device(start + t0, window) / kPrefillKeys;
  const int tile_hi = (start + t0 + count - 1) / kPrefillKeys + 1;
  const int my_first = active ? first_visible_key_device(p, window) : 0;
  float qr[kPerLane];
  load_query(q + (int64_t(active ? t : t0) * heads + h) * head_dim, head_dim, lane, qr);
  OnlineSoftmax st;
  const int last_key = start + t0 + count - 1;  // the highest key any query of the tile sees
  for (int tk = tile_lo; tk < tile_hi; ++tk) {
    const int k0 = tk * kPrefillKeys;
    for (int i = threadIdx.x; i < kPrefillKeys * head_dim; i += blockDim.x) {
      const int j = k0 + i / head_dim, d = i % head_dim;
      const bool ok = j <= last_key;  // rows past it may be unwritten
      ks[i] = ok ? kc[int64_t(j) * stride + int64_t(kvh) * head_dim + d] : 0.0f;
      vs[i] = ok ? vc[int64_t(j) * stride + int64_t(kvh) * head_dim + d] : 0.0f;
    }
    __syncthreads();
    if (active) {
      const int lo = max(k0, my_first), hi = min(k0 + kPrefillKeys, p + 1);
      for (int j = lo; j < hi; ++j)
        st.add(warp_dot(qr, ks + (j - k0) * head_dim, head_dim, lane), vs + (j - k0) * head_dim, head_dim, lane);
    }
    __syncthreads();
  }
  if (!active) return;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + kWarp * i;
    if (d < head_dim) out[(int64_t(t) * heads + h) * head_dim + d] = st.acc[i] / st.l;
  }
}

void check_shapes(int n, int start, int heads, int kv_heads, int head_dim) {
  if (n < 1 || start < 0 || heads < 1 || kv_heads < 1 || heads % kv_heads != 0)
    throw Error("cuda-nf4: attention needs n >= 1, start >= 0 and heads a multiple of kv_heads");
  if (head_dim < 1 || head_dim > kMaxHeadDim)
    throw Error("cuda-nf4: attention supports head_dim up to 256, not " + std::to_string(head_dim));
}

}  // namespace

int64_t attention_workspace_floats(int n, int start, int window, int heads, int head_dim, int sm_count) {
  if (n > kMaxDecodeQueries) return 0;
  return attention_workspace_floats(plan_kv_splits(n, start, window, heads, sm_count), n, heads, head_dim);
}

void attention_decode_split_kv(const float* q, const float* k_cache, const float* v_cache, int n, int start,
                               int heads, int kv_heads, int head_dim, int window, float* out, float* workspace,
                               int64_t workspace_floats, int sm_count, cudaStream_t stream) {
  check_shapes(n, start, heads, kv_heads, head_dim);
  const KvSplitPlan plan = plan_kv_splits(n, start, window, heads, sm_count);
  if (workspace_floats < attention_workspace_floats(plan, n, heads, head_dim))
    throw Error("cuda-nf4: attention workspace too small for the split-KV decode");
  decode_split_kernel<<<dim3(unsigned(plan.splits), unsigned(heads), unsigned(n)), kDecodeWarps * kWarp, 0, stream>>>(
      q, k_cache, v_cache, start, heads, kv_heads, head_dim, window, plan.first_key, plan.keys, plan.keys_per_split,
      workspace);
  MOELAB_CUDA_CHECK_LAUNCH("attention decode (split KV)");
  const int threads = ((head_dim + kWarp - 1) / kWarp) * kWarp;
  decode_combine_kernel<<<dim3(unsigned(heads), unsigned(n)), threads, 0, stream>>>(workspace, heads, head_dim,
                                                                                    plan.splits, out);
  MOELAB_CUDA_CHECK_LAUNCH("attention decode (combine)");
}

void attention_prefill_tiled(const float* q, const float* k_cache, const float* v_cache, int n, int start, int heads,
                             int kv_heads, int head_dim, int window, float* out, cudaStream_t stream) {
  check_shapes(n, start, heads, kv_heads, head_dim);
  const size_t shared = size_t(2) * kPrefillKeys * head_dim * sizeof(float);  // <= 32 KiB for head_dim 256
  const unsigned tiles = unsigned((n + kPrefillQueries - 1) / kPrefillQueries);
  prefill_kernel<<<dim3(tiles, unsigned(heads)), kPrefillQueries * kWarp, shared, stream>>>(
      q, k_cache, v_cache, n, start, heads, kv_heads, head_dim, window, out);
  MOELAB_CUDA_CHECK_LAUNCH("attention prefill (tiled)");
}

void attention(const float* q, const float* k_cache, const float* v_cache, int n, int start, int heads, int kv_heads,
               int head_dim, int window, float* out, float* workspace, int64_t workspace_floats, int sm_count,
               cudaStream_t stream) {
  if (n <= kMaxDecodeQueries)
    attention_decode_split_kv(q, k_cache, v_cache, n, start, heads, kv_heads, head_dim, window, out, workspace,
                              workspace_floats, sm_count, stream);
  else
    attention_prefill_tiled(q, k_cache, v_cache, n, start, heads, kv_heads, head_dim, window, out, stream);
}

}  // namespace moelab::cuda
