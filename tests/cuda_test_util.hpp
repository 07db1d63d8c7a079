#pragma once
// Shared helpers of the device tests (label "device"): skip with the reason where no GPU is present,
// device buffers poisoned on allocation (an unwritten output fails), random inputs, relative L2 against
// a float64 host computation.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "optimized/cuda/check.hpp"
#include "optimized/cuda/device_info.hpp"

namespace moelab::cuda::test {

#define SKIP_WITHOUT_GPU()                                                               \
  do {                                                                                   \
    const auto list = ::moelab::cuda::list_devices();                                                  \
    if (list.devices.empty()) GTEST_SKIP() << "cuda-nf4: no CUDA device found (" << list.error << ")"; \
  } while (0)

// A device buffer filled from (or poisoned for) the host; freed on scope exit.
template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    MOELAB_CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)));
    MOELAB_CUDA_CHECK(cudaMemset(ptr, 0xFF, n * sizeof(T)));  // all-ones bytes: NaN for floats, -1 for ints
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    MOELAB_CUDA_CHECK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  std::vector<T> read() const {
    std::vector<T> out(n);
    MOELAB_CUDA_CHECK(cudaDeviceSynchronize());
    MOELAB_CUDA_CHECK(cudaMemcpy(out.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

inline std::vector<float> random_vector(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline double rel_l2(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return std::numeric_limits<double>::infinity();
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace moelab::cuda::test
