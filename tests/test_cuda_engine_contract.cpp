// The Engine contract (tests/engine_contract.hpp) on cuda-nf4, FP32 and BF16 products. Label "device":
// every case skips with the reason where no CUDA device is present.
//
// Tolerances (the derivations of tests/test_cuda_engine.cpp):
//  - FP32 products: decode and prefill are the same FP32 arithmetic in different orders (warp-shuffle
//    trees and cuBLAS's blocking against the GEMV): 1e-4 relative L2 per row, as against the reference.
//  - BF16 products: a prefill of more than 8 tokens rounds each weight band to BF16 (2^-9 relative), the
//    decode GEMV uses the FP32 dequantized weights: each product differs by ~1e-3 and a router near-tie
//    may flip an expert at one position, so the check is over the whole sequence, limit 3e-2, with at
//    least 9 in 10 expert sets agreeing.
//  - lm_head: FP32 (cuBLAS SGEMM) in both modes: 1e-4 against float64 on the observed hidden state.
//  - gates: softmax of the observed FP32 router logits on the device: 1e-5 absolute.
// Bit-for-bit checks (reset, truncate(0), with and without a probe) rely on cuBLAS giving the same bits
// for the same call on the same device, which it documents, and on the engine using no atomics.
#include <cuda_runtime.h>

#include "cuda_test_util.hpp"
#include "engine_contract.hpp"
#include "optimized/cuda/device_info.hpp"
#include "optimized/cuda/engine.hpp"

namespace moelab::test {
namespace {

std::string no_device_reason() {
  const auto list = cuda::list_devices();
  return list.devices.empty() ? "cuda-nf4: no CUDA device found (" + list.error + ")" : std::string();
}

EngineUnderTest cuda_nf4(cuda::ActType act) {
  const bool fp32 = act == cuda::ActType::f32;
  return {.name = fp32 ? "cuda_nf4_fp32" : "cuda_nf4_bf16",
          .make = [act](const Checkpoint& ck, int ctx) -> std::unique_ptr<Engine> {
            cuda::EngineOptions o;
            o.max_context = ctx;
            o.activations = act;
            return std::make_unique<cuda::CudaNf4Engine>(ck, o);
          },
          .skip_reason = no_device_reason,
          .decode_tol = fp32 ? 1e-4 : 3e-2,
          .decode_per_row = fp32,
          .min_expert_agreement = fp32 ? 1.0 : 0.9,
          .lm_head_tol = 1e-4,
          .gate_tol = 1e-5};
}

INSTANTIATE_TEST_SUITE_P(Engines, EngineContract,
                         ::testing::Values(cuda_nf4(cuda::ActType::f32), cuda_nf4(cuda::ActType::bf16)),
                         contract_test_name);

}  // namespace
}  // namespace moelab::test
