#pragma once
// Deterministic random fills on the device, for synthetic checkpoints (`--synthetic mixtral-8x7b`):
// a full-size model's 25 GB of NF4 weights are drawn where they live instead of being made on the host
// and copied. Each element is a pure function of (seed, index) through a counter-based hash
// (splitmix64), so a fill is the same whatever the launch shape and any part can be redrawn alone.
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace moelab::cuda {

// Uniform random bytes: as NF4 codes, every one of the 16 levels equally likely -- which is what real
// NF4 codes look like, since NF4's levels are the equal-probability quantiles of a normal.
void fill_random_bytes(uint8_t* out, int64_t count, uint64_t seed, cudaStream_t stream);
// Uniform in [lo, hi).
void fill_random_uniform(float* out, int64_t count, float lo, float hi, uint64_t seed, cudaStream_t stream);
// Normal(0, stddev) by Box-Muller.
void fill_random_normal(float* out, int64_t count, float stddev, uint64_t seed, cudaStream_t stream);
// out[i] = value.
void fill_constant(float* out, int64_t count, float value, cudaStream_t stream);

}  // namespace moelab::cuda
