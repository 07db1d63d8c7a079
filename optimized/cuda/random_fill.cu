// Device random fills (see random_fill.hpp).
#include <cuda_runtime.h>

#include "optimized/cuda/check.hpp"
#include "optimized/cuda/random_fill.hpp"

namespace moelab::cuda {
namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A uniform in (0, 1] from the top 24 bits (never 0: Box-Muller takes its log).
__device__ __forceinline__ float unit(uint64_t bits) { return (float(bits >> 40) + 1.0f) * (1.0f / 16777216.0f); }

__global__ void bytes_kernel(uint8_t* out, int64_t count, uint64_t seed) {
  // Eight bytes per hash: element group g covers bytes [8g, 8g + 8).
  const int64_t groups = (count + 7) / 8;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = splitmix64(seed ^ splitmix64(uint64_t(g)));
    for (int b = 0; b < 8 && g * 8 + b < count; ++b) out[g * 8 + b] = uint8_t(r >> (8 * b));
  }
}

__global__ void uniform_kernel(float* out, int64_t count, float lo, float hi, uint64_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = lo + (hi - lo) * (unit(splitmix64(seed ^ splitmix64(uint64_t(i)))) - 1.0f / 16777216.0f);
}

__global__ void normal_kernel(float* out, int64_t count, float stddev, uint64_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = splitmix64(seed ^ splitmix64(uint64_t(i)));
    const float u1 = unit(r), u2 = unit(r << 24);
    out[i] = stddev * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  }
}

__global__ void constant_kernel(float* out, int64_t count, float value) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = value;
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return int(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace

void fill_random_bytes(uint8_t* out, int64_t count, uint64_t seed, cudaStream_t stream) {
  if (count <= 0) return;
  bytes_kernel<<<grid_for((count + 7) / 8), 256, 0, stream>>>(out, count, seed);
  MOELAB_CUDA_CHECK_LAUNCH("fill_random_bytes");
}

void fill_random_uniform(float* out, int64_t count, float lo, float hi, uint64_t seed, cudaStream_t stream) {
  if (count <= 0) return;
  uniform_kernel<<<grid_for(count), 256, 0, stream>>>(out, count, lo, hi, seed);
  MOELAB_CUDA_CHECK_LAUNCH("fill_random_uniform");
}

void fill_random_normal(float* out, int64_t count, float stddev, uint64_t seed, cudaStream_t stream) {
  if (count <= 0) return;
  normal_kernel<<<grid_for(count), 256, 0, stream>>>(out, count, stddev, seed);
  MOELAB_CUDA_CHECK_LAUNCH("fill_random_normal");
}

void fill_constant(float* out, int64_t count, float value, cudaStream_t stream) {
  if (count <= 0) return;
  constant_kernel<<<grid_for(count), 256, 0, stream>>>(out, count, value);
  MOELAB_CUDA_CHECK_LAUNCH("fill_constant");
}

}  // namespace moelab::cuda
