#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/config.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"
#include "process_util.hpp"

using namespace moelab;
namespace fs = std::filesystem;
using moelab::test::TempDir;
using nlohmann::json;

namespace {


void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

// A tiny Mixtral: vocab 16, hidden 8, intermediate 12, 4 heads (head_dim 2), 2 kv heads, 2 experts top-1.
json tiny_config_json(int layers = 2) {
  return json{{"architectures", {"MixtralForCausalLM"}},
              {"model_type", "mixtral"},
              {"vocab_size", 16},
              {"hidden_size", 8},
              {"intermediate_size", 12},
              {"num_hidden_layers", layers},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"num_local_experts", 2},
              {"num_experts_per_tok", 1},
              {"max_position_embeddings", 32},
              {"rms_norm_eps", 1e-5},
              {"rope_theta", 1000000.0},
              {"hidden_act", "silu"},
              {"tie_word_embeddings", false},
              {"torch_dtype", "bfloat16"}};
}

// Deterministic values k/16, |k| <= 15: exact in F32, F16 and BF16, different per tensor and element.
std::vector<float> values_for(size_t tensor_index, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = float(int64_t((i * 7 + tensor_index * 13) % 31) - 15) / 16.0f;
  return v;
}

struct Weights {
  std::vector<TensorSpec> specs;
  std::map<std::string, std::vector<float>> values;
};

Weights make_weights(const ModelConfig& c) {
  Weights w;
  w.specs = c.expected_tensors();
  for (size_t i = 0; i < w.specs.size(); ++i) {
    int64_t n = 1;
    for (auto d : w.specs[i].shape) n *= d;
    w.values[w.specs[i].name] = values_for(i, n);
  }
  return w;
}

TensorToWrite to_tensor(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& v,
                        DType dtype) {
  if (dtype == DType::F32) return make_f32_tensor(name, shape, v.data());
  EXPECT_EQ(dtype, DType::BF16) << "test helper writes F32 or BF16";
  TensorToWrite t{name, DType::BF16, shape, std::vector<std::byte>(v.size() * 2)};
  for (size_t i = 0; i < v.size(); ++i) {
    const uint16_t h = f32_to_bf16(v[i]);
    std::memcpy(t.data.data() + 2 * i, &h, 2);
  }
  return t;
}

std::vector<TensorToWrite> all_tensors(const Weights& w, DType dtype = DType::F32) {
  std::vector<TensorToWrite> out;
  for (const auto& s : w.specs) out.push_back(to_tensor(s.name, s.shape, w.values.at(s.name), dtype));
  return out;
}

void write_config(const TempDir& dir, const json& config) { write_text(dir.file("config.json"), config.dump(2)); }

// Splits tensors round-robin over `n` shards named like HF does and writes the index.
// Returns the shard file of each tensor.
std::map<std::string, std::string> write_sharded(const TempDir& dir, const std::vector<TensorToWrite>& tensors,
                                                 int n) {
  std::vector<std::vector<TensorToWrite>> shards(static_cast<size_t>(n));
  std::map<std::string, std::string> where;
  uint64_t total = 0;
  auto shard_name = [n](int i) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", i + 1, n);
    return std::string(buf);
  };
  for (size_t i = 0; i < tensors.size(); ++i) {
    shards[i % size_t(n)].push_back(tensors[i]);
    where[tensors[i].name] = shard_name(int(i % size_t(n)));
    total += tensors[i].data.size();
  }
  for (int i = 0; i < n; ++i) write_safetensors(dir.file(shard_name(i)), shards[size_t(i)], {{"format", "pt"}});
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", where}};
  write_text(dir.file("model.safetensors.index.json"), index.dump(2));
  return where;
}

// Open must fail with a one-line moelab::Error containing every needle.
std::string expect_open_error(const std::string& dir, std::initializer_list<std::string> needles) {
  std::string msg;
  try {
    Checkpoint::open(dir);
    ADD_FAILURE() << "expected an error opening " << dir;
    return {};
  } catch (const Error& e) {
    msg = e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected moelab::Error, got: " << e.what();
    return {};
  }
  for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "no '" << n << "' in: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
  return msg;
}

