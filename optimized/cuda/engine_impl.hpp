#pragma once
// The cuda-nf4 engine's state, shared by its source files: engine.cpp (the layer loop), engine_load.cpp
// (weights from a checkpoint or drawn at random) and moe_stage.cpp (routing, grouping, the experts).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <array>
#include <memory>
#include <vector>

#include "core/config.hpp"
#include "optimized/cuda/check.hpp"
#include "optimized/cuda/engine.hpp"
#include "optimized/cuda/expert_store.hpp"
#include "optimized/cuda/kernels.hpp"

#define MOELAB_CUBLAS_CHECK(call)                                                                   \
  do {                                                                                              \
    const cublasStatus_t st_ = (call);                                                              \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                               \
      throw ::moelab::Error(fmt::format("cuda-nf4: {} failed at {}:{}: cuBLAS status {}", #call, __FILE__, __LINE__, int(st_))); \
  } while (0)

namespace moelab::cuda {

struct DeviceMatrix {
  int64_t rows = 0, cols = 0;
  const uint8_t* codes = nullptr;
  const float* absmax = nullptr;
};

// The matrix `region` of a block that starts at `base` (the arena's or an expert block's).
inline DeviceMatrix matrix_at(const uint8_t* base, const Nf4Region& region) {
  return {region.rows, region.cols, base + region.codes_offset,
          reinterpret_cast<const float*>(base + region.absmax_offset)};
}

// One LoRA-adapted Linear's factors on the device (FP32, row-major as peft stores them): A [rank, in],
// B [out, rank]. a == nullptr: the weight is not adapted.
struct DeviceLora {
  int rank = 0;
  int64_t in = 0, out = 0;
  float scale = 0;
  const float* a = nullptr;
  const float* b = nullptr;
};

struct Layer {
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
  DeviceMatrix wq, wk, wv, wo, router;  // router: MoE only; experts live in the ExpertStore
  DeviceLora wq_lora, wk_lora, wv_lora, wo_lora, router_lora;
  // Per expert: w1, w3, w2 (the expert block's order); empty when no adapter is applied.
  std::vector<std::array<DeviceLora, 3>> expert_lora;
};

// A buffer that grows to the largest request and is reused across forward calls: device memory, or
// (Pinned = true) pinned host memory, the source of truly asynchronous host-to-device copies (a copy
// from pageable memory makes the stream wait first). Growing first waits for `stream` (pinned memory:
// pass the engine's stream); for device memory cudaFree itself waits for the whole device, so no queued
// work still uses the old buffer.
template <class T, bool Pinned = false>
struct Grow {
  T* ptr = nullptr;
  size_t cap = 0;
  T* get(size_t n, cudaStream_t stream = nullptr) {
    if (n > cap) {
      if (ptr) {
        MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream));
        free_buffer();
      }
      ptr = nullptr;
      const size_t bytes = std::max<size_t>(n, 1) * sizeof(T);
      if constexpr (Pinned) MOELAB_CUDA_CHECK(cudaMallocHost(&ptr, bytes));
      else MOELAB_CUDA_CHECK(cudaMalloc(&ptr, bytes));
      cap = n;
    }
    return ptr;
  }
  Grow() = default;
  Grow(const Grow&) = delete;
  ~Grow() { free_buffer(); }

 private:
  void free_buffer() {
    if (!ptr) return;
    if constexpr (Pinned) cudaFreeHost(ptr);
    else cudaFree(ptr);
  }
};

// An activation buffer as a weight product reads it.
struct Act {
  const void* data = nullptr;
  ActType type = ActType::f32;
};

// Up to this many tokens per weight, the product is that many GEMVs (each reads the packed weight once,
// 0.56 bytes per weight); above it, one dequantized band + GEMM (writes and reads 2 or 4 bytes per
// weight more, which pays once the GEMVs' repeated reads cost more).
inline constexpr int kMaxGemvTokens = 8;

struct CudaNf4Engine::Impl {
  ModelConfig cfg;
  EngineOptions options;
  int max_context = 0;
  int pos = 0;
  int sm_count = 1;  // the device's multiprocessors: sizes the split-KV decode
  double load_seconds = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  uint8_t* arena = nullptr;  // attention projections and routers
  int64_t arena_bytes = 0;
  std::unique_ptr<ExpertStore> experts;
  std::vector<void*> owned;  // plain allocations (embedding, norms, caches, scratch)
  float* embedding = nullptr;
  float* lm_head = nullptr;  // == embedding when tied
  float* final_norm = nullptr;
  float* inv_freq = nullptr;
  std::vector<float*> k_cache, v_cache;
  void* scratch = nullptr;  // a dequantized weight band (FP32 or BF16) for the prefill GEMMs
  int64_t scratch_elems = 0;
  int64_t other_bytes = 0;
  std::vector<Layer> layers;
  Grow<int32_t> d_tokens, d_chosen, d_token_of_row, d_row_of;
  Grow<float> h, x, q, k, v, att, tmp, rlogits, rlogits_next, gates, gx, gu, act, ey, logits, attn_work;
  Grow<float> lora_t;  // A x of a LoRA product, [n, rank]
  Grow<uint16_t> stage_x, stage_att, stage_gx, stage_act;  // BF16 copies of the products' inputs
  // Per layer, the grouped rows' source tokens and each choice's grouped row ([2 * n * top_k] int32 per
  // layer): each layer has its own slice, so its uploads need no wait before the next layer reuses it.
  Grow<int32_t, /*Pinned=*/true> group_index;

  ~Impl();
  void init_device(int device);
  void load_weights(const Checkpoint* ck, uint64_t seed);  // ck == nullptr: synthetic
  void load_adapter(const LoraAdapter& adapter);           // after load_weights: the factors, per layer
  float* alloc(int64_t elems);

  // Act view of x[count] as the products read it: x itself in FP32 mode, a BF16 copy in `buf` otherwise.
  Act stage(const float* x, int64_t count, Grow<uint16_t>& buf);
  // y[n, rows] (row stride ldy) = x[n, cols] * W^T.
  void linear(Act x, int n, const DeviceMatrix& w, float* y, int64_t ldy);
  // y[n, out] (row stride ldy) += scale * (x[n, in] A^T) B^T: a LoRA product in FP32 (cuBLAS SGEMM, no
  // TF32) on the FP32 input x (contiguous rows), queued after the base product into the same y; nothing
  // when `lora` is not adapted.
  void add_lora(const DeviceLora& lora, const float* x, int n, float* y, int64_t ldy);
  // h[n, H] += MoE(x[n, H]); writes the chosen experts to host_chosen [n * top_k] and the gates and router
  // logits to the device buffers `gates` / `rlogits`.
  void moe_stage(int layer, const float* x, int n, float* h, std::vector<int32_t>& host_chosen);
  MatrixRF to_host(const float* d, int rows, int cols) const;
};

}  // namespace moelab::cuda
