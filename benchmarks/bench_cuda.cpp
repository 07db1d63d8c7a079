// Microbenchmarks of the cuda-nf4 kernels at Mixtral-8x7B shapes, reported against a device-to-device
// copy bandwidth measured in the same run (bytes read + written per second), so the NF4 GEMV reads as a
// fraction of what the GPU can move. Timed with CUDA events (manual time). Without a GPU the program
// prints why and exits 0 (nothing to measure is not a failure).
//
//   build/moelab_bench_cuda [--benchmark_filter=...]
//
// Full-shape model benchmarks run on synthetic Mixtral-8x7B weights drawn on the device (no checkpoint
// can be brought to the GPU machine): one MoE layer at 1/8/64/512 tokens, and batch-1 decode of the
// whole model with every expert on the GPU and with the expert cache at 2, 4 and 6 experts per layer.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "core/model_presets.hpp"
#include "optimized/cuda/attention.hpp"
#include "optimized/cuda/check.hpp"
#include "optimized/cuda/engine.hpp"
#include "optimized/cuda/device_info.hpp"
#include "optimized/cuda/kernels.hpp"
#include "optimized/cuda/random_fill.hpp"

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

// Attention at Mixtral's shape (32 heads, 8 KV heads, head_dim 128) over an FP32 KV cache of range(0)
// keys. Decode (one query, split over the keys): bytes/s counts the K and V rows read. Prefill of
// range(0) tokens from position 0 (tiled, causal): FLOP/s counts the 4 x head_dim FLOPs per visible
// (query, key) pair of every head.
void AttentionDecode(benchmark::State& state) {
  const int keys = int(state.range(0)), heads = 32, kv_heads = 8, hd = 128;
  const size_t cache = size_t(keys) * kv_heads * hd * sizeof(float);
  float* q = static_cast<float*>(device_alloc(size_t(heads) * hd * sizeof(float)));
  float* k = static_cast<float*>(device_alloc(cache));
  float* v = static_cast<float*>(device_alloc(cache));
  float* out = static_cast<float*>(device_alloc(size_t(heads) * hd * sizeof(float)));
  int sm = 1;
  MOELAB_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0));
  const int64_t floats = attention_workspace_floats(1, keys - 1, 0, heads, hd, sm);
  float* work = static_cast<float*>(device_alloc(size_t(floats) * sizeof(float)));
  timed(state, [&] { attention(q, k, v, 1, keys - 1, heads, kv_heads, hd, 0, out, work, floats, sm, nullptr); });
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(2 * cache));
  for (float* p : {q, k, v, out, work}) cudaFree(p);
}
BENCHMARK(AttentionDecode)->Arg(512)->Arg(4096)->Arg(32768)->UseManualTime()->Unit(benchmark::kMicrosecond);

void AttentionPrefill(benchmark::State& state) {
  const int n = int(state.range(0)), heads = 32, kv_heads = 8, hd = 128;
  float* q = static_cast<float*>(device_alloc(size_t(n) * heads * hd * sizeof(float)));
  float* k = static_cast<float*>(device_alloc(size_t(n) * kv_heads * hd * sizeof(float)));
  float* v = static_cast<float*>(device_alloc(size_t(n) * kv_heads * hd * sizeof(float)));
  float* out = static_cast<float*>(device_alloc(size_t(n) * heads * hd * sizeof(float)));
  timed(state, [&] { attention(q, k, v, n, 0, heads, kv_heads, hd, 0, out, nullptr, 0, 1, nullptr); });
  const double pairs = double(n) * (n + 1) / 2;
  state.counters["FLOP/s"] = benchmark::Counter(4.0 * hd * heads * pairs * double(state.iterations()),
                                                benchmark::Counter::kIsRate);
  for (float* p : {q, k, v, out}) cudaFree(p);
}
BENCHMARK(AttentionPrefill)->Arg(512)->Arg(4096)->UseManualTime()->Unit(benchmark::kMicrosecond);