const ModelConfig& tiny_config() {
  static const ModelConfig c = ModelConfig::from_json_text(tiny_config_json().dump(), "tiny");
  return c;
}

void expect_values(const Checkpoint& ck, const Weights& w) {
  for (const auto& s : w.specs) {
    SCOPED_TRACE(s.name);
    ASSERT_TRUE(ck.contains(s.name));
    EXPECT_EQ(ck.info(s.name).shape, s.shape);
    EXPECT_EQ(ck.read_f32(s.name), w.values.at(s.name));
  }
}

}  // namespace

// ================================================================= valid folders

TEST(CheckpointOpen, TinyConfigHasTheExpectedTensorList) {
  const auto& c = tiny_config();
  EXPECT_EQ(c.head_dim, 2);
  // embed + 2 layers x (2 norms + 4 attention + router + 2 experts x 3) + norm + lm_head
  EXPECT_EQ(c.expected_tensors().size(), 1u + 2u * (2 + 4 + 1 + 6) + 1u + 1u);
}

TEST(CheckpointOpen, SingleFileOpensAndReadsWhatWasWritten) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  write_safetensors(dir.file("model.safetensors"), all_tensors(w), {{"format", "pt"}});

  auto ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck->dir(), dir.str());
  EXPECT_EQ(ck->config().hidden_size, 8);
  EXPECT_EQ(ck->config().num_layers, 2);
  EXPECT_EQ(ck->config().num_experts, 2);
  EXPECT_EQ(ck->shards().size(), 1u);
  EXPECT_TRUE(ck->warnings().empty());
  EXPECT_EQ(ck->tokenizer_path(), (fs::path(dir.str()) / "tokenizer.model").string());
  expect_values(*ck, w);
  EXPECT_EQ(ck->file_of("model.norm.weight").path(), dir.file("model.safetensors"));

  // Rows [5, 8) of the embedding (16 x 8) and of an expert's w2 (8 x 12).
  const auto& embed = w.values.at("model.embed_tokens.weight");
  std::vector<float> rows(3 * 8);
  ck->read_rows_f32("model.embed_tokens.weight", 5, 3, rows.data());
  EXPECT_EQ(rows, std::vector<float>(embed.begin() + 5 * 8, embed.begin() + 8 * 8));
  const std::string w2 = tiny_config().w2_name(1, 1);
  const auto& w2v = w.values.at(w2);
  std::vector<float> last(12);
  ck->read_rows_f32(w2, 7, 1, last.data());
  EXPECT_EQ(last, std::vector<float>(w2v.end() - 12, w2v.end()));
}

TEST(CheckpointOpen, ShardedWithIndexOpensAndReadsWhatWasWritten) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  const auto where = write_sharded(dir, all_tensors(w), 3);

  auto ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck->shards().size(), 3u);
  EXPECT_TRUE(ck->warnings().empty());
  expect_values(*ck, w);
  for (const auto& [name, shard] : where) EXPECT_EQ(ck->file_of(name).path(), dir.file(shard)) << name;
  std::vector<float> rows(2 * 8);
  ck->read_rows_f32("lm_head.weight", 14, 2, rows.data());
  const auto& lm = w.values.at("lm_head.weight");
  EXPECT_EQ(rows, std::vector<float>(lm.end() - 16, lm.end()));
}

TEST(CheckpointOpen, IndexTakesPrecedenceOverSingleFile) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  write_sharded(dir, all_tensors(w), 2);
  write_text(dir.file("model.safetensors"), "not a safetensors file");  // must not be read
  auto ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck->shards().size(), 2u);
}

TEST(CheckpointOpen, BF16StorageReadsBackExactly) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  write_sharded(dir, all_tensors(w, DType::BF16), 2);
  auto ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck->info("model.embed_tokens.weight").dtype, DType::BF16);
  expect_values(*ck, w);
  std::vector<float> row(8);
  ck->read_rows_f32("model.embed_tokens.weight", 15, 1, row.data());
  const auto& embed = w.values.at("model.embed_tokens.weight");
  EXPECT_EQ(row, std::vector<float>(embed.end() - 8, embed.end()));
}

