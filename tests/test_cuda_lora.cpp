// cuda-nf4 with a LoRA adapter (issue 15): the unmerged product y = W x + s B (A x), A and B FP32 on the
// device, against the reference with the same adapter, on the fixture adapters (tests/fixtures/lora) and
// their models. Label "device": every GPU test skips with the reason where no GPU is present. Written
// and compiled without a GPU; see docs/lora.md for whether it has run on one.
//
// Tolerances, as test_cuda_engine.cpp derives them for the same engine without an adapter:
// - FP32 products vs the reference on the NF4-dequantized weights, both with the adapter: 1e-4 relative
//   L2 for every layer's hidden state and router logits and for the logits, and identical experts. The
//   LoRA product is two FP32 SGEMMs (no TF32) on the FP32 input, the same function as the reference's
//   FP32 LoRA product in another summation order, so it adds rounding of the kind the 1e-4 already
//   covers (cpu-nf4 with the adapter reaches 1e-5, test_lora.cpp). The LoRA term moves the logits by a
//   relative 1.2-1.4 (fixtures README): a wrong scale, a missed module or a factor read transposed is
//   orders of magnitude outside. The fixture prompts' smallest top-k margin with the adapter is 0.0030
//   in probability, far above FP32 rounding, so the experts must be equal.
// - BF16 products: 2e-2 hidden and router logits, 3e-2 logits, 90% of top-k sets equal per layer, as
//   test_cuda_engine.cpp's BF16 test: only the NF4 products see BF16 inputs; the LoRA product stays FP32.
// - decode (GEMV path, one token) == prefill (dequantize + GEMM path): 1e-4 per row in FP32 products.
// - the expert cache (top_k experts per layer on the GPU) moves only the NF4 bytes; the experts' LoRA
//   factors are all resident and indexed by expert, not slot: the logits equal the resident engine's
//   bit for bit.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "analysis/diff.hpp"
#include "analysis/forward_record.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "cuda_test_util.hpp"
#include "engine_test_util.hpp"
#include "fixture_util.hpp"
#include "optimized/cpu/quantize.hpp"
#include "optimized/cuda/engine.hpp"
#include "reference/model.hpp"

namespace moelab::test {
namespace {

std::string lora_dir(const std::string& name) { return fixture("lora/" + name); }

// The model each fixture adapter belongs to (as test_lora.cpp).
std::string model_of(const std::string& adapter) {
  return adapter.rfind("mixtral-4e-gqa-f32", 0) == 0 ? "mixtral-4e-gqa-f32" : "mixtral-top1-swa";
}

#define MOELAB_LORA_CASES ::testing::Values("mixtral-4e-gqa-f32-r4", "mixtral-top1-swa-rslora")

cuda::EngineOptions with_adapter(std::shared_ptr<const LoraAdapter> adapter, cuda::ActType act = cuda::ActType::f32) {
  cuda::EngineOptions o;
  o.activations = act;
  o.adapter = std::move(adapter);
  return o;
}

// 60 tokens (the fixture models hold 64 positions): with 4 experts, each sees 15 or more of them, so the
// experts' NF4 products take the dequantize + GEMM path (more than 8 tokens per weight), which the
// fixtures' 12-token prompts leave mostly to the GEMV. Deterministic, as the bundled-model test's prompt.
std::vector<int32_t> long_prompt(const ModelConfig& cfg) {
  std::vector<int32_t> p{int32_t(cfg.bos_token_id)};
  for (int i = 1; i < 60; ++i) p.push_back(3 + int32_t((int64_t(i) * 7919) % (cfg.vocab_size - 3)));
  return p;
}

// The smallest gap, over tokens and layers, between the k-th and (k+1)-th largest router logit: how far
// the routing is from a tie that rounding could decide either way.
double smallest_topk_gap(const analysis::ForwardRecord& rec, int top_k) {
  double gap = 1e300;
  for (const auto& layer : rec.layers) {
    if (!layer.router_logits) continue;
    for (Eigen::Index t = 0; t < layer.router_logits->rows(); ++t) {
      std::vector<float> row(layer.router_logits->row(t).begin(), layer.router_logits->row(t).end());
      std::sort(row.begin(), row.end(), std::greater<>());
      if (int(row.size()) > top_k) gap = std::min(gap, double(row[size_t(top_k) - 1]) - double(row[size_t(top_k)]));
    }
  }
  return gap;
}

class CudaLora : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    ck = Checkpoint::open(model_dir(model_of(GetParam())));
    adapter = LoraAdapter::load(lora_dir(GetParam()), ck->config());
    expected = std::make_unique<SafetensorsFile>(lora_dir(GetParam()) + "/expected.safetensors");
    tokens = read_i32(*expected, "tokens");
    dequantized_dir = std::filesystem::temp_directory_path() /
                      ("moelab-cuda-lora-deq-" + std::to_string(::getpid()) + "-" + GetParam());
    std::filesystem::remove_all(dequantized_dir);
    cpu::write_dequantized_checkpoint(*ck, dequantized_dir.string(), 64, /*double_quant=*/true);
    dequantized = Checkpoint::open(dequantized_dir.string());
  }
  void TearDown() override {
    if (!dequantized_dir.empty()) std::filesystem::remove_all(dequantized_dir);
  }
  std::unique_ptr<Checkpoint> ck, dequantized;
  std::shared_ptr<const LoraAdapter> adapter;
  std::unique_ptr<SafetensorsFile> expected;
  std::vector<int32_t> tokens;
  std::filesystem::path dequantized_dir;
};

