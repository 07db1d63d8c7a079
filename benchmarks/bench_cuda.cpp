// Microbenchmarks of the cuda-nf4 kernels at Mixtral-8x7B shapes, reported against a device-to-device
// copy bandwidth measured in the same run (bytes read + written per second), so the NF4 GEMV reads as a
// fraction of what the GPU can move. Timed with CUDA events (manual time). Without a GPU the program
// prints why and exits 0 (nothing to measure is not a failure).
//
//   build/moelab_bench_cuda [--benchmark_filter=...]
//
// Not yet covered here (see benchmarks/README.md, cuda-nf4): the full MoE layer at 1/8/64/512 tokens
// and synthetic-model decode with the expert cache, which need the synthetic engine.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <random>
#include <vector>

#include "optimized/cuda/check.hpp"
#include "optimized/cuda/device_info.hpp"
#include "optimized/cuda/kernels.hpp"

namespace {

using namespace moelab::cuda;

// Times `body` with CUDA events, one iteration per benchmark iteration.
template <class F>
void timed(benchmark::State& state, F&& body) {
  cudaEvent_t a, b;
  MOELAB_CUDA_CHECK(cudaEventCreate(&a));
  MOELAB_CUDA_CHECK(cudaEventCreate(&b));
  body();  // warm-up
  for (auto _ : state) {
    MOELAB_CUDA_CHECK(cudaEventRecord(a));
    body();
    MOELAB_CUDA_CHECK(cudaEventRecord(b));
    MOELAB_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    MOELAB_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    state.SetIterationTime(double(ms) / 1e3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
}

void* device_alloc(size_t bytes) {
  void* p = nullptr;
  MOELAB_CUDA_CHECK(cudaMalloc(&p, bytes));
  MOELAB_CUDA_CHECK(cudaMemset(p, 0x11, bytes));  // arbitrary finite NF4 codes / values
  return p;
}

// Device-to-device copy of 1 GiB: bytes/s counts read + written, the usual "copy bandwidth".
void CopyBandwidth(benchmark::State& state) {
  const size_t bytes = size_t(1) << 30;
  void* src = device_alloc(bytes);
  void* dst = device_alloc(bytes);
  timed(state, [&] { MOELAB_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(2 * bytes));
  cudaFree(src);
  cudaFree(dst);
}
BENCHMARK(CopyBandwidth)->UseManualTime()->Unit(benchmark::kMicrosecond);

// NF4 GEMV [rows, cols]: bytes = packed codes + FP32 absmax + x + y. Several copies of the matrix are
// cycled so the 50 MB L2 of an H100/H200 never holds the weights.
void Nf4Gemv(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1);
  const size_t codes = size_t(rows * cols / 2), absmax = size_t(rows * cols / 64) * sizeof(float);
  const int copies = 8;
  std::vector<uint8_t*> c(copies);
  std::vector<float*> s(copies);
  for (int i = 0; i < copies; ++i) {
    c[i] = static_cast<uint8_t*>(device_alloc(codes));
    s[i] = static_cast<float*>(device_alloc(absmax));
  }
  float* x = static_cast<float*>(device_alloc(size_t(cols) * sizeof(float)));
  float* y = static_cast<float*>(device_alloc(size_t(rows) * sizeof(float)));
  int i = 0;
  timed(state, [&] {
    nf4_gemv(c[i], s[i], rows, cols, x, y, nullptr);
    i = (i + 1) % copies;
  });
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(codes + absmax + (cols + rows) * sizeof(float)));
  for (int k = 0; k < copies; ++k) {
    cudaFree(c[k]);
    cudaFree(s[k]);
  }
  cudaFree(x);
  cudaFree(y);
}
BENCHMARK(Nf4Gemv)->Args({4096, 4096})->Args({1024, 4096})->Args({14336, 4096})->Args({4096, 14336})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

// cuBLAS FP16 GEMV (GemmEx, n = 1, FP32 accumulation) at the same shapes: the dense baseline NF4 must beat.
void CublasFp16Gemv(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1);
  const size_t wbytes = size_t(rows * cols) * sizeof(__half);
  void* w = device_alloc(wbytes);
  void* x = device_alloc(size_t(cols) * sizeof(__half));
  void* y = device_alloc(size_t(rows) * sizeof(__half));
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    state.SkipWithError("cublasCreate failed");
    return;
  }
  const float one = 1.0f, zero = 0.0f;
  timed(state, [&] {
    if (cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(rows), 1, int(cols), &one, w, CUDA_R_16F, int(cols), x,
                     CUDA_R_16F, int(cols), &zero, y, CUDA_R_16F, int(rows), CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      throw moelab::Error("cublasGemmEx failed");
  });
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(wbytes + (cols + rows) * sizeof(__half)));
  cublasDestroy(h);
  cudaFree(w);
  cudaFree(x);
  cudaFree(y);
}
BENCHMARK(CublasFp16Gemv)->Args({4096, 4096})->Args({14336, 4096})->Args({4096, 14336})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  const auto list = list_devices();
  if (list.devices.empty()) {
    std::printf("moelab_bench_cuda: skipped, cuda-nf4: no CUDA device found (%s)\n", list.error.c_str());
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