TEST(CheckpointOpen, MixedDtypesAndF16AreAccepted) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  auto tensors = all_tensors(w);
  // The final norm as F16: 8 values from 0x3C00 (1.0) and 0xC000 (-2.0).
  for (auto& t : tensors)
    if (t.name == "model.norm.weight") {
      t.dtype = DType::F16;
      t.data.assign(16, std::byte{0});
      for (int i = 0; i < 8; ++i) {
        const uint16_t h = i % 2 ? 0xC000 : 0x3C00;
        std::memcpy(t.data.data() + 2 * i, &h, 2);
      }
    }
  write_safetensors(dir.file("model.safetensors"), tensors);
  auto ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck->read_f32("model.norm.weight"), (std::vector<float>{1, -2, 1, -2, 1, -2, 1, -2}));
}

TEST(CheckpointOpen, DenseMistralAndTiedEmbeddings) {
  TempDir dir;
  json cfg = tiny_config_json(1);
  cfg["architectures"] = {"MistralForCausalLM"};
  cfg["model_type"] = "mistral";
  cfg.erase("num_local_experts");
  cfg.erase("num_experts_per_tok");
  cfg["tie_word_embeddings"] = true;
  const auto c = ModelConfig::from_json_text(cfg.dump(), "mistral");
  const auto w = make_weights(c);
  write_config(dir, cfg);
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  auto ck = Checkpoint::open(dir.str());
  EXPECT_FALSE(ck->config().is_moe());
  EXPECT_TRUE(ck->contains("model.layers.0.mlp.gate_proj.weight"));
  EXPECT_FALSE(ck->contains("lm_head.weight"));
  EXPECT_EQ(ck->config().lm_head_name(), "model.embed_tokens.weight");
  expect_values(*ck, w);
}

TEST(CheckpointOpen, ExtraUnusedTensorIsAWarningNotAnError) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  auto tensors = all_tensors(w);
  const float extra[] = {1, 2, 3, 4};
  tensors.push_back(make_f32_tensor("model.layers.0.mystery.weight", {4}, extra));
  // HF's old rotary buffers are ignored silently.
  tensors.push_back(make_f32_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", {1}, extra));
  write_safetensors(dir.file("model.safetensors"), tensors);
  auto ck = Checkpoint::open(dir.str());
  ASSERT_EQ(ck->warnings().size(), 1u);
  EXPECT_NE(ck->warnings()[0].find("model.layers.0.mystery.weight"), std::string::npos) << ck->warnings()[0];
  EXPECT_NE(ck->warnings()[0].find(dir.file("model.safetensors")), std::string::npos) << ck->warnings()[0];
  EXPECT_EQ(ck->read_f32("model.layers.0.mystery.weight"), (std::vector<float>{1, 2, 3, 4}));
  expect_values(*ck, w);
}

TEST(CheckpointOpen, TensorInShardButNotInIndexIsAWarning) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  auto tensors = all_tensors(w);
  const auto where = write_sharded(dir, tensors, 2);
  // Rewrite shard 1 with one more tensor the index does not list.
  std::vector<TensorToWrite> shard1;
  for (const auto& t : tensors)
    if (where.at(t.name) == "model-00001-of-00002.safetensors") shard1.push_back(t);
  const float v[] = {9};
  shard1.push_back(make_f32_tensor("unlisted.weight", {1}, v));
  write_safetensors(dir.file("model-00001-of-00002.safetensors"), shard1);
  auto ck = Checkpoint::open(dir.str());
  ASSERT_EQ(ck->warnings().size(), 1u);
  EXPECT_NE(ck->warnings()[0].find("unlisted.weight"), std::string::npos) << ck->warnings()[0];
  EXPECT_FALSE(ck->contains("unlisted.weight"));
}

// ================================================================= tensors that do not fit the config

TEST(CheckpointErrors, MissingTensorIsNamed) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  auto tensors = all_tensors(w);
  const std::string gone = "model.layers.1.self_attn.k_proj.weight";
  std::erase_if(tensors, [&](const TensorToWrite& t) { return t.name == gone; });
  write_safetensors(dir.file("model.safetensors"), tensors);
  expect_open_error(dir.str(), {gone, "[4, 8]"});
}