TEST_P(CudaLora, MatchesReferenceOnDequantizedWeightsEveryLayer) {
  cuda::CudaNf4Engine engine(*ck, with_adapter(adapter));
  ref::Model<float> reference(*dequantized, ref::ModelOptions{.adapter = adapter});
  const auto a = analysis::ForwardRecord::run(reference, tokens);
  const auto b = analysis::ForwardRecord::run(engine, tokens);
  const auto d = analysis::diff_records(a, b, "ref(dequantized)+adapter", "cuda-nf4+adapter");
  std::cout << d.table();
  expect_within(d, {.hidden = 1e-4, .router_logits = 1e-4, .logits = 1e-4});
  for (size_t l = 0; l < a.layers.size(); ++l) EXPECT_EQ(a.layers[l].experts, b.layers[l].experts) << "layer " << l;
  // NF4's quantization error against peft on the original weights: reported, as for cpu-nf4.
  const double vs_peft = rel_l2(b.logits, read_matrix_f32(*expected, "logits"));
  RecordProperty("nf4_vs_peft_rel_l2", std::to_string(vs_peft));
  std::cout << "cuda-nf4+adapter vs peft (original weights): relative L2 " << vs_peft << "\n";
  // The adapter's share: the same engine without it is far from the adapted logits.
  cuda::CudaNf4Engine plain(*ck, with_adapter(nullptr));
  EXPECT_GT(rel_l2(plain.forward(tokens), b.logits), 0.5);
}

TEST_P(CudaLora, DecodingTokenByTokenEqualsOnePrefill) {
  cuda::CudaNf4Engine engine(*ck, with_adapter(adapter));
  const MatrixRF prefill = engine.forward(tokens);
  engine.reset();
  for (size_t i = 0; i < tokens.size(); ++i) {
    const MatrixRF step = engine.forward(std::span<const int32_t>(&tokens[i], 1));
    EXPECT_LT(rel_l2(step, prefill.row(Eigen::Index(i))), 1e-4) << "position " << i;
  }
}

TEST_P(CudaLora, Bf16ActivationsStayCloseToTheReference) {
  cuda::CudaNf4Engine engine(*ck, with_adapter(adapter, cuda::ActType::bf16));
  ref::Model<float> reference(*dequantized, ref::ModelOptions{.adapter = adapter});
  const auto d = analysis::diff_records(analysis::ForwardRecord::run(reference, tokens),
                                        analysis::ForwardRecord::run(engine, tokens), "ref(dequantized)+adapter",
                                        "cuda-nf4 bf16+adapter");
  std::cout << d.table();
  expect_within(d, {.hidden = 2e-2, .router_logits = 2e-2, .logits = 3e-2, .min_topk_agreement = 0.9});
}

