// cpu-nf4 against the reference in the two steps of DESIGN.md, so kernel bugs and quantization error
// are never confused:
//  1. against the reference run on the same checkpoint with its NF4 weights dequantized to F32: the
//     engines then compute the same function, so every layer must agree to FP32 rounding (relative
//     L2 < 1e-5, as reference vs transformers) and the chosen experts must be identical;
//  2. against transformers + bitsandbytes: cpu-nf4 quantizing a float checkpoint at load computes the
//     logits transformers computes with the same checkpoint loaded in 4 bits (a committed fixture, up to
//     one documented difference in bitsandbytes' CPU path), so its quantization error is NF4's,
//     measured against an independent implementation.
// Each kernel set is a test of its own: on a CPU without it the test is SKIPPED, saying which flags
// are missing (tests/isa_test_util.hpp).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cctype>
#include <filesystem>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "analysis/diff.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "engine_test_util.hpp"
#include "fixture_util.hpp"
#include "isa_test_util.hpp"
#include "optimized/cpu/engine.hpp"
#include "optimized/cpu/quantize.hpp"
#include "reference/model.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;

class CpuEngine : public DequantizedFixture {};

// A fixture model and its NF4-dequantized twin, for the tests that take a kernel set as well.
class CpuEngineIsa : public ::testing::TestWithParam<std::tuple<std::string, cpu::Isa>> {
 protected:
  void SetUp() override {
    MOELAB_SKIP_UNLESS_RUNS_HERE(isa());
    const std::string& model = std::get<0>(GetParam());
    ck = Checkpoint::open(model_dir(model));
    tokens = read_i32(SafetensorsFile(model_dir(model) + "/expected.safetensors"), "tokens");
    dequantized_dir = fs::temp_directory_path() / ("moelab-deq-isa-" + std::to_string(::getpid()) + "-" + model);
    fs::remove_all(dequantized_dir);
    cpu::write_dequantized_checkpoint(*ck, dequantized_dir.string(), 64, /*double_quant=*/true);
    dequantized = Checkpoint::open(dequantized_dir.string());
  }
  void TearDown() override {
    if (!dequantized_dir.empty()) fs::remove_all(dequantized_dir);
  }
  cpu::Isa isa() const { return std::get<1>(GetParam()); }

  std::unique_ptr<Checkpoint> ck, dequantized;
  std::vector<int32_t> tokens;
  fs::path dequantized_dir;
};

// The exact check mode (FP32 activations).
TEST_P(CpuEngineIsa, MatchesReferenceOnDequantizedWeightsEveryLayer) {
  cpu::Nf4Engine engine(*ck, cpu::EngineOptions{.isa = cpu::isa_name(isa()), .activations = "fp32"});
  ref::Model<float> reference(*dequantized);
  const auto a = analysis::ForwardRecord::run(reference, tokens);
  const auto b = analysis::ForwardRecord::run(engine, tokens);
  const auto d = analysis::diff_records(a, b, "ref(dequantized)", "cpu-nf4");
  expect_within(d, {.hidden = 1e-5, .router_logits = 1e-5, .logits = 1e-5});
  for (size_t l = 0; l < a.layers.size(); ++l) EXPECT_EQ(a.layers[l].experts, b.layers[l].experts);
}

// Both activation modes: the int8 path quantizes each token on its own, so only summation order (the
// attention's products, FP32 tiles) may differ between one prefill and token-by-token decoding.
TEST_P(CpuEngine, DecodingTokenByTokenEqualsOnePrefill) {
  for (const std::string activations : {"fp32", "int8"}) {
    SCOPED_TRACE(activations);
    cpu::Nf4Engine engine(*ck, cpu::EngineOptions{.activations = activations});
    const MatrixRF prefill = engine.forward(tokens);  // tiled GEMM path (fp32), token tiles (int8)
    engine.reset();
    for (size_t i = 0; i < tokens.size(); ++i) {  // GEMV path
      const MatrixRF step = engine.forward(std::span<const int32_t>(&tokens[i], 1));
      EXPECT_LT(rel_l2(step, prefill.row(Eigen::Index(i))), 1e-5) << "position " << i;
    }
    // forward_tail computes the lm_head for the rows asked for only: the same values.
    engine.reset();
    const MatrixRF tail = engine.forward_tail(tokens, int(tokens.size()) - 2);
    ASSERT_EQ(tail.rows(), 2);
    EXPECT_LT(rel_l2(tail, prefill.bottomRows(2)), 1e-6);
    EXPECT_THROW(engine.forward_tail(tokens, int(tokens.size())), Error);
    EXPECT_THROW(engine.forward(std::vector<int32_t>(size_t(engine.max_context()), 1)), Error);
  }
}