TEST(CheckpointErrors, MissingExpertInShardedCheckpointIsNamed) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  auto tensors = all_tensors(w);
  const std::string gone = tiny_config().w3_name(1, 1);
  std::erase_if(tensors, [&](const TensorToWrite& t) { return t.name == gone; });
  write_sharded(dir, tensors, 2);
  expect_open_error(dir.str(), {gone});
}

TEST(CheckpointErrors, WrongShapeNamesTensorAndBothShapes) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  auto tensors = all_tensors(w);
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  for (auto& t : tensors)
    if (t.name == name) {
      t.shape = {8, 4};
      t.data.resize(8 * 4 * 4);
    }
  write_safetensors(dir.file("model.safetensors"), tensors);
  expect_open_error(dir.str(), {name, "[8, 4]", "[8, 8]", dir.file("model.safetensors")});
}

TEST(CheckpointErrors, TransposedShapeIsRejected) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  auto tensors = all_tensors(w);
  const std::string name = tiny_config().w1_name(0, 0);  // [12, 8] expected
  for (auto& t : tensors)
    if (t.name == name) t.shape = {8, 12};
  write_safetensors(dir.file("model.safetensors"), tensors);
  expect_open_error(dir.str(), {name, "[8, 12]", "[12, 8]"});
}

TEST(CheckpointErrors, NonFloatDtypeForAWeight) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  auto tensors = all_tensors(w);
  const std::string name = "model.norm.weight";
  for (auto& t : tensors)
    if (t.name == name) t.dtype = DType::I32;  // same size as F32
  write_safetensors(dir.file("model.safetensors"), tensors);
  expect_open_error(dir.str(), {name, "I32"});
}

TEST(CheckpointErrors, ConfigThatDisagreesWithTensors) {
  const auto w = make_weights(tiny_config());
  {  // hidden size changed: the first tensor checked (embedding) has the wrong shape
    TempDir dir;
    json cfg = tiny_config_json();
    cfg["hidden_size"] = 16;
    write_config(dir, cfg);
    write_safetensors(dir.file("model.safetensors"), all_tensors(w));
    expect_open_error(dir.str(), {"model.embed_tokens.weight", "[16, 8]", "[16, 16]"});
  }
  {  // more layers than the checkpoint has
    TempDir dir;
    json cfg = tiny_config_json(3);
    write_config(dir, cfg);
    write_safetensors(dir.file("model.safetensors"), all_tensors(w));
    expect_open_error(dir.str(), {"model.layers.2."});
  }
  {  // more experts: the router shape disagrees first
    TempDir dir;
    json cfg = tiny_config_json();
    cfg["num_local_experts"] = 3;
    write_config(dir, cfg);
    write_safetensors(dir.file("model.safetensors"), all_tensors(w));
    expect_open_error(dir.str(), {"model.layers.0.block_sparse_moe.gate.weight", "[3, 8]", "[2, 8]"});
  }
  {  // intermediate size changed
    TempDir dir;
    json cfg = tiny_config_json();
    cfg["intermediate_size"] = 10;
    write_config(dir, cfg);
    write_safetensors(dir.file("model.safetensors"), all_tensors(w));
    expect_open_error(dir.str(), {tiny_config().w1_name(0, 0), "[12, 8]", "[10, 8]"});
  }
}

// ================================================================= index and shard problems

TEST(CheckpointErrors, IndexListsShardThatDoesNotExist) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  write_sharded(dir, all_tensors(w), 2);
  fs::remove(dir.file("model-00002-of-00002.safetensors"));
  expect_open_error(dir.str(), {"model-00002-of-00002.safetensors"});
}

TEST(CheckpointErrors, IndexMapsTensorToShardWithoutIt) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  const auto where = write_sharded(dir, all_tensors(w), 2);
  // Point a tensor that lives in shard 1 at shard 2.
  std::string moved;
  for (const auto& [name, shard] : where)
    if (shard == "model-00001-of-00002.safetensors") {
      moved = name;
      break;
    }
  ASSERT_FALSE(moved.empty());
  auto index = json::parse(std::ifstream(dir.file("model.safetensors.index.json")));
  index["weight_map"][moved] = "model-00002-of-00002.safetensors";
  write_text(dir.file("model.safetensors.index.json"), index.dump());
  expect_open_error(dir.str(), {moved, "model-00002-of-00002.safetensors"});
}

