#pragma once
// Every CUDA runtime call and kernel launch in cuda-nf4 goes through these, so a failure names the call
// and its place instead of surfacing later as wrong numbers. Host code only (needs cuda_runtime.h).
#include <cuda_runtime.h>

#include <string>

#include "core/error.hpp"

namespace moelab::cuda {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  throw Error(std::string("cuda-nf4: ") + what + " failed at " + file + ":" + std::to_string(line) + ": " +
              cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

}  // namespace moelab::cuda

#define MOELAB_CUDA_CHECK(call)                                                          \
  do {                                                                                   \
    const cudaError_t moelab_err_ = (call);                                              \
    if (moelab_err_ != cudaSuccess) ::moelab::cuda::throw_cuda(moelab_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: catches bad configurations at once (execution errors surface at the next
// synchronizing call, which is checked too).
#define MOELAB_CUDA_CHECK_LAUNCH(name) MOELAB_CUDA_CHECK(cudaPeekAtLastError())