// One Mixtral-8x7B MoE stage (router, top-2, grouping, the chosen experts' SwiGLU MLPs, combine) on a
// synthetic one-layer model, for n tokens of random normalized input. bytes/s counts the NF4 bytes of
// the experts the tokens chose (the memory-bound view: what the stage must read at least once).
void MoeLayer(benchmark::State& state) {
  static std::unique_ptr<CudaNf4Engine> engine;
  moelab::ModelConfig cfg = moelab::model_preset("mixtral-8x7b");
  cfg.num_layers = 1;
  if (!engine) engine = CudaNf4Engine::synthetic(cfg, {}, 1);
  const int n = int(state.range(0)), H = cfg.hidden_size;
  float* x = static_cast<float*>(device_alloc(size_t(n) * H * sizeof(float)));
  float* out = static_cast<float*>(device_alloc(size_t(n) * H * sizeof(float)));
  moelab::cuda::fill_random_normal(x, int64_t(n) * H, 1.0f, 2, nullptr);
  MOELAB_CUDA_CHECK(cudaDeviceSynchronize());
  timed(state, [&] { engine->moe_layer(0, x, n, out); });
  // Bytes of the experts the stage must read at least: top_k per token, at most all of them (random
  // routing spreads 8+ tokens over every expert).
  const int64_t expert_bytes = 3 * int64_t(H) * cfg.intermediate_size * 9 / 16;  // 4.5 bits per weight incl. FP32 absmax
  const int64_t touched = std::min<int64_t>(int64_t(n) * cfg.top_k, cfg.num_experts);
  state.SetBytesProcessed(int64_t(state.iterations()) * touched * expert_bytes);
  state.counters["tokens"] = n;
  state.counters["tok/s"] = benchmark::Counter(double(n) * double(state.iterations()), benchmark::Counter::kIsRate);
  cudaFree(x);
  cudaFree(out);
}
BENCHMARK(MoeLayer)->Arg(1)->Arg(8)->Arg(64)->Arg(512)->UseManualTime()->Unit(benchmark::kMicrosecond);

// Batch-1 decode of the full synthetic Mixtral-8x7B: range(0) experts per layer on the GPU (0: all 8),
// range(1) prefetch on/off. Each iteration decodes one token after a 64-token prefill (wall time of
// forward(), which returns the logits on the host). Reports tok/s, the cache hit rate and GB copied
// per token. One engine lives at a time (the offloaded ones hold 25 GB of pinned host memory).
void SyntheticDecode(benchmark::State& state) {
  static std::unique_ptr<CudaNf4Engine> engine;
  static std::pair<int64_t, int64_t> built{-1, -1};
  const std::pair<int64_t, int64_t> want{state.range(0), state.range(1)};
  if (built != want) {
    engine.reset();
    moelab::cuda::EngineOptions o;
    o.max_context = 1024;
    o.gpu_expert_cache = int(want.first);
    o.prefetch_experts = want.second != 0;
    engine = CudaNf4Engine::synthetic(moelab::model_preset("mixtral-8x7b"), o, 1);
    built = want;
  }
  std::vector<int32_t> prompt(64);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t(3 + i * 389 % 31000);
  engine->reset();
  engine->forward(prompt);
  const auto before = engine->expert_cache_stats().value_or(moelab::cuda::CacheStats{});
  int32_t token = 1;
  for (auto _ : state) {
    if (engine->position() + 1 >= engine->max_context()) engine->truncate(int(prompt.size()));
    const auto logits = engine->forward(std::span<const int32_t>(&token, 1));
    Eigen::Index best = 0;
    logits.row(0).maxCoeff(&best);
    token = int32_t(best);
  }
  state.counters["tok/s"] = benchmark::Counter(double(state.iterations()), benchmark::Counter::kIsRate);
  if (const auto after = engine->expert_cache_stats()) {
    const int64_t hits = after->hits - before.hits + after->prefetch_hits - before.prefetch_hits;
    const int64_t uses = hits + after->misses - before.misses;
    state.counters["hit_rate"] = uses ? double(hits) / double(uses) : 0.0;
    state.counters["GB_copied/token"] =
        double(after->bytes_copied - before.bytes_copied) / 1e9 / double(std::max<int64_t>(1, state.iterations()));
  }
}
BENCHMARK(SyntheticDecode)
    ->Args({0, 0})->Args({6, 0})->Args({4, 0})->Args({2, 0})->Args({4, 1})->Args({2, 1})
    ->Iterations(16)->UseRealTime()->Unit(benchmark::kMillisecond);

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
