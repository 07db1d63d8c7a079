// cuda-nf4 with a LoRA adapter (issue 15): the unmerged product y = W x + s B (A x), A and B FP32 on the
// device, against the reference with the same adapter, on the fixture adapters (tests/fixtures/lora) and
// their models, and on three adapters made on the fly (a partial selection, a rank that grows mid-forward,
// a dense Mistral model's; see "adapters made on the fly" below). Label "device": every GPU test skips
// with the reason where no GPU is present. Written and compiled without a GPU; see docs/lora.md for
// whether it has run on one.
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
#include <cmath>
#include <filesystem>
#include <iostream>
#include <memory>
#include <random>
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
#include "lora_test_util.hpp"
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


// A checkpoint's NF4-dequantized twin (blocksize 64, double quantization: what cuda-nf4 quantizes at load) in a
// temporary folder that goes with the object, so the reference computes what an exact NF4 engine computes.
struct DequantizedTwin {
  explicit DequantizedTwin(const Checkpoint& ck) : dir("moelab-cuda-lora-deq") {
    cpu::write_dequantized_checkpoint(ck, dir.str(), 64, /*double_quant=*/true);
    checkpoint = Checkpoint::open(dir.str());
  }
  TempDir dir;  // (declared first: removed after the checkpoint is closed)
  std::unique_ptr<Checkpoint> checkpoint;
};

class CudaLora : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    ck = Checkpoint::open(model_dir(model_of(GetParam())));
    adapter = LoraAdapter::load(lora_dir(GetParam()), ck->config());
    expected = std::make_unique<SafetensorsFile>(lora_dir(GetParam()) + "/expected.safetensors");
    tokens = read_i32(*expected, "tokens");
    twin = std::make_unique<DequantizedTwin>(*ck);
    dequantized = twin->checkpoint.get();
  }
  std::unique_ptr<Checkpoint> ck;
  std::unique_ptr<DequantizedTwin> twin;
  const Checkpoint* dequantized = nullptr;
  std::shared_ptr<const LoraAdapter> adapter;
  std::unique_ptr<SafetensorsFile> expected;
  std::vector<int32_t> tokens;
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
  const auto want = analysis::ForwardRecord::run(reference, tokens), got = analysis::ForwardRecord::run(engine, tokens);
  std::cout << analysis::diff_records(want, got, "ref(dequantized)+adapter", "cuda-nf4 bf16+adapter").table();
  // test_cuda_engine.cpp's BF16 limits; a router near-tie (these adapters leave margins of 0.003) may flip a
  // token's experts under BF16 rounding: what the flip reaches is left out (engine_test_util.hpp).
  const auto limit = [](double v) { return [v](int) { return v; }; };
  expect_close_where_routed_alike(want, got, {.hidden = limit(2e-2), .router_logits = limit(2e-2), .logits = 3e-2});
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
    const DequantizedTwin twin(*ck);
    double gap = 0, largest = 0;
    {
      const auto& deq = twin.checkpoint;
      ref::Model<float> reference(*deq, ref::ModelOptions{.adapter = adapter});
      const auto rec = analysis::ForwardRecord::run(reference, long_prompt(ck->config()));
      gap = smallest_topk_gap(rec, ck->config().top_k);
      for (const auto& l : rec.layers) largest = std::max(largest, double(l.router_logits->cwiseAbs().maxCoeff()));
    }
    std::cout << name << ": smallest top-k router-logit gap " << gap << ", largest |router logit| " << largest << "\n";
    EXPECT_LT(largest, 10.0);
    EXPECT_GT(gap, 1e-3);
  }
}

// ------------------------------------------------------------------ adapters made on the fly (desk review)
// Three adapters the fixtures lack, each compared on the device with the reference holding the same
// adapter, within the tolerances above (FP32 products: 1e-4 every layer and the logits, equal experts):
// - "partial": the r4 fixture with layers_to_transform [1] and exclude_modules [o_proj, experts.0.w2], as
//   test_lora.cpp's selection test builds it: layer 0 has no factors at all, layer 1's o_proj and expert
//   0's w2 none, beside adapted q/k/v, router and the other experts: the engine's early return for an
//   unadapted weight runs between adapted ones.
// - "rank-growth": the r4 fixture with w1 at rank 16 (rank_pattern, random factors of that rank; alpha 32
//   by alpha_pattern keeps its scale at 2). The first LoRA product of a forward (q_proj, rank 4) sizes the
//   scratch for t = A x at n x 4; an expert's w1 with more than n / 4 of the tokens needs more, so the
//   scratch grows mid-forward with the attention and router products queued before it (the host test
//   checks that such an expert exists for both prompts). Decoding from a fresh engine grows it at the
//   first token (1 x 4, then 1 x 16).
// - "dense": the Mistral-architecture fixture (mistral-dense) with an adapter written here: rank 4, alpha 8
//   on q/k/v/o_proj and mlp.gate_proj/up_proj/down_proj of every layer, random factors (below).
#define MOELAB_LORA_VARIANTS ::testing::Values("partial", "rank-growth", "dense")

