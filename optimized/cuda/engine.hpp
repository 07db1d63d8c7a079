#pragma once
// cuda-nf4: the Engine on an NVIDIA GPU. NF4 weights in the bitsandbytes layout (FP32 absmax per block
// of 64) on the device: attention projections and routers in one arena, experts in an ExpertStore
// (all on the device, or `--gpu-expert-cache N` per layer with the rest in pinned host memory). The
// inputs of every weight product are BF16 (default) or FP32 with FP32 accumulation; the residual
// stream, norms, softmaxes and the KV cache stay FP32. Decode (<= 8 tokens per weight) runs the NF4
// GEMV; larger batches dequantize bands of a weight and run a cuBLAS GEMM (tensor cores for BF16).
// A LoRA adapter is applied unmerged beside the NF4 products: y = W x + s * B (A x), A and B FP32 on the
// device, two cuBLAS SGEMMs on the FP32 input (the product's input before any BF16 rounding).
// Semantics follow transformers' MixtralForCausalLM, as the reference does. Compiled whenever nvcc is
// found; constructing it where no device exists throws "cuda-nf4: no CUDA device found".
#include <memory>
#include <optional>

#include "core/checkpoint.hpp"
#include "core/engine.hpp"
#include "core/lora.hpp"
#include "optimized/cuda/expert_cache_policy.hpp"
#include "optimized/cuda/kernels.hpp"

namespace moelab::cuda {

struct EngineOptions {
  int max_context = 0;  // 0: min(max_position_embeddings, 4096)
  int device = 0;
  bool show_progress = false;
  ActType activations = ActType::bf16;
  int gpu_expert_cache = 0;       // experts per layer kept on the GPU; 0 (or >= experts): all of them
  bool prefetch_experts = false;  // offloaded: copy the next layer's likely experts while this one computes
  // A LoRA adapter applied unmerged (null: none). Its factors all live on the device, experts' too, even
  // with gpu_expert_cache (they are small: 4 r (in + out) bytes per adapted weight).
  std::shared_ptr<const LoraAdapter> adapter = nullptr;
};

class CudaNf4Engine final : public Engine {
 public:
  // Quantizes (or maps a pre-quantized) checkpoint and uploads it.
  CudaNf4Engine(const Checkpoint& ck, EngineOptions options = {});
  // A synthetic model of `config`'s shape: random NF4 codes and absmax drawn on the device from `seed`
  // (scaled so activations keep their size through the layers), unit norms, random embedding and
  // lm_head. For real-shape speed measurements where no checkpoint can be brought (`--synthetic`).
  static std::unique_ptr<CudaNf4Engine> synthetic(const ModelConfig& config, EngineOptions options, uint64_t seed);
  ~CudaNf4Engine() override;

  std::string name() const override { return "cuda-nf4"; }
  const ModelConfig& config() const override;
  MatrixRF forward(std::span<const int32_t> tokens, Probe* probe = nullptr) override;
  void reset() override;
  void truncate(int position) override;
  int position() const override;
  int max_context() const override;

  int64_t device_bytes() const;       // weights + KV cache + scratch allocated on the device
  int64_t pinned_host_bytes() const;  // offloaded experts
  double load_seconds() const;
  // Expert-cache counters since construction (hits, misses, prefetches, bytes copied); empty when
  // every expert is on the device.
  std::optional<CacheStats> expert_cache_stats() const;
  // One MoE stage of `layer` on device data: out[n, hidden] += MoE(x[n, hidden]), x already
  // normalized; returns when the work is queued (the engine's stream). For the MoE-layer benchmark.
  void moe_layer(int layer, const float* x, int n, float* out);
  void synchronize();

 private:
  struct Impl;
  CudaNf4Engine(const ModelConfig& config, const Checkpoint* ck, EngineOptions options, uint64_t seed);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moelab::cuda
