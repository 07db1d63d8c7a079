// torch_cpu_mean: torch's CPU float32 sum (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum), element
// for element, divided by n. bitsandbytes takes its double-quantization offset from it.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "optimized/nf4/internal.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::nf4 {

namespace {

using detail::ceil_div;

constexpr int64_t kTorchGrainSize = 32768;  // at::internal::GRAIN_SIZE: below it a reduction is serial
constexpr int kLanes = 8;                    // Vectorized<float> of the AVX2 (and DEFAULT) build

// One vector register of torch's Vectorized<float>: lane-wise float adds.
struct Lanes {
  std::array<float, kLanes> v{};
  Lanes& operator+=(const Lanes& o) {
    for (int i = 0; i < kLanes; ++i) v[i] += o.v[i];
    return *this;
  }
};

int64_t torch_ceil_log2(int64_t x) {  // utils::CeilLog2
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(uint64_t(x - 1));
}

// multi_row_sum: four interleaved rows, each summed in a 4-level cascade whose level size grows with
// the input, so only partial sums of similar size meet.
template <typename Acc, typename Load>
std::array<Acc, 4> multi_row_sum(int64_t size, const Load& load) {
  constexpr int kLevels = 4;
  const int64_t level_power = std::max<int64_t>(4, torch_ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  Acc acc[kLevels][4] = {};
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] += load(i, k);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = Acc{};
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] += load(i, k);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[j][k];
  return {acc[0][0], acc[0][1], acc[0][2], acc[0][3]};
}

// row_sum: the row seen as (-1, 4) for instruction-level parallelism, leftovers into partial 0.
template <typename Acc, typename Load>
Acc row_sum(int64_t size, const Load& load) {
  const int64_t size_ilp = size / 4;
  auto partial = multi_row_sum<Acc>(size_ilp, [&](int64_t i, int k) { return load(i * 4 + k); });
  for (int64_t i = size_ilp * 4; i < size; ++i) partial[0] += load(i);
  for (int k = 1; k < 4; ++k) partial[0] += partial[k];
  return partial[0];
}

// What one call of the reduction loop adds to its output for a contiguous run of n floats.
float torch_sum_run(const float* x, int64_t n) {
  if (n < kLanes) return row_sum<float>(n, [&](int64_t i) { return x[i]; });
  // vectorized_inner_sum: whole vectors in the cascade, the tail scalars first, then the lanes in order.
  const int64_t nvec = n / kLanes;
  const Lanes v = row_sum<Lanes>(nvec, [&](int64_t j) {
    Lanes l;
    std::memcpy(l.v.data(), x + j * kLanes, sizeof(l.v));
    return l;
  });
  float acc = 0.0f;
  for (int64_t k = nvec * kLanes; k < n; ++k) acc += x[k];
  for (int t = 0; t < kLanes; ++t) acc += v.v[size_t(t)];
  return acc;
}

}  // namespace

float torch_cpu_mean(std::span<const float> x, int threads) {
  const int64_t n = int64_t(x.size());
  if (n == 0) return std::nanf("");  // torch: mean of an empty tensor is nan
  float sum = 0.0f;                   // the output starts at 0 and each loop call adds into it
  if (n < kTorchGrainSize || threads <= 1) {
    sum += torch_sum_run(x.data(), n);
  } else {
    // two_pass_reduction: at::parallel_for splits [0, n) into equal chunks over the threads it uses,
    // each adds its chunk into its own slot, and the slots are then summed by the same loop.
    const int64_t used = std::min<int64_t>(threads, ceil_div(n, kTorchGrainSize));
    const int64_t chunk = ceil_div(n, used);
    std::vector<float> slots(size_t(threads), 0.0f);
    for (int64_t t = 0; t < used && t * chunk < n; ++t)
      slots[size_t(t)] += torch_sum_run(x.data() + t * chunk, std::min(chunk, n - t * chunk));
    sum += torch_sum_run(slots.data(), threads);
  }
  return sum / static_cast<float>(n);
}

}  // namespace moelab::nf4