// The int8 path against the exact check mode, every layer, on every kernel set this CPU has.
// Stated bound, from int8 rounding. A group of 32 activations has max|x| <= sqrt(32) rms(x) (equality
// when one element holds all the energy: SwiGLU outputs come close), so rounding to steps of
// max|x| / 127 leaves at most sqrt(32) / (127 sqrt(12)) = 0.0129 of rms(x); kNf4Int8's RMS rounding is
// 0.0022 absmax against the codes' RMS of 0.52 absmax (0.0042). A product is off by at most
// eps = sqrt(0.0129^2 + 0.0042^2) = 0.0136 of its size. A layer has four products in series on the
// residual stream (q/k/v then o; w1/w3 then w2), each stage no larger than the stream it adds to, so
// layer l's hidden state is within 4 eps (l + 1) relative L2 and the logits within 4 eps L. Routing may
// flip where two experts' probabilities are that close: at most one top-k set in ten may differ.
// (Measured on the fixtures: 0.020-0.026 after layer 0, 0.03-0.09 on the logits.)
TEST_P(CpuEngineIsa, Int8ActivationsStayWithinTheStatedBoundOfTheCheckMode) {
  constexpr double kEps = 0.0136;
  cpu::Nf4Engine exact(*ck, cpu::EngineOptions{.isa = cpu::isa_name(isa()), .activations = "fp32"});
  cpu::Nf4Engine fast(*ck, cpu::EngineOptions{.isa = cpu::isa_name(isa()), .activations = "int8"});
  const auto a = analysis::ForwardRecord::run(exact, tokens);
  const auto b = analysis::ForwardRecord::run(fast, tokens);
  const auto d = analysis::diff_records(a, b, "cpu-nf4 fp32", "cpu-nf4 int8");
  std::cout << d.table();
  for (const auto& l : d.layers) {
    EXPECT_GT(l.hidden.rel_l2, 0.0) << "layer " << l.layer << ": int8 rounding must change something";
    EXPECT_LT(l.hidden.rel_l2, 4 * kEps * (l.layer + 1)) << "layer " << l.layer;
    EXPECT_GE(l.topk_agreement, 0.9) << "layer " << l.layer;
  }
  EXPECT_LT(d.logits.rel_l2, 4 * kEps * double(d.layers.size()));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CpuEngine, MOELAB_FIXTURE_MODELS, fixture_test_name);
INSTANTIATE_TEST_SUITE_P(Fixtures, CpuEngineIsa, ::testing::Combine(MOELAB_FIXTURE_MODELS, ::testing::ValuesIn(cpu::kAllIsas)),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + "_" + isa_test_name(std::get<1>(info.param));
                           for (auto& ch : n)
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// transformers 4.57.3 + bitsandbytes 0.49.2 loaded mixtral-4e-gqa-f32 in 4 bits (NF4, double
// quantization, blocksize 64, every linear but lm_head, float32 compute) and computed the logits of its
// 12 tokens (tests/fixtures/models/mixtral-4e-bnb-nf4/expected.safetensors). cpu-nf4 quantizing the same
// float checkpoint at load makes the same codes and absmax codes
// (BnbCheckpoint.MoelabQuantizerReproducesEveryWeight) and must compute those logits. One known
// difference remains: bitsandbytes' CPU path overwrote entry 0 of the 8-bit map that decodes the absmax
// codes (-1 instead of create_dynamic_map's -0.99297; Nf4Serialized.WritesWhatBitsandbytesWrites), so
// the blocks whose absmax code is 0 decode 0.7% of the nested scale apart. Measured here: 5.2e-4
// relative L2 on the logits (against 9e-7 for cpu-nf4 reading transformers' own 4-bit file). A real
// disagreement (a wrong code, block, nested scale, or a matrix left unquantized) is of the order of NF4's
// own error on these logits, 0.57 relative L2: the limit 1e-3 is 2x the known difference and 1/500 of it.
class CpuEngineVsBitsandbytes : public ::testing::TestWithParam<cpu::Isa> {};

TEST_P(CpuEngineVsBitsandbytes, QuantizedAtLoadComputesTransformersNf4Logits) {
  MOELAB_SKIP_UNLESS_RUNS_HERE(GetParam());
  const auto ck = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
  const SafetensorsFile fp32(model_dir("mixtral-4e-gqa-f32") + "/expected.safetensors");
  const SafetensorsFile nf4(model_dir("mixtral-4e-bnb-nf4") + "/expected.safetensors");
  const auto tokens = read_i32(fp32, "tokens");
  ASSERT_EQ(read_i32(nf4, "tokens"), tokens);
  cpu::Nf4Engine engine(*ck, cpu::EngineOptions{.isa = cpu::isa_name(GetParam()), .activations = "fp32",
                                                .lm_head = "fp32", .blocksize = 64, .double_quant = true});
  const MatrixRF got = engine.forward(tokens);
  const MatrixRF want = read_matrix_f32(nf4, "logits"), unquantized = read_matrix_f32(fp32, "logits");
  const double err = rel_l2(got, want);
  std::cout << "[ info     ] cpu-nf4 vs transformers+bitsandbytes logits: relative L2 " << err
            << "; NF4's error (transformers float vs 4-bit): " << rel_l2(want, unquantized) << "\n";
  RecordProperty("rel_l2_vs_bitsandbytes", std::to_string(err));
  EXPECT_LT(err, 1e-3);
}

INSTANTIATE_TEST_SUITE_P(AllIsas, CpuEngineVsBitsandbytes, ::testing::ValuesIn(cpu::kAllIsas),
                         [](const auto& info) { return isa_test_name(info.param); });

}  // namespace
}  // namespace moelab::test