TEST_P(CudaLora, ExpertCacheComputesExactlyWhatResidentExpertsCompute) {
  const ModelConfig& cfg = ck->config();
  if (cfg.num_experts <= cfg.top_k) GTEST_SKIP() << "every expert is used by every token: nothing to offload";
  cuda::CudaNf4Engine resident(*ck, with_adapter(adapter));
  const auto want = analysis::ForwardRecord::run(resident, tokens);
  for (bool prefetch : {false, true}) {
    cuda::EngineOptions o = with_adapter(adapter);
    o.gpu_expert_cache = cfg.top_k;
    o.prefetch_experts = prefetch;
    cuda::CudaNf4Engine offloaded(*ck, o);
    const auto got = analysis::ForwardRecord::run(offloaded, tokens);
    ASSERT_TRUE(offloaded.expert_cache_stats().has_value());
    EXPECT_GT(offloaded.expert_cache_stats()->misses, 0);
    EXPECT_EQ(got.logits, want.logits) << "prefetch " << prefetch;
    for (size_t l = 0; l < got.layers.size(); ++l) EXPECT_EQ(got.layers[l].experts, want.layers[l].experts);
  }
}

// The experts' GEMM path with the adapter (see long_prompt), FP32 products, every layer within 1e-4 and
// the same experts. That the experts can be required equal is checked on the host below.
TEST_P(CudaLora, LongPromptTakesTheGemmPathAndMatchesTheReference) {
  const auto prompt = long_prompt(ck->config());
  cuda::CudaNf4Engine engine(*ck, with_adapter(adapter));
  ref::Model<float> reference(*dequantized, ref::ModelOptions{.adapter = adapter});
  const auto a = analysis::ForwardRecord::run(reference, prompt);
  const auto b = analysis::ForwardRecord::run(engine, prompt);
  for (const auto& layer : a.layers) {  // the premise: more than 8 tokens for some expert
    std::vector<int> count(size_t(ck->config().num_experts), 0);
    for (Eigen::Index i = 0; i < layer.experts.size(); ++i) ++count[size_t(layer.experts.data()[i])];
    EXPECT_GT(*std::max_element(count.begin(), count.end()), 8);
  }
  const auto d = analysis::diff_records(a, b, "ref(dequantized)+adapter", "cuda-nf4+adapter");
  std::cout << d.table();
  expect_within(d, {.hidden = 1e-4, .router_logits = 1e-4, .logits = 1e-4});
  for (size_t l = 0; l < a.layers.size(); ++l) EXPECT_EQ(a.layers[l].experts, b.layers[l].experts) << "layer " << l;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaLora, MOELAB_LORA_CASES, fixture_test_name);

// Host only (runs without a GPU): the long prompt's routing, with the adapter, on the dequantized weights
// that the device test compares against, is nowhere near a tie. Two FP32 evaluations of these router
// logits (|logit| < 10) in different summation orders differ by ~1e-6 relative, a few 1e-6 absolute; a
// gap above 1e-3 is hundreds of times that, so the device test may demand identical experts on this
// prompt. Measured here: smallest gaps 0.0020 (mixtral-4e-gqa-f32-r4) and 0.029 (mixtral-top1-swa-rslora),
// largest |logit| 3.7 and 5.1.
TEST(CudaLoraPremise, LongPromptRoutingIsFarFromATie) {
  for (const std::string name : {"mixtral-4e-gqa-f32-r4", "mixtral-top1-swa-rslora"}) {
    SCOPED_TRACE(name);
    const auto ck = Checkpoint::open(model_dir(model_of(name)));
    const auto adapter = LoraAdapter::load(lora_dir(name), ck->config());
    const auto dir = std::filesystem::temp_directory_path() /
                     ("moelab-cuda-lora-premise-" + std::to_string(::getpid()) + "-" + name);
    std::filesystem::remove_all(dir);
    cpu::write_dequantized_checkpoint(*ck, dir.string(), 64, /*double_quant=*/true);
    double gap = 0, largest = 0;
    {
      const auto deq = Checkpoint::open(dir.string());
      ref::Model<float> reference(*deq, ref::ModelOptions{.adapter = adapter});
      const auto rec = analysis::ForwardRecord::run(reference, long_prompt(ck->config()));
      gap = smallest_topk_gap(rec, ck->config().top_k);
      for (const auto& l : rec.layers) largest = std::max(largest, double(l.router_logits->cwiseAbs().maxCoeff()));
    }
    std::filesystem::remove_all(dir);
    std::cout << name << ": smallest top-k router-logit gap " << gap << ", largest |router logit| " << largest << "\n";
    EXPECT_LT(largest, 10.0);
    EXPECT_GT(gap, 1e-3);
  }
}

}  // namespace
}  // namespace moelab::test
