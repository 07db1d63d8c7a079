// cuda-nf4 attention kernels (see attention.hpp and attention_plan.hpp).
//
// Both paths give each (query, head) to warps that walk keys with an online softmax: a running max m,
// a running sum l of exp(s - m) and an output accumulator rescaled by exp(m_old - m_new) whenever the
// max grows. A warp takes kKeysPerStep consecutive keys per step: lanes hold head_dim / 32 elements of
// q, multiply them by each key row (consecutive lanes, consecutive addresses: coalesced reads) and sum
// with xor shuffles so every lane has every score. The keys of a step are independent, so their loads
// and shuffle reductions overlap (one key at a time would leave each warp waiting on one load chain);
// the step then rescales once for all of them. FP32 throughout, accurate expf (the kernels are bound by
// memory or by the shuffles, not by the exponentials).
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "optimized/cuda/attention.hpp"
#include "optimized/cuda/check.hpp"

namespace moelab::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;   // every lane takes part in every shuffle (uniform loops)
constexpr int kMaxHeadDim = 256;
constexpr int kPerLane = kMaxHeadDim / kWarp;  // accumulator elements per lane
constexpr int kKeysPerStep = 4;
constexpr int kDecodeWarps = 4;
constexpr int kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z

__device__ __forceinline__ int first_visible_key_device(int position, int window) {
  return window > 0 ? max(0, position - window + 1) : 0;  // as first_visible_key (attention_plan.cpp)
}

struct OnlineSoftmax {
  float m = -INFINITY, l = 0.0f;
  float acc[kPerLane];  // lane holds output elements d = lane + 32 i
  __device__ OnlineSoftmax() {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  }

  // Adds keys u = 0 .. count - 1 (1 <= count <= kKeysPerStep, the same on every lane of the warp): key
  // row k + u * stride and value row v + u * stride, head_dim floats each. qr: the lane's pre-scaled q.
  __device__ __forceinline__ void add(const float (&qr)[kPerLane], const float* k, const float* v, int64_t stride,
                                      int count, int head_dim, int lane) {
    float s[kKeysPerStep];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      s[u] = 0.0f;
      if (u < count) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int d = lane + kWarp * i;
          if (d < head_dim) s[u] = fmaf(qr[i], k[u * stride + d], s[u]);
        }
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2)
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) s[u] += __shfl_xor_sync(kFullMask, s[u], off);
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u)
      if (u < count) m_new = fmaxf(m_new, s[u]);
    // count >= 1, so m_new is finite; on the first step m == -inf and the rescale is exp(-inf) = 0 (the
    // accumulators are still 0): no -inf - -inf anywhere.
    const float rescale = expf(m - m_new);
    float p[kKeysPerStep];
    float p_sum = 0.0f;
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      p[u] = u < count ? expf(s[u] - m_new) : 0.0f;
      p_sum += p[u];
    }
    l = fmaf(l, rescale, p_sum);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + kWarp * i;
      if (d < head_dim) {
        float a = acc[i] * rescale;
#pragma unroll
        for (int u = 0; u < kKeysPerStep; ++u)
          if (u < count) a = fmaf(p[u], v[u * stride + d], a);
        acc[i] = a;
      }
    }
    m = m_new;
  }
};

// The lane's elements of q (d = lane + 32 i), times 1 / sqrt(head_dim) so the scores come out scaled.
__device__ __forceinline__ void load_query(const float* q, int head_dim, int lane, float (&qr)[kPerLane]) {
  const float scale = rsqrtf(float(head_dim));
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + kWarp * i;
    qr[i] = d < head_dim ? q[d] * scale : 0.0f;
  }
}

