#pragma once
// cuda-nf4: the Engine on an NVIDIA GPU. NF4 weights (attention projections, router, experts) in one
// device arena in the bitsandbytes layout with FP32 absmax; FP32 activations and accumulation (first
// version; BF16/FP16 activations are the next step); KV cache on the device. Decode (one token) uses
// the NF4 GEMV; prefill dequantizes bands of each weight into a scratch buffer and runs cuBLAS SGEMM.
// Semantics follow transformers' MixtralForCausalLM, as the reference does. Compiled whenever nvcc is
// found; constructing it where no device exists throws "cuda-nf4: no CUDA device found".
#include <memory>

#include "core/checkpoint.hpp"
#include "core/engine.hpp"

namespace moelab::cuda {

struct EngineOptions {
  int max_context = 0;  // 0: min(max_position_embeddings, 4096)
  int device = 0;
  bool show_progress = false;
};

class CudaNf4Engine final : public Engine {
 public:
  CudaNf4Engine(const Checkpoint& ck, EngineOptions options = {});
  ~CudaNf4Engine() override;
  std::string name() const override { return "cuda-nf4"; }
  const ModelConfig& config() const override;
  MatrixRF forward(std::span<const int32_t> tokens, Probe* probe = nullptr) override;
  void reset() override;
  void truncate(int position) override;
  int position() const override;
  int max_context() const override;
  int64_t device_bytes() const;  // weights + KV cache + scratch allocated on the device

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moelab::cuda
