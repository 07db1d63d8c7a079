#include <cuda_runtime.h>

#include "optimized/cuda/device_info.hpp"

namespace moelab::cuda {

DeviceList list_devices() {
  DeviceList out;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    out.error = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    return out;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    out.devices.push_back({i, p.name, p.major, p.minor, int64_t(p.totalGlobalMem), p.multiProcessorCount});
  }
  return out;
}

}  // namespace moelab::cuda