TEST(CheckpointErrors, TruncatedShardNamesThatShard) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  write_sharded(dir, all_tensors(w), 3);
  const std::string shard = dir.file("model-00002-of-00003.safetensors");
  fs::resize_file(shard, fs::file_size(shard) - 5);
  const auto msg = expect_open_error(dir.str(), {shard});
  EXPECT_EQ(msg.find("model-00001-of-00003"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("model-00003-of-00003"), std::string::npos) << msg;
}

TEST(CheckpointErrors, TruncatedSingleFile) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  fs::resize_file(dir.file("model.safetensors"), fs::file_size(dir.file("model.safetensors")) - 1);
  expect_open_error(dir.str(), {dir.file("model.safetensors")});
}

TEST(CheckpointErrors, BadIndexFile) {
  const auto w = make_weights(tiny_config());
  for (const std::string text : {"{not json", "[]", R"({"metadata":{}})", R"({"weight_map":[]})",
                                 R"({"weight_map":{"model.norm.weight":3}})"}) {
    SCOPED_TRACE(text);
    TempDir dir;
    write_config(dir, tiny_config_json());
    write_safetensors(dir.file("model.safetensors"), all_tensors(w));
    write_text(dir.file("model.safetensors.index.json"), text);
    expect_open_error(dir.str(), {"model.safetensors.index.json"});
  }
}

TEST(CheckpointErrors, IndexShardNameThatIsNotAPlainFileName) {
  const auto w = make_weights(tiny_config());
  for (const std::string shard : {"../model.safetensors", "sub/model.safetensors", "/etc/passwd", ".."}) {
    SCOPED_TRACE(shard);
    TempDir dir;
    write_config(dir, tiny_config_json());
    const auto where = write_sharded(dir, all_tensors(w), 1);
    auto index = json::parse(std::ifstream(dir.file("model.safetensors.index.json")));
    index["weight_map"]["model.norm.weight"] = shard;
    write_text(dir.file("model.safetensors.index.json"), index.dump());
    expect_open_error(dir.str(), {"model.safetensors.index.json", shard});
  }
}

TEST(CheckpointErrors, NoWeightsFile) {
  TempDir dir;
  write_config(dir, tiny_config_json());
  expect_open_error(dir.str(), {dir.str(), "model.safetensors"});
}

TEST(CheckpointErrors, NotADirectory) {
  TempDir dir;
  write_config(dir, tiny_config_json());
  expect_open_error(dir.file("config.json"), {dir.file("config.json")});
  expect_open_error(dir.file("nowhere"), {dir.file("nowhere")});
}

// ================================================================= config.json problems

TEST(CheckpointConfig, MissingConfig) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  expect_open_error(dir.str(), {dir.file("config.json")});
}

TEST(CheckpointConfig, InvalidConfigJson) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  write_text(dir.file("config.json"), "{\"hidden_size\": 8,\n");
  expect_open_error(dir.str(), {dir.file("config.json")});
  write_text(dir.file("config.json"), "[1, 2]");
  expect_open_error(dir.str(), {dir.file("config.json")});
}

TEST(CheckpointConfig, UnsupportedArchitecture) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  json cfg = tiny_config_json();
  cfg["architectures"] = {"LlamaForCausalLM"};
  cfg["model_type"] = "llama";
  write_config(dir, cfg);
  expect_open_error(dir.str(), {dir.file("config.json"), "LlamaForCausalLM"});
}

TEST(CheckpointConfig, TopKGreaterThanExperts) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  json cfg = tiny_config_json();
  cfg["num_experts_per_tok"] = 3;
  write_config(dir, cfg);
  expect_open_error(dir.str(), {dir.file("config.json"), "num_experts_per_tok"});
}

TEST(CheckpointConfig, MissingRequiredKey) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  json cfg = tiny_config_json();
  cfg.erase("num_hidden_layers");
  write_config(dir, cfg);
  expect_open_error(dir.str(), {dir.file("config.json"), "num_hidden_layers"});
}