// Grid (heads, splits, n), kDecodeWarps warps: block = query t, head h, the keys of split s that t
// sees. Heads are the fastest grid dimension so the heads sharing a KV head (GQA) run side by side and
// read its rows from L2 after the first. Warp w takes steps of kKeysPerStep consecutive keys, every
// kDecodeWarps-th step; the warps merge in shared memory and the block writes (m, l, acc[head_dim]) to
// the workspace at ((t * heads + h) * splits + s) * (head_dim + 2). The loop bounds depend on the warp
// only, so the shuffles in add() see all 32 lanes; the __syncthreads() is reached by every thread.
__global__ void decode_split_kernel(const float* __restrict__ q, const float* __restrict__ kc,
                                    const float* __restrict__ vc, int start, int heads, int kv_heads, int head_dim,
                                    int window, int first_key, int keys, int keys_per_split, float* __restrict__ work) {
  __shared__ float sm_m[kDecodeWarps], sm_l[kDecodeWarps];
  __shared__ float sm_acc[kDecodeWarps][kMaxHeadDim];  // 4 KiB
  const int h = blockIdx.x, s = blockIdx.y, t = blockIdx.z, splits = gridDim.y;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int p = start + t;
  const int kvh = h / (heads / kv_heads);
  const int64_t stride = int64_t(kv_heads) * head_dim;
  const int64_t column = int64_t(kvh) * head_dim;
  // The split's keys [first_key + s * keys_per_split, ...) clipped to what query t sees, (p - window, p]:
  // empty for a split wholly outside it (possible when n > 1), which leaves m = -inf, l = 0.
  const int lo = max(first_key + s * keys_per_split, first_visible_key_device(p, window));
  const int hi = min(first_key + min(keys, (s + 1) * keys_per_split), p + 1);  // exclusive
  float qr[kPerLane];
  load_query(q + (int64_t(t) * heads + h) * head_dim, head_dim, lane, qr);
  OnlineSoftmax st;
  for (int j = lo + warp * kKeysPerStep; j < hi; j += kDecodeWarps * kKeysPerStep)
    st.add(qr, kc + int64_t(j) * stride + column, vc + int64_t(j) * stride + column, stride,
           min(kKeysPerStep, hi - j), head_dim, lane);
  if (lane == 0) sm_m[warp] = st.m, sm_l[warp] = st.l;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    if (lane + kWarp * i < head_dim) sm_acc[warp][lane + kWarp * i] = st.acc[i];
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < kDecodeWarps; ++w) m = fmaxf(m, sm_m[w]);
  // Warps without keys (m = -inf) are skipped, never weighted by exp(-inf - m): m may be -inf as well.
  float* out = work + ((int64_t(t) * heads + h) * splits + s) * (head_dim + 2);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w)
      if (sm_m[w] != -INFINITY) a += sm_acc[w][d] * expf(sm_m[w] - m);
    out[2 + d] = a;
  }
  if (threadIdx.x == 0) {
    float l = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w)
      if (sm_m[w] != -INFINITY) l += sm_l[w] * expf(sm_m[w] - m);
    out[0] = m;  // -inf when this split holds no key the query sees
    out[1] = l;
  }
}

// Grid (heads, n), threads over head_dim: merges the splits of one (query, head), skipping empty ones
// (m = -inf). The overall max is finite and l > 0: every query sees at least its own key.
__global__ void decode_combine_kernel(const float* __restrict__ work, int heads, int head_dim, int splits,
                                      float* __restrict__ out) {
  const int h = blockIdx.x, t = blockIdx.y;
  const int64_t row = head_dim + 2;
  const float* base = work + (int64_t(t) * heads + h) * splits * row;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, base[s * row]);
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = base[s * row];
    if (ms != -INFINITY) l += base[s * row + 1] * expf(ms - m);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = base[s * row];
      if (ms != -INFINITY) a += base[s * row + 2 + d] * expf(ms - m);
    }
    out[(int64_t(t) * heads + h) * head_dim + d] = a / l;
  }
}

