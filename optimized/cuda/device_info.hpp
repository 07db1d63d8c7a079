#pragma once
// Host-callable CUDA device enumeration (compiled by nvcc; safe to call where no GPU or driver exists).
#include <cstdint>
#include <string>
#include <vector>

namespace moelab::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;
  int64_t memory_bytes = 0;
  int multiprocessors = 0;
};

struct DeviceList {
  std::vector<DeviceInfo> devices;
  std::string error;  // why none could be listed (no driver, no device), empty otherwise
};

DeviceList list_devices();

}  // namespace moelab::cuda