// ================================================================= reading

TEST(CheckpointRead, RowRangeAndRankAreChecked) {
  TempDir dir;
  const auto w = make_weights(tiny_config());
  write_config(dir, tiny_config_json());
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  auto ck = Checkpoint::open(dir.str());
  std::vector<float> buf(16 * 8);
  EXPECT_THROW(ck->read_rows_f32("model.embed_tokens.weight", 15, 2, buf.data()), Error);
  EXPECT_THROW(ck->read_rows_f32("model.embed_tokens.weight", -1, 1, buf.data()), Error);
  EXPECT_THROW(ck->read_rows_f32("model.norm.weight", 0, 1, buf.data()), Error);  // 1-D
  EXPECT_NO_THROW(ck->read_rows_f32("model.embed_tokens.weight", 0, 16, buf.data()));
  EXPECT_EQ(buf, w.values.at("model.embed_tokens.weight"));
  try {
    ck->read_f32("no.such.tensor");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no.such.tensor"), std::string::npos) << e.what();
  }
}

// Names in the index and shards come from files: control characters must not split messages.
TEST(CheckpointErrors, ControlCharactersInNamesStayOnOneLine) {
  const auto w = make_weights(tiny_config());
  {  // an index entry whose tensor is not in its shard
    TempDir dir;
    write_config(dir, tiny_config_json());
    write_sharded(dir, all_tensors(w), 1);
    auto index = json::parse(std::ifstream(dir.file("model.safetensors.index.json")));
    index["weight_map"]["bad\nname"] = "model-00001-of-00001.safetensors";
    write_text(dir.file("model.safetensors.index.json"), index.dump());
    expect_open_error(dir.str(), {"bad", "name", "model-00001-of-00001.safetensors"});
  }
  {  // a missing shard whose name has a newline
    TempDir dir;
    write_config(dir, tiny_config_json());
    write_sharded(dir, all_tensors(w), 1);
    auto index = json::parse(std::ifstream(dir.file("model.safetensors.index.json")));
    index["weight_map"]["model.norm.weight"] = "shard\n2.safetensors";
    write_text(dir.file("model.safetensors.index.json"), index.dump());
    expect_open_error(dir.str(), {"shard", "2.safetensors"});
  }
  {  // an unused tensor: the warning is one line too
    TempDir dir;
    write_config(dir, tiny_config_json());
    auto tensors = all_tensors(w);
    const float v[] = {1};
    tensors.push_back(make_f32_tensor("odd\r\nname", {1}, v));
    write_safetensors(dir.file("model.safetensors"), tensors);
    auto ck = Checkpoint::open(dir.str());
    ASSERT_EQ(ck->warnings().size(), 1u);
    EXPECT_EQ(ck->warnings()[0].find_first_of("\r\n"), std::string::npos) << ck->warnings()[0];
    EXPECT_NE(ck->warnings()[0].find("odd"), std::string::npos) << ck->warnings()[0];
    EXPECT_TRUE(ck->contains("odd\r\nname"));  // the tensor itself keeps its real name
  }
}

// ================================================================= issue 13: hardening (items 7, 8, 9)

