// A checkpoint that transformers 4.57.3 + bitsandbytes 0.49.2 quantized and saved themselves
// (tests/fixtures/models/mixtral-4e-bnb-nf4, scripts/make_bnb_checkpoint_fixture.py), not one that
// moelab wrote: moelab must open it, read every NF4 weight as bitsandbytes dequantizes it, and compute
// what transformers computes with it.
//
// Tolerance for the logits: the fixture's logits come from bitsandbytes' generic CPU path (MatMul4Bit:
// dequantize_4bit in float32, then a float32 matmul; the AVX512-BF16 repacking path, which rounds absmax
// to bfloat16, is switched off by the script). Weights read here dequantize to exactly those float32
// values (checked bit for bit below), so the two sides compute the same function and differ only by
// float32 summation order, as the reference and transformers do on float32 checkpoints: relative L2
// < 1e-5, the bound used across the project (tests/test_cpu_engine.cpp, tests/test_reference.cpp).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "fixture_util.hpp"
#include "process_util.hpp"
#include "isa_test_util.hpp"
#include "optimized/cpu/engine.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::test {
namespace {

const std::string kModel = "mixtral-4e-bnb-nf4";

const SafetensorsFile& expected() {
  static const SafetensorsFile f(model_dir(kModel) + "/expected.safetensors");
  return f;
}

TEST(BnbCheckpoint, OpensAsPrequantizedNf4) {
  const auto ck = Checkpoint::open(model_dir(kModel));
  const auto& q = ck->config().quantization;
  EXPECT_TRUE(q.nf4);
  EXPECT_TRUE(q.double_quant);
  EXPECT_EQ(q.compute_dtype, "float32");
  // transformers quantizes the router gate too; embeddings, norms and lm_head stay float32.
  for (const std::string w : {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.self_attn.k_proj.weight",
                              "model.layers.1.block_sparse_moe.experts.3.w2.weight"})
    EXPECT_TRUE(nf4::has_nf4_quant_state(ck->file_of(w), w)) << w;
  EXPECT_EQ(ck->info("lm_head.weight").dtype, DType::F32);
  EXPECT_EQ(ck->info("model.embed_tokens.weight").dtype, DType::F32);
}

TEST(BnbCheckpoint, EveryNf4WeightDequantizesAsBitsandbytesDid) {
  const auto ck = Checkpoint::open(model_dir(kModel));
  const auto names = ck->config().nf4_weight_names();
  ASSERT_FALSE(names.empty());
  int compared = 0;
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    const auto q = nf4::read_nf4([&](const std::string& n) { return ck->contains(n) ? &ck->file_of(n) : nullptr; },
                                 name);
    // The quant state JSON moelab would write is byte for byte the one bitsandbytes wrote.
    const auto stored = ck->file_of(name).bytes(ck->info(name + nf4::kQuantStateSuffix));
    EXPECT_EQ(nf4::quant_state_json(q), std::string(reinterpret_cast<const char*>(stored.data()), stored.size()));
    const std::string key = "dequant." + name;
    if (!expected().contains(key)) continue;  // the fixture keeps a subset (< 1 MB)
    const MatrixRF want = read_matrix_f32(expected(), key);
    const auto got = nf4::dequantize(q);
    ASSERT_EQ(int64_t(got.size()), int64_t(want.size()));
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
    ++compared;
  }
  EXPECT_EQ(compared, 16);  // 2 layers x (q, k, v, o, router, expert 0's w1, w2, w3)
}

// moelab's quantizer, given the float32 weights transformers started from (mixtral-4e-gqa-f32), writes
// the same codes and statistics as transformers + bitsandbytes did (quantized with one torch thread).
TEST(BnbCheckpoint, MoelabQuantizerReproducesEveryWeight) {
  const auto ck = Checkpoint::open(model_dir(kModel));
  const auto src = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
  for (const auto& name : ck->config().nf4_weight_names()) {
    SCOPED_TRACE(name);
    const auto bnb = nf4::read_nf4([&](const std::string& n) { return ck->contains(n) ? &ck->file_of(n) : nullptr; },
                                   name);
    const auto x = src->read_f32(name);
    const auto ours = nf4::quantize_nf4(x.data(), int64_t(x.size()), bnb.blocksize, /*double_quant=*/true);
    EXPECT_EQ(ours.packed, bnb.packed);
    EXPECT_EQ(ours.qabsmax, bnb.qabsmax);
    EXPECT_EQ(ours.nested_absmax, bnb.nested_absmax);
    EXPECT_EQ(ours.offset, bnb.offset);
  }
}

// On every kernel set: one this CPU lacks is SKIPPED with the flags it lacks.
class BnbCheckpointIsa : public ::testing::TestWithParam<cpu::Isa> {};

TEST_P(BnbCheckpointIsa, LogitsMatchTransformers) {
  MOELAB_SKIP_UNLESS_RUNS_HERE(GetParam());
  const auto ck = Checkpoint::open(model_dir(kModel));
  const auto tokens = read_i32(expected(), "tokens");
  ASSERT_EQ(tokens.size(), 12u);
  const MatrixRF want = read_matrix_f32(expected(), "logits");
  ASSERT_EQ(want.rows(), 12);
  ASSERT_EQ(want.cols(), ck->config().vocab_size);
  const std::string isa = cpu::isa_name(GetParam());
  cpu::Nf4Engine engine(*ck, cpu::EngineOptions{.isa = isa, .activations = "fp32"});
  const MatrixRF got = engine.forward(tokens);
  const double err = rel_l2(got, want);
  RecordProperty("rel_l2_" + isa, fmt::format("{:.3e}", err));
  EXPECT_LT(err, 1e-5);
}

// A quant_state whose shape is the weight's transposed ([in, out]: the same element count) names the file,
// the weight and both shapes, on every loader that maps pre-quantized codes (cpu-nf4; the trainer and
// cuda-nf4 go through the same cpu::map_prequantized), instead of reading the codes as the wrong matrix.
TEST(BnbCheckpoint, TransposedQuantStateShapeIsAnError) {
  TempDir dir("moelab-bnb-shape");
  const std::filesystem::path copy = dir.path() / "model";
  std::filesystem::copy(model_dir(kModel), copy, std::filesystem::copy_options::recursive);
  const std::string file = (copy / "model.safetensors").string();
  std::string bytes = read_file_bytes(file);
  // The same-length edit inside the one weight's quant_state (its JSON is a U8 tensor in the file).
  const std::string key = "\"shape\": [64, 128]";
  const std::string weight = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
  const auto ck0 = Checkpoint::open(copy.string());
  const auto state = ck0->file_of(weight).bytes(weight + ".quant_state.bitsandbytes__nf4");
  const std::string json(reinterpret_cast<const char*>(state.data()), state.size());
  const size_t in_state = json.find(key);
  ASSERT_NE(in_state, std::string::npos) << json;
  const size_t at = bytes.find(json);
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at + in_state, key.size(), "\"shape\": [128, 64]");
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out << bytes;
  }
  const auto ck = Checkpoint::open(copy.string());
  try {
    cpu::Nf4Engine engine(*ck, cpu::EngineOptions{.isa = "scalar", .activations = "fp32"});
    FAIL() << "a transposed quant_state loaded";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find(weight), std::string::npos) << msg;
    EXPECT_NE(msg.find("quant_state shape [128, 64], config.json implies [64, 128]"), std::string::npos) << msg;
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, BnbCheckpointIsa, ::testing::ValuesIn(cpu::kAllIsas),
                         [](const auto& info) { return isa_test_name(info.param); });

}  // namespace
}  // namespace moelab::test
