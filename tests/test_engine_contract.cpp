// The Engine contract (tests/engine_contract.hpp) on the host engines: ref, ref-f64 (the reference's
// float64 build, what `--precision f64` makes), and cpu-nf4 with FP32 and int8 activations, each with
// both lm_head formats. cuda-nf4 runs the same suite in moelab_cuda_tests
// (tests/test_cuda_engine_contract.cpp); a build without CUDA lists it here as skipped.
//
// Tolerances, with u = 2^-24 the FP32 unit roundoff:
//  - decode_tol, FP32 arithmetic (ref, cpu-nf4 fp32): one prefill, token-by-token decoding and chunks
//    compute the same sums in different orders (blocked GEMM against GEMV, attention over a cache grown
//    in different steps). The rounding errors of a K-term sum add as a random walk, ~sqrt(K) u relative;
//    with K <= 128 in the fixtures that is 7e-7 per product, and the residual stream passes about
//    4 products per layer in series over at most 3 layers plus the lm_head: 13 x 7e-7 = 9e-6 < 1e-5.
//  - decode_tol, int8 activations (cpu-nf4 int8) and the q8 lm_head: each token's activations are
//    quantized on their own (groups of 32 within one row), so where the two call shapes give a product
//    the same input values, they get the same codes and the same integer sums; the FP32 parts
//    (attention, norms, block scale sums) are reordered: the FP32 bound, 1e-5.
//  - flip_tol, max_flipped_rows (the same engines): but the inputs are themselves FP32 results, a
//    rounding apart between call shapes, and a value that close to an int8 rounding boundary takes the
//    next code in one of them. That moves one input by one step, absmax/127 <= |x|/127 of its row, so
//    the product moves by about 1/127 relative (the fixtures' random weights have no favoured input
//    direction); a flip deep in the network carries through the residual stream about unchanged. Two
//    flips in a row: flip_tol 2/127 = 0.016. How often: an FP32 difference of ~1e-6 relative against a
//    step of ~1/127 of absmax flips a code with probability ~1e-4; a token's row meets ~6 quantized
//    inputs of <= 128 values per layer over <= 3 layers, ~2300 values: ~0.2 flips per row, so at most
//    half the rows of a call may carry one. (Measured: with the q8 lm_head, a row after truncate differs
//    by 2.1e-3; with int8 activations no row of these fixtures flips.)
//  - decode_tol, ref-f64: float64 sums in different orders agree to ~1e-14, and each logit is then
//    rounded to FP32: the two roundings are at most one FP32 ulp (2u relative) apart, so a row's relative
//    L2 is at most 2u = 1.2e-7 (limit 2e-7). An engine secretly computing in FP32 fails this by 50x.
//  - lm_head_tol, FP32 lm_head: the engine's FP32 product of length hidden (<= 64) against float64 on the
//    same FP32 inputs: sqrt(64) u = 5e-7 per logit, and the final norm's rounding, ~u: limit 1e-5 (also
//    covers the reference's forward_native cast). ref-f64 observes its hidden state cast to FP32 (u
//    relative) and its logits cast to FP32 (u): limit 1e-6.
//  - lm_head_tol, q8 lm_head: weights int8 per row (step absmax/127) and activations int8 per 32. A row of
//    K values has absmax <= sqrt(K) rms, so uniform rounding leaves at most sqrt(K) / (127 sqrt(12)) of
//    the rms: 0.0182 for the weights (K = hidden <= 64) and 0.0129 for the activations (K = 32);
//    independent, they add in quadrature to 0.0223 relative L2 of the product: limit 0.025.
//  - gate_tol: a gate is a ratio of FP32 exponentials of router logits (each exp within 2 ulp): at most
//    ~4u = 2.4e-7 absolute on values <= 1, computed by the engine and here in float64: limit 1e-6.
#include "engine_contract.hpp"

#include "optimized/cpu/engine.hpp"
#include "reference/model.hpp"

namespace moelab::test {
namespace {

EngineUnderTest ref_f32() {
  return {.name = "ref",
          .make = [](const Checkpoint& ck, int ctx) -> std::unique_ptr<Engine> {
            return std::make_unique<ref::Model<float>>(ck, ref::ModelOptions{.max_context = ctx});
          },
          .decode_tol = 1e-5,
          .lm_head_tol = 1e-5,
          .gate_tol = 1e-6};
}

EngineUnderTest ref_f64() {
  return {.name = "ref_f64",
          .make = [](const Checkpoint& ck, int ctx) -> std::unique_ptr<Engine> {
            return std::make_unique<ref::Model<double>>(ck, ref::ModelOptions{.max_context = ctx});
          },
          .decode_tol = 2e-7,
          .lm_head_tol = 1e-6,
          .gate_tol = 1e-6};
}

EngineUnderTest cpu_nf4(const std::string& activations, const std::string& lm_head) {
  return {.name = "cpu_nf4_" + activations + "_lmhead_" + lm_head,
          .make = [=](const Checkpoint& ck, int ctx) -> std::unique_ptr<Engine> {
            return std::make_unique<cpu::Nf4Engine>(
                ck, cpu::EngineOptions{.max_context = ctx, .activations = activations, .lm_head = lm_head});
          },
          .decode_tol = 1e-5,
          .flip_tol = activations == "int8" || lm_head == "q8" ? 2.0 / 127 : 0,
          .max_flipped_rows = activations == "int8" || lm_head == "q8" ? 0.5 : 0,
          // bf16: each head weight within 2^-8 relative of its FP32 value (round to nearest), which moves
          // logits that are sums of terms uncorrelated with that rounding by about 2^-8 / sqrt(3) = 0.0023
          // relative L2 (none for a BF16 checkpoint); 0.01 is four times that.
          .lm_head_tol = lm_head == "q8" ? 0.025 : lm_head == "bf16" ? 0.01 : 1e-5,
          .gate_tol = 1e-6};
}

std::vector<EngineUnderTest> host_engines() {
  std::vector<EngineUnderTest> e{ref_f32(), ref_f64(), cpu_nf4("fp32", "fp32"), cpu_nf4("fp32", "q8"),
                                 cpu_nf4("int8", "q8"), cpu_nf4("int8", "fp32"), cpu_nf4("fp32", "bf16")};
#ifndef MOELAB_HAVE_CUDA
  e.push_back({.name = "cuda_nf4",
               .make = [](const Checkpoint&, int) -> std::unique_ptr<Engine> { return nullptr; },
               .skip_reason = [] {
                 return std::string("this build has no CUDA (no nvcc at configure time; see MOELAB_CUDA)");
               }});
#endif
  return e;
}

INSTANTIATE_TEST_SUITE_P(Engines, EngineContract, ::testing::ValuesIn(host_engines()), contract_test_name);

}  // namespace
}  // namespace moelab::test