namespace {

// Replaces `path` by a FIFO. While the test runs, a rescuer thread keeps trying to open the FIFO's write
// end without blocking: that succeeds only while a reader is blocked in open(), and then releases it
// (the reader sees end of file). Code that blocks on the FIFO thus fails the test instead of hanging it.
class FifoAt {
 public:
  explicit FifoAt(const std::string& path) : path_(path) {
    std::error_code ec;
    fs::remove(path_, ec);
    if (::mkfifo(path_.c_str(), 0600) != 0) ADD_FAILURE() << "mkfifo " << path_;
    rescuer_ = std::thread([this] {
      while (!stop_) {
        const int fd = ::open(path_.c_str(), O_WRONLY | O_NONBLOCK);
        if (fd >= 0) {
          ++rescued_;
          ::close(fd);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
  }
  ~FifoAt() {
    stop_ = true;
    rescuer_.join();
  }
  int rescued() const { return rescued_; }

 private:
  std::string path_;
  std::atomic<bool> stop_{false};
  std::atomic<int> rescued_{0};
  std::thread rescuer_;
};

// A tiny checkpoint in `dir`, with the values of make_weights(tiny_config()).
void write_tiny(const TempDir& dir, DType dtype = DType::F32) {
  write_config(dir, tiny_config_json());
  write_safetensors(dir.file("model.safetensors"), all_tensors(make_weights(tiny_config()), dtype));
}

// Sets element `element` of tensor `name` in the safetensors file at `path` to `value`, in place.
void poke(const std::string& path, const std::string& name, int64_t element, float value) {
  uint64_t header_len = 0, offset = 0;
  DType dtype;
  {
    SafetensorsFile f(path);
    const auto& t = f.info(name);
    dtype = t.dtype;
    offset = t.begin;
    std::ifstream in(path, std::ios::binary);
    in.read(reinterpret_cast<char*>(&header_len), 8);
  }
  std::fstream io(path, std::ios::binary | std::ios::in | std::ios::out);
  if (dtype == DType::F32) {
    io.seekp(std::streamoff(8 + header_len + offset + uint64_t(element) * 4));
    io.write(reinterpret_cast<const char*>(&value), 4);
  } else {
    ASSERT_EQ(dtype, DType::BF16);
    const uint16_t h = f32_to_bf16(value);
    io.seekp(std::streamoff(8 + header_len + offset + uint64_t(element) * 2));
    io.write(reinterpret_cast<const char*>(&h), 2);
  }
  ASSERT_TRUE(io.good());
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not a moelab::Error: ") + e.what();
  }
  return "no error";
}

}  // namespace

TEST(CheckpointHardening, FifoShardConfigAndIndexAreRefusedWithoutBlocking) {
  {
    TempDir dir;
    write_tiny(dir);
    FifoAt fifo(dir.file("model.safetensors"));
    expect_open_error(dir.str(), {dir.file("model.safetensors"), "is a FIFO (named pipe), not a regular file"});
  }
  {
    TempDir dir;
    write_tiny(dir);
    FifoAt fifo(dir.file("config.json"));
    expect_open_error(dir.str(), {dir.file("config.json"), "is a FIFO (named pipe), not a regular file"});
  }
  {
    TempDir dir;
    write_config(dir, tiny_config_json());
    write_sharded(dir, all_tensors(make_weights(tiny_config())), 2);
    FifoAt fifo(dir.file("model.safetensors.index.json"));
    expect_open_error(dir.str(), {dir.file("model.safetensors.index.json"), "FIFO"});
  }
  {
    TempDir dir;
    write_config(dir, tiny_config_json());
    write_sharded(dir, all_tensors(make_weights(tiny_config())), 2);
    FifoAt fifo(dir.file("model-00002-of-00002.safetensors"));
    expect_open_error(dir.str(), {dir.file("model-00002-of-00002.safetensors"), "FIFO"});
  }
  {  // a directory where a shard should be
    TempDir dir;
    write_tiny(dir);
    fs::remove(dir.file("model.safetensors"));
    fs::create_directory(dir.file("model.safetensors"));
    expect_open_error(dir.str(), {dir.file("model.safetensors"), "is a directory, not a regular file"});
  }
}

TEST(CheckpointHardening, TokenizerThatIsAFifoOrADirectoryIsAClearError) {
  TempDir dir;
  {
    FifoAt fifo(dir.file("tokenizer.model"));
    const auto msg = error_of([&] { Tokenizer tok(dir.file("tokenizer.model")); });
    EXPECT_NE(msg.find(dir.file("tokenizer.model") + ": tokenizer model is a FIFO"), std::string::npos) << msg;
  }
  fs::remove(dir.file("tokenizer.model"));
  fs::create_directory(dir.file("tokenizer.model"));
  const auto msg = error_of([&] { Tokenizer tok(dir.file("tokenizer.model")); });
  EXPECT_NE(msg.find(dir.file("tokenizer.model") + ": tokenizer model is a directory"), std::string::npos) << msg;
}

TEST(CheckpointHardening, ConfigClaimingMoreLayersThanTheCheckpointStopsAtTheFirstMissingTensor) {
  // 1000 layers (the bound is 1024) over a 2-layer checkpoint: the tensors are compared with the config one
  // by one, so the first missing one is named without building the 13,003-entry list first.
  const auto w = make_weights(tiny_config());
  TempDir dir;
  write_config(dir, tiny_config_json(1000));
  write_safetensors(dir.file("model.safetensors"), all_tensors(w));
  expect_open_error(dir.str(), {"missing tensor 'model.layers.2.input_layernorm.weight'"});
  // The lazy walk lists exactly what expected_tensors() lists.
  std::vector<std::string> walked;
  ModelConfig c = tiny_config();
  c.quantization.nf4 = true;
  c.for_each_expected_tensor([&](const TensorSpec& s) { walked.push_back(s.name + (s.nf4 ? " nf4" : "")); });
  std::vector<std::string> listed;
  for (const auto& s : c.expected_tensors()) listed.push_back(s.name + (s.nf4 ? " nf4" : ""));
  EXPECT_EQ(walked, listed);
  const auto names = c.nf4_weight_names();
  const std::set<std::string> nf4(names.begin(), names.end());
  for (const auto& s : c.expected_tensors()) EXPECT_EQ(s.nf4, nf4.count(s.name) == 1) << s.name;
}

TEST(CheckpointHardening, NonFiniteWeightsFailAsTheyAreConverted) {
  for (const DType dtype : {DType::F32, DType::BF16}) {
    for (const float bad : {std::nanf(""), INFINITY, -INFINITY}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + std::to_string(bad));
      TempDir dir;
      write_tiny(dir, dtype);
      const std::string w1 = tiny_config().w1_name(1, 1);
      poke(dir.file("model.safetensors"), w1, 17, bad);
      poke(dir.file("model.safetensors"), "model.embed_tokens.weight", 8 * 5 + 3, bad);  // row 5
      const auto ck = Checkpoint::open(dir.str());  // opening does not scan values
      const std::string what = std::isnan(bad) ? "NaN" : bad > 0 ? "+Inf" : "-Inf";
      auto msg = error_of([&] { ck->read_f32(w1); });
      EXPECT_NE(msg.find(dir.file("model.safetensors") + ": tensor '" + w1 + "': element 17 is " + what), std::string::npos)
          << msg;
      // Row reads (the streamed embedding) check the rows they convert, and only those.
      std::vector<float> row(8);
      EXPECT_NO_THROW(ck->read_rows_f32("model.embed_tokens.weight", 4, 1, row.data()));
      msg = error_of([&] { ck->read_rows_f32("model.embed_tokens.weight", 5, 1, row.data()); });
      EXPECT_NE(msg.find("'model.embed_tokens.weight': element 43 is " + what), std::string::npos) << msg;
      // The full scan (inspect --check-values) finds the first one in file order too.
      const auto& f = ck->file_of(w1);
      msg = error_of([&] { f.check_finite(f.info(w1)); });
      EXPECT_NE(msg.find("element 17 is " + what), std::string::npos) << msg;
      // Other tensors are untouched; SafetensorsFile::read_f32 without the check returns the raw value.
      EXPECT_NO_THROW(ck->read_f32("model.norm.weight"));
      EXPECT_EQ(std::isnan(f.read_f32(w1)[17]), std::isnan(bad));
    }
  }
}

TEST(CheckpointHardening, FirstNonFiniteFindsEachPosition) {
  std::vector<float> v(1000, 1.0f);
  EXPECT_EQ(first_non_finite(v.data(), v.size()), -1);
  for (const size_t at : {size_t(0), size_t(1), size_t(511), size_t(999)}) {
    for (const float bad : {std::nanf(""), INFINITY, -INFINITY}) {
      v.assign(1000, 1.0f);
      v[at] = bad;
      EXPECT_EQ(first_non_finite(v.data(), v.size()), int64_t(at));
    }
  }
  v.assign(1000, std::numeric_limits<float>::max());
  v[3] = std::numeric_limits<float>::denorm_min();
  EXPECT_EQ(first_non_finite(v.data(), v.size()), -1);
}