constexpr int kGrownRank = 16;

// A made adapter and the fixture model it belongs to.
struct MadeAdapter {
  std::string model;
  std::unique_ptr<AdapterDir> dir;
};

// Factors for a module with `in` inputs at rank r: A ~ N(0, 1/sqrt(in)) keeps (A x) at the scale of x's
// RMS, B ~ N(0, 0.25/sqrt(r)) puts B (A x) at a quarter of it, times the scale 2: about half of x's RMS,
// against W x at ~1.2 x's RMS for these fixtures (initializer_range 0.15, 64 or 128 inputs): the adapter
// moves the logits about as far as the fixture adapters move theirs (checked and measured on the host
// below), far beyond the 1e-4 tolerance. Seeded: every run writes the same adapter.
void add_random_factors(std::vector<TensorToWrite>& ts, const std::string& module, int64_t out, int64_t in, int rank,
                        std::mt19937& rng) {
  ts.push_back(random_factor(lora_a_name(module), rank, in, 1.0 / std::sqrt(double(in)), rng));
  ts.push_back(random_factor(lora_b_name(module), out, rank, 0.25 / std::sqrt(double(rank)), rng));
}

MadeAdapter make_adapter(const std::string& variant) {
  if (variant == "partial") {
    MadeAdapter m{"mixtral-4e-gqa-f32", std::make_unique<AdapterDir>("mixtral-4e-gqa-f32-r4")};
    m.dir->edit_config([](nlohmann::ordered_json& j) {
      j["layers_to_transform"] = {1};
      j["exclude_modules"] = {"o_proj", "experts.0.w2"};
    });
    m.dir->edit_tensors([](std::vector<TensorToWrite>& ts) {
      std::erase_if(ts, [](const TensorToWrite& t) {
        return t.name.find("layers.0.") != std::string::npos || t.name.find("o_proj") != std::string::npos ||
               t.name.find("experts.0.w2.") != std::string::npos;
      });
    });
    return m;
  }
  if (variant == "rank-growth") {
    MadeAdapter m{"mixtral-4e-gqa-f32", std::make_unique<AdapterDir>("mixtral-4e-gqa-f32-r4")};
    m.dir->edit_config([](nlohmann::ordered_json& j) {
      j["rank_pattern"]["w1"] = kGrownRank;
      j["alpha_pattern"]["w1"] = 2 * kGrownRank;
    });
    std::mt19937 rng(15);
    m.dir->edit_tensors([&](std::vector<TensorToWrite>& ts) {
      for (auto& t : ts) {  // A [r, in] -> [16, in], B [out, r] -> [out, 16], as add_random_factors draws them
        if (t.name.ends_with(".w1.lora_A.weight"))
          t = random_factor(t.name, kGrownRank, t.shape[1], 1.0 / std::sqrt(double(t.shape[1])), rng);
        else if (t.name.ends_with(".w1.lora_B.weight"))
          t = random_factor(t.name, t.shape[0], kGrownRank, 0.25 / std::sqrt(double(kGrownRank)), rng);
      }
    });
    return m;
  }
  if (variant == "dense") {
    MadeAdapter m{"mistral-dense", std::make_unique<AdapterDir>()};
    const auto ck = Checkpoint::open(model_dir(m.model));
    const ModelConfig& cfg = ck->config();
    const std::vector<std::string> targets{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    nlohmann::ordered_json j;
    j["peft_type"] = "LORA";
    j["task_type"] = "CAUSAL_LM";
    j["r"] = 4;
    j["lora_alpha"] = 8;
    j["target_modules"] = targets;
    j["bias"] = "none";
    j["init_lora_weights"] = false;
    m.dir->set_config(j);
    SafetensorsFile weights(model_dir(m.model) + "/model.safetensors");
    std::mt19937 rng(15);
    std::vector<TensorToWrite> ts;
    for (const auto& [name, info] : weights.tensors()) {
      const bool target = std::any_of(targets.begin(), targets.end(), [&](const std::string& t) {
        return name.find("." + t + ".weight") != std::string::npos;
      });
      if (target) add_random_factors(ts, module_of(name), info.shape[0], info.shape[1], 4, rng);
    }
    EXPECT_EQ(ts.size(), size_t(2 * targets.size() * size_t(cfg.num_layers)));
    m.dir->write_tensors(ts);
    return m;
  }
  throw Error("make_adapter: no variant " + variant);
}

// The experts each token chose in layer `layer`, counted per expert.
std::vector<int> tokens_per_expert(const analysis::ForwardRecord& rec, size_t layer, int num_experts) {
  std::vector<int> count(size_t(num_experts), 0);
  const auto& e = rec.layers[layer].experts;
  for (Eigen::Index i = 0; i < e.size(); ++i) ++count[size_t(e.data()[i])];
  return count;
}

// The model's own fixture prompt (its expected.safetensors) and the 60-token prompt.
std::vector<std::vector<int32_t>> variant_prompts(const std::string& model, const ModelConfig& cfg) {
  return {read_i32(SafetensorsFile(model_dir(model) + "/expected.safetensors"), "tokens"), long_prompt(cfg)};
}

class CudaLoraMadeAdapter : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    made = make_adapter(GetParam());
    ck = Checkpoint::open(model_dir(made.model));
    adapter = LoraAdapter::load(made.dir->str(), ck->config());
    twin = std::make_unique<DequantizedTwin>(*ck);
    dequantized = twin->checkpoint.get();
  }
  MadeAdapter made;
  std::unique_ptr<Checkpoint> ck;
  std::unique_ptr<DequantizedTwin> twin;
  const Checkpoint* dequantized = nullptr;
  std::shared_ptr<const LoraAdapter> adapter;
};