namespace moelab::test {
namespace {

// moelab quantize writes the transformers bnb-4bit layout; cpu-nf4 maps it and computes exactly what
// it computes when it quantizes the float checkpoint itself (same codes, same absmax: bitwise equal).
TEST(CpuEnginePrequantized, QuantizeRoundTripIsBitwiseIdentical) {
  namespace fs = std::filesystem;
  const auto src = model_dir("mixtral-8e-bf16-sharded");
  const auto out = fs::temp_directory_path() / ("moelab-quantize-" + std::to_string(::getpid()));
  fs::remove_all(out);
  const std::string cmd = std::string(MOELAB_BIN) + " quantize --model " + src + " --output " + out.string() +
                          " --shard-size-mb 0.2 > /dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));  // 0.2 MiB shards force several files
  const auto q = Checkpoint::open(out.string());
  EXPECT_TRUE(q->config().quantization.nf4);
  EXPECT_TRUE(q->config().quantization.double_quant);
  const auto f = Checkpoint::open(src);
  const auto tokens = read_i32(SafetensorsFile(src + "/expected.safetensors"), "tokens");
  cpu::Nf4Engine mapped(*q), quantized_at_load(*f);
  const MatrixRF a = mapped.forward(tokens), b = quantized_at_load.forward(tokens);
  EXPECT_EQ((a - b).cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_THROW(ref::Model<float>{*q}, Error);  // the reference names cpu-nf4 instead of misreading
  fs::remove_all(out);
}

TEST(CpuEnginePrequantized, CorruptQuantStateIsAClearError) {
  namespace fs = std::filesystem;
  const auto src = model_dir("mixtral-4e-gqa-f32");
  const auto out = fs::temp_directory_path() / ("moelab-quantize-bad-" + std::to_string(::getpid()));
  fs::remove_all(out);
  ASSERT_EQ(std::system((std::string(MOELAB_BIN) + " quantize --model " + src + " --output " + out.string() +
                         " > /dev/null").c_str()), 0);
  // Rewrite one weight's quant_state JSON with a wrong blocksize: it no longer matches absmax.
  const auto path = (out / "model.safetensors").string();
  std::vector<TensorToWrite> tensors;
  {
    SafetensorsFile file(path);
    for (const auto& [name, info] : file.tensors()) {
      auto bytes = file.bytes(info);
      TensorToWrite t{name, info.dtype, info.shape, {bytes.begin(), bytes.end()}};
      if (name == "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4") {
        std::string json(reinterpret_cast<const char*>(t.data.data()), t.data.size());
        json.replace(json.find("\"blocksize\": 64"), 15, "\"blocksize\": 32");
        t.data.assign(reinterpret_cast<const std::byte*>(json.data()), reinterpret_cast<const std::byte*>(json.data()) + json.size());
        t.shape = {int64_t(json.size())};
      }
      tensors.push_back(std::move(t));
    }
  }
  write_safetensors(path, tensors);
  const auto q = Checkpoint::open(out.string());
  try {
    cpu::Nf4Engine engine(*q);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.q_proj.weight"), std::string::npos) << e.what();
  }
  fs::remove_all(out);
}

}  // namespace
}  // namespace moelab::test

namespace moelab::test {
namespace {

// The bundled (trained) model: real activations, not random fixtures. The int8 path stays within the
// same stated bound of the check mode (see Int8ActivationsStayWithinTheStatedBoundOfTheCheckMode).
TEST(CpuEngineBundled, Int8ActivationsStayWithinTheStatedBoundOnTheTrainedModel) {
  const auto ck = Checkpoint::open(MOELAB_BUNDLED_MODEL);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 48; ++i) tokens.push_back(int32_t(1 + (i * 37) % (ck->config().vocab_size - 1)));
  cpu::Nf4Engine exact(*ck, cpu::EngineOptions{.activations = "fp32"});
  cpu::Nf4Engine fast(*ck, cpu::EngineOptions{.activations = "int8"});
  const auto d = analysis::diff_records(analysis::ForwardRecord::run(exact, tokens),
                                        analysis::ForwardRecord::run(fast, tokens), "cpu-nf4 fp32", "cpu-nf4 int8");
  std::cout << d.table();
  constexpr double kEps = 0.0136;
  for (const auto& l : d.layers) {
    EXPECT_GT(l.hidden.rel_l2, 0.0) << "layer " << l.layer;
    EXPECT_LT(l.hidden.rel_l2, 4 * kEps * (l.layer + 1)) << "layer " << l.layer;
    EXPECT_GE(l.topk_agreement, 0.9) << "layer " << l.layer;
  }
  EXPECT_LT(d.logits.rel_l2, 4 * kEps * double(d.layers.size()));
}

}  // namespace
}  // namespace moelab::test