// Grid (query tiles, heads), kPrefillQueries warps, warp w = query t0 + w. The block stages each key
// tile's K and V rows of its KV head in shared memory (every thread helps; consecutive threads read
// consecutive floats of a row), then each warp walks the keys of the tile that its query sees, in steps
// of kKeysPerStep. The tiles visited are prefill_key_tiles(start, t0, count, window): the same for the
// whole block, so the __syncthreads() calls are in uniform control flow; warps past n idle through them.
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
  const int64_t column = int64_t(kvh) * head_dim;
  const int count = min(kPrefillQueries, n - t0);
  // As prefill_key_tiles (attention_plan.cpp): the first query sees the lowest keys, the last the highest.
  const int last_key = start + t0 + count - 1;
  const int tile_lo = first_visible_key_device(start + t0, window) / kPrefillKeys;
  const int tile_hi = last_key / kPrefillKeys + 1;
  const int my_first = active ? first_visible_key_device(p, window) : 0;
  float qr[kPerLane];
  load_query(q + (int64_t(active ? t : t0) * heads + h) * head_dim, head_dim, lane, qr);
  OnlineSoftmax st;
  for (int tk = tile_lo; tk < tile_hi; ++tk) {
    const int k0 = tk * kPrefillKeys;
    for (int i = threadIdx.x; i < kPrefillKeys * head_dim; i += blockDim.x) {
      const int j = k0 + i / head_dim, d = i % head_dim;
      const bool ok = j <= last_key;  // rows past it may be unwritten (and no query here sees them)
      ks[i] = ok ? kc[int64_t(j) * stride + column + d] : 0.0f;
      vs[i] = ok ? vc[int64_t(j) * stride + column + d] : 0.0f;
    }
    __syncthreads();
    if (active) {
      const int lo = max(k0, my_first), hi = min(k0 + kPrefillKeys, p + 1);
      for (int j = lo; j < hi; j += kKeysPerStep)
        st.add(qr, ks + (j - k0) * head_dim, vs + (j - k0) * head_dim, head_dim, min(kKeysPerStep, hi - j), head_dim,
               lane);
    }
    __syncthreads();  // the next tile overwrites ks / vs
  }
  if (!active) return;  // after the last __syncthreads()
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + kWarp * i;
    if (d < head_dim) out[(int64_t(t) * heads + h) * head_dim + d] = st.acc[i] / st.l;  // l > 0: own key
  }
}

void check_shapes(int n, int start, int heads, int kv_heads, int head_dim, int window) {
  if (n < 1 || start < 0 || window < 0)
    throw Error("cuda-nf4: attention needs n >= 1 queries, start >= 0 and window >= 0 (0: none), got n " +
                std::to_string(n) + ", start " + std::to_string(start) + ", window " + std::to_string(window));
  if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0 || heads > kMaxGridYZ)
    throw Error("cuda-nf4: attention needs heads (" + std::to_string(heads) + ") in 1 .. 65535 and a multiple of kv_heads (" +
                std::to_string(kv_heads) + ")");
  if (head_dim < 1 || head_dim > kMaxHeadDim)
    throw Error("cuda-nf4: attention supports head_dim 1 .. 256, not " + std::to_string(head_dim));
}

}  // namespace

int64_t attention_workspace_floats(int n, int start, int window, int heads, int head_dim, int sm_count) {
  if (n > kMaxDecodeQueries) return 0;
  return attention_workspace_floats(plan_kv_splits(n, start, window, heads, sm_count), n, heads, head_dim);
}

void attention_decode_split_kv(const float* q, const float* k_cache, const float* v_cache, int n, int start,
                               int heads, int kv_heads, int head_dim, int window, float* out, float* workspace,
                               int64_t workspace_floats, int sm_count, cudaStream_t stream) {
  check_shapes(n, start, heads, kv_heads, head_dim, window);
  if (n > kMaxGridYZ) throw Error("cuda-nf4: split-KV attention takes at most 65535 queries, not " + std::to_string(n));
  const KvSplitPlan plan = plan_kv_splits(n, start, window, heads, sm_count);
  const int64_t need = attention_workspace_floats(plan, n, heads, head_dim);
  if (workspace == nullptr || workspace_floats < need)
    throw Error("cuda-nf4: split-KV attention needs a workspace of " + std::to_string(need) + " floats, got " +
                std::to_string(workspace_floats));
  decode_split_kernel<<<dim3(unsigned(heads), unsigned(plan.splits), unsigned(n)), kDecodeWarps * kWarp, 0, stream>>>(
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
  check_shapes(n, start, heads, kv_heads, head_dim, window);
  const size_t shared = size_t(2) * kPrefillKeys * head_dim * sizeof(float);  // <= 32 KiB at head_dim 256
  static_assert(2 * kPrefillKeys * kMaxHeadDim * sizeof(float) <= 48 * 1024,
                "prefill tiles must fit the default dynamic shared memory limit (no opt-in attribute set)");
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