// Both prompts: the fixture's 12 tokens (the experts' GEMV path) and the 60 (their GEMM path). One engine
// for both: ForwardRecord::run resets the cache, and the second prompt runs on the scratch the first grew.
TEST_P(CudaLoraMadeAdapter, MatchesReferenceOnDequantizedWeightsEveryLayer) {
  cuda::CudaNf4Engine engine(*ck, with_adapter(adapter));
  ref::Model<float> reference(*dequantized, ref::ModelOptions{.adapter = adapter});
  for (const auto& prompt : variant_prompts(made.model, ck->config())) {
    SCOPED_TRACE(std::to_string(prompt.size()) + " tokens");
    const auto a = analysis::ForwardRecord::run(reference, prompt);
    const auto b = analysis::ForwardRecord::run(engine, prompt);
    const auto d = analysis::diff_records(a, b, "ref(dequantized)+" + GetParam(), "cuda-nf4+" + GetParam());
    std::cout << d.table();
    expect_within(d, {.hidden = 1e-4, .router_logits = 1e-4, .logits = 1e-4});
    for (size_t l = 0; l < a.layers.size(); ++l) EXPECT_EQ(a.layers[l].experts, b.layers[l].experts) << "layer " << l;
  }
}

// A fresh engine decoding one token at a time (the GEMV path; for "rank-growth" the scratch grows at the
// first token) against the reference's prefill, the rows stacked: 1e-4 as the logits above.
TEST_P(CudaLoraMadeAdapter, DecodingFromAFreshEngineMatchesTheReference) {
  const auto prompt = variant_prompts(made.model, ck->config()).front();
  ref::Model<float> reference(*dequantized, ref::ModelOptions{.adapter = adapter});
  const MatrixRF want = reference.forward(prompt);
  cuda::CudaNf4Engine engine(*ck, with_adapter(adapter));
  MatrixRF got(want.rows(), want.cols());
  for (size_t i = 0; i < prompt.size(); ++i)
    got.row(Eigen::Index(i)) = engine.forward(std::span<const int32_t>(&prompt[i], 1));
  EXPECT_LT(rel_l2(got, want), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Made, CudaLoraMadeAdapter, MOELAB_LORA_VARIANTS, fixture_test_name);

// Host only (runs without a GPU): what the device comparisons above rely on, on the dequantized weights
// they use, for both prompts.
// - The made adapter loads with the modules it should have, and moves the logits far outside the 1e-4
//   tolerance: against no adapter, and ("partial", "rank-growth") against the full r4 fixture adapter it
//   was made from, so a device engine that ignored the selection or the grown rank fails. Required > 1e-2,
//   100x the tolerance. Measured (12 / 60 tokens): partial 0.79 / 0.76 from no adapter, 1.24 / 1.28 from
//   the full one; rank-growth 1.25 / 1.24 and 0.86 / 0.83; dense 0.97 / 1.02 from no adapter (the
//   fixture adapters move their logits by 1.2-1.4).
// - MoE: the routing is far from a tie (as LongPromptRoutingIsFarFromATie: gap > 1e-3, |logit| < 10), so
//   the device test may demand identical experts. Measured smallest gaps: partial 0.0076 / 0.0023,
//   rank-growth 0.050 / 0.0020; largest |router logit| 3.7.
// - "rank-growth": in layer 0 some expert takes more than n / 4 of the n tokens, so its w1 product
//   (rank 16) needs a larger t = A x than q_proj's (rank 4, n rows): the scratch grows mid-forward.
//   Measured: the busiest expert of layer 0 takes 9 of 12 and 46 of 60 tokens.
TEST(CudaLoraMadeAdapterPremise, AdapterMattersAndComparisonsAreDecidable) {
  for (const std::string variant : {"partial", "rank-growth", "dense"}) {
    SCOPED_TRACE(variant);
    const MadeAdapter made = make_adapter(variant);
    const auto ck = Checkpoint::open(model_dir(made.model));
    const ModelConfig& cfg = ck->config();
    const auto adapter = LoraAdapter::load(made.dir->str(), cfg);
    if (variant == "partial") {
      for (const auto& [name, _] : adapter->modules()) EXPECT_EQ(name.rfind("model.layers.1.", 0), 0u) << name;
      EXPECT_EQ(adapter->find("model.layers.1.self_attn.o_proj.weight"), nullptr);
      EXPECT_EQ(adapter->find(cfg.w2_name(1, 0)), nullptr);
      EXPECT_NE(adapter->find(cfg.w2_name(1, 1)), nullptr);
      EXPECT_NE(adapter->find(cfg.w1_name(1, 0)), nullptr);
      EXPECT_EQ(adapter->modules().size(), size_t(3 + 1 + 3 * cfg.num_experts - 1));
    } else if (variant == "rank-growth") {
      for (int l = 0; l < cfg.num_layers; ++l)
        for (int e = 0; e < cfg.num_experts; ++e) {
          ASSERT_NE(adapter->find(cfg.w1_name(l, e)), nullptr);
          EXPECT_EQ(adapter->find(cfg.w1_name(l, e))->rank, kGrownRank);
          EXPECT_EQ(adapter->find(cfg.w1_name(l, e))->scale, 2.0);
        }
      EXPECT_EQ(adapter->find("model.layers.0.self_attn.q_proj.weight")->rank, 4);
    } else {
      EXPECT_EQ(adapter->modules().size(), size_t(7 * cfg.num_layers));
      ASSERT_NE(adapter->find(cfg.w2_name(0, 0)), nullptr);
      EXPECT_EQ(adapter->find(cfg.w2_name(0, 0))->scale, 2.0);
    }
    const std::shared_ptr<const LoraAdapter> full =
        variant == "dense" ? nullptr : LoraAdapter::load(lora_dir("mixtral-4e-gqa-f32-r4"), cfg);
    const DequantizedTwin twin(*ck);  // removed even when a check throws
    {
      const auto& deq = twin.checkpoint;
      ref::Model<float> with(*deq, ref::ModelOptions{.adapter = adapter});
      ref::Model<float> without(*deq);
      for (const auto& prompt : variant_prompts(made.model, cfg)) {
        SCOPED_TRACE(std::to_string(prompt.size()) + " tokens");
        const auto rec = analysis::ForwardRecord::run(with, prompt);
        without.reset();
        const double vs_plain = rel_l2(rec.logits, without.forward(prompt));
        std::cout << variant << ", " << prompt.size() << " tokens: vs no adapter " << vs_plain;
        EXPECT_GT(vs_plain, 1e-2);
        if (full) {
          ref::Model<float> with_full(*deq, ref::ModelOptions{.adapter = full});
          const double vs_full = rel_l2(rec.logits, with_full.forward(prompt));
          std::cout << ", vs the full r4 adapter " << vs_full;
          EXPECT_GT(vs_full, 1e-2);
        }
        if (cfg.is_moe()) {
          double largest = 0;
          for (const auto& l : rec.layers) largest = std::max(largest, double(l.router_logits->cwiseAbs().maxCoeff()));
          const double gap = smallest_topk_gap(rec, cfg.top_k);
          std::cout << ", smallest top-k gap " << gap << ", largest |router logit| " << largest;
          EXPECT_LT(largest, 10.0);
          EXPECT_GT(gap, 1e-3);
        }
        if (variant == "rank-growth") {
          const auto count = tokens_per_expert(rec, 0, cfg.num_experts);
          const int most = *std::max_element(count.begin(), count.end());
          std::cout << ", layer 0's busiest expert " << most << " of " << prompt.size() << " tokens";
          EXPECT_GT(int64_t(most) * kGrownRank, int64_t(prompt.size()) * 4);
        }
        std::cout << "\n";
      }
    }
  }
}

}  // namespace
}  // namespace moelab::test
