// ModelConfig against the real Mixtral-8x7B-v0.1 config.json and an independent parameter count
// (transformers on the meta device, recorded in tests/fixtures/configs/README.md).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/config.hpp"
#include "core/model_presets.hpp"
#include "core/error.hpp"
#include "fixture_util.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

TEST(Config, Mixtral8x7BRealConfig) {
  const auto c = ModelConfig::from_json_file(fixture("configs/mixtral-8x7b-v0.1.json"));
  EXPECT_EQ(c.arch, Architecture::Mixtral);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.head_dim, 128);  // derived: the file has no head_dim
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_FALSE(c.tie_word_embeddings);
  // Independent counts: transformers' MixtralForCausalLM on the meta device (fixtures README).
  EXPECT_EQ(c.total_params(), 46'702'792'704);
  EXPECT_EQ(c.active_params(), 12'879'925'248);
  EXPECT_EQ(c.expected_tensors().size(), 995u);  // 32 * 31 + 3
}

TEST(Config, MemoryEstimatesFollowFromTheCounts) {
  const auto c = ModelConfig::from_json_file(fixture("configs/mixtral-8x7b-v0.1.json"));
  const auto m = memory_estimates(c, 4096);
  ASSERT_GE(m.size(), 2u);
  EXPECT_EQ(m[0].engine, "ref");
  EXPECT_EQ(m[0].weight_bytes, c.total_params() * 4);
  // KV cache: 32 layers x (K and V) x 8 heads x 128 dims x 4096 tokens x 4 bytes = 1 GiB.
  EXPECT_EQ(m[0].kv_cache_bytes, int64_t(1) << 30);
  EXPECT_LT(m[1].weight_bytes, m[0].weight_bytes / 20);  // streaming keeps one layer
  // cuda-nf4: the linears, 32 x (2 x 4096^2 + 2 x 1024 x 4096 + 8 x 4096 + 8 x 3 x 14336 x 4096) =
  // 46,440,382,464 weights at 4.5 bits (codes + FP32 absmax per 64) = 26.12 GB, plus FP32 embedding,
  // lm_head and norms (2 x 32000 x 4096 + 65 x 4096 = 262,410,240 values, 1.05 GB): 27.17 GB.
  ASSERT_EQ(m.size(), 5u);
  // cpu-nf4 (int8 activations, the default): codes (4 bits) + compact absmax (8 bits per 64 + FP32 per
  // 256 x 64) = 23.96 GB, the q8 lm_head 32000 x (4096 + 4) bytes, FP32 norms.
  EXPECT_EQ(m[2].engine, "cpu-nf4");
  EXPECT_EQ(m[2].weight_bytes, 46'440'382'464LL / 2 + 46'440'382'464LL / 64 + 46'440'382'464LL / (64 * 256) * 4 +
                                   32000LL * (4096 + 4) + 65LL * 4096 * 4);
  EXPECT_EQ(m[3].engine, "cuda-nf4");
  EXPECT_EQ(m[3].weight_bytes, 46'440'382'464LL / 2 + 46'440'382'464LL / 64 * 4 + 262'410'240LL * 4);
  EXPECT_EQ(m[3].kv_cache_bytes, int64_t(1) << 30);
  // With 2 of 8 experts per layer on the GPU, 3/4 of the 45.1B expert weights (32 x 8 x 176,160,768)
  // leave it: 19.02 GB less.
  const int64_t experts = 32LL * 8 * 176'160'768;
  EXPECT_EQ(m[4].weight_bytes, m[3].weight_bytes - (experts / 2 + experts / 64 * 4) * 3 / 4);
}

TEST(Config, TransformersWrittenConfigsParse) {
  // transformers 4.57 writes "dtype" (not torch_dtype) and "head_dim": null.
  const auto c = ModelConfig::from_json_file(model_dir("mixtral-top1-swa") + "/config.json");
  EXPECT_EQ(c.head_dim, c.hidden_size / c.num_heads);
  EXPECT_EQ(c.top_k, 1);
  EXPECT_EQ(c.sliding_window, 4);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_EQ(c.lm_head_name(), "model.embed_tokens.weight");
}

TEST(Config, MistralIsTheDenseCase) {
  const auto c = ModelConfig::from_json_file(model_dir("mistral-dense") + "/config.json");
  EXPECT_EQ(c.arch, Architecture::Mistral);
  EXPECT_FALSE(c.is_moe());
  EXPECT_EQ(c.num_experts, 1);
  EXPECT_EQ(c.top_k, 1);
  EXPECT_EQ(c.w1_name(1, 0), "model.layers.1.mlp.gate_proj.weight");
  EXPECT_EQ(c.total_params(), c.active_params());
}

void expect_config_error(const std::string& text, const std::string& needle) {
  try {
    ModelConfig::from_json_text(text, "some/config.json");
    FAIL() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("some/config.json"), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(Config, BadConfigsAreClearErrors) {
  const std::string good = read_file_bytes(fixture("configs/mixtral-8x7b-v0.1.json"));
  auto with = [&](const std::string& key, const std::string& value) {
    auto j = nlohmann::json::parse(good);
    j[key] = nlohmann::json::parse(value);
    return j.dump();
  };
  expect_config_error("{not json", "not valid JSON");
  expect_config_error("[1, 2]", "not a JSON object");
  expect_config_error(with("architectures", "[\"LlamaForCausalLM\"]"), "unsupported architecture");
  expect_config_error(with("hidden_size", "0"), "hidden_size");
  expect_config_error(with("hidden_size", "\"4096\""), "hidden_size");
  expect_config_error(with("num_key_value_heads", "5"), "num_key_value_heads");
  expect_config_error(with("num_experts_per_tok", "9"), "num_experts_per_tok");
  expect_config_error(with("hidden_act", "\"gelu\""), "hidden_act");
  expect_config_error(with("rms_norm_eps", "-1"), "rms_norm_eps");
  expect_config_error(with("sliding_window", "{\"type\": 1}"), "sliding_window");
  auto no_vocab = nlohmann::json::parse(good);
  no_vocab.erase("vocab_size");
  expect_config_error(no_vocab.dump(), "missing 'vocab_size'");
  expect_config_error(with("tie_word_embeddings", "\"yes\""), "wrong type");
  expect_config_error(with("architectures", "[42]"), "wrong type");
  EXPECT_THROW(ModelConfig::from_json_file("/nonexistent/config.json"), Error);
}

// Issue 13 item 8: every dimension is bounded, and counts are checked 64-bit arithmetic.
TEST(ConfigLimits, TenMillionLayersIsRefusedAtParse) {
  const std::string good = read_file_bytes(fixture("configs/mixtral-8x7b-v0.1.json"));
  auto j = nlohmann::json::parse(good);
  j["num_hidden_layers"] = 10'000'000;
  expect_config_error(j.dump(), "'num_hidden_layers' is 10000000, more than the 1024 moelab accepts");
}

TEST(ConfigLimits, EveryDimensionHasAnUpperBound) {
  const std::string good = read_file_bytes(fixture("configs/mixtral-8x7b-v0.1.json"));
  for (const auto& [key, limit] : std::vector<std::pair<std::string, int64_t>>{
           {"vocab_size", limits::kMaxVocab},
           {"hidden_size", limits::kMaxHidden},
           {"intermediate_size", limits::kMaxIntermediate},
           {"num_hidden_layers", limits::kMaxLayers},
           {"num_attention_heads", limits::kMaxHeads},
           {"num_key_value_heads", limits::kMaxHeads},
           {"head_dim", limits::kMaxHeadDim},
           {"num_local_experts", limits::kMaxExperts},
           {"num_experts_per_tok", limits::kMaxExperts},
           {"max_position_embeddings", limits::kMaxPositions},
           {"sliding_window", limits::kMaxPositions}}) {
    SCOPED_TRACE(key);
    auto j = nlohmann::json::parse(good);
    j[key] = limit + 1;
    expect_config_error(j.dump(), "'" + key + "' is " + std::to_string(limit + 1) + ", more than the");
  }
  // Values past int64 are refused too, not wrapped.
  auto j = nlohmann::json::parse(good);
  j["hidden_size"] = nlohmann::json::parse("18446744073709551615");
  expect_config_error(j.dump(), "'hidden_size' must be a positive integer");
}

TEST(ConfigLimits, SizesThatOverflowedInt64AreRefused) {
  // Accepted before the bounds (each dimension was allowed up to 2^30) and counted with wrapping
  // arithmetic: total_params() came out negative and inspect printed negative MiB.
  const std::string good = read_file_bytes(fixture("configs/mixtral-8x7b-v0.1.json"));
  auto j = nlohmann::json::parse(good);
  j["hidden_size"] = 1 << 30;
  j["intermediate_size"] = 1 << 30;
  j["num_attention_heads"] = 1 << 20;
  j["num_key_value_heads"] = 1 << 20;
  expect_config_error(j.dump(), "'hidden_size' is 1073741824, more than the");
}

TEST(ConfigLimits, CountsAtTheLimitsArePositiveAndExact) {
  // The largest config the bounds allow: every count and memory estimate stays positive and exact.
  auto j = nlohmann::json::parse(read_file_bytes(fixture("configs/mixtral-8x7b-v0.1.json")));
  j["vocab_size"] = limits::kMaxVocab;
  j["hidden_size"] = limits::kMaxHidden;
  j["intermediate_size"] = limits::kMaxIntermediate;
  j["num_hidden_layers"] = limits::kMaxLayers;
  j["num_attention_heads"] = 16;
  j["num_key_value_heads"] = 16;
  j["head_dim"] = limits::kMaxHeadDim;
  j["num_local_experts"] = limits::kMaxExperts;
  j["num_experts_per_tok"] = limits::kMaxExperts;
  const auto c = ModelConfig::from_json_text(j.dump(), "big/config.json");
  const __int128 H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, L = c.num_layers, E = c.num_experts;
  const __int128 q = __int128(16) * c.head_dim;
  const __int128 want = 2 * V * H + H + L * (2 * H * q + 2 * H * q + 2 * H + E * H + E * 3 * H * I);
  EXPECT_EQ(__int128(c.total_params()), want);
  EXPECT_GT(c.total_params(), 0);
  for (const auto& m : memory_estimates(c, 4096)) {
    EXPECT_GT(m.weight_bytes, 0) << m.engine;
    EXPECT_GT(m.kv_cache_bytes, 0) << m.engine;
  }
  EXPECT_EQ(c.expected_tensor_count(), int64_t(L) * (7 + 3 * E) + 3);
}

TEST(ConfigLimits, ExpectedTensorCountMatchesTheList) {
  const auto c = ModelConfig::from_json_file(fixture("configs/mixtral-8x7b-v0.1.json"));
  EXPECT_EQ(c.expected_tensor_count(), int64_t(c.expected_tensors().size()));
}

TEST(ModelPresets, Mixtral8x7BPresetIsTheRealConfig) {
  const auto real = ModelConfig::from_json_file(fixture("configs/mixtral-8x7b-v0.1.json"));
  const auto p = model_preset("mixtral-8x7b");
  EXPECT_EQ(p.total_params(), real.total_params());
  EXPECT_EQ(p.active_params(), real.active_params());
  EXPECT_EQ(p.expected_tensors().size(), real.expected_tensors().size());
  EXPECT_EQ(p.vocab_size, real.vocab_size);
  EXPECT_EQ(p.max_position_embeddings, real.max_position_embeddings);
  EXPECT_EQ(p.rope_theta, real.rope_theta);
  EXPECT_EQ(p.sliding_window, real.sliding_window);
  EXPECT_EQ(p.rms_norm_eps, real.rms_norm_eps);
  EXPECT_EQ(p.tie_word_embeddings, real.tie_word_embeddings);
  EXPECT_EQ(p.head_dim, real.head_dim);
}

TEST(ModelPresets, UnknownPresetNamesTheKnownOnes) {
  try {
    model_preset("mixtral-9x9b");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mixtral-8x7b"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moelab::test
