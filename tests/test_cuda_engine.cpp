// cuda-nf4 against the reference, in DESIGN.md's two steps (as tests/test_cpu_engine.cpp does for
// cpu-nf4), on every fixture model. Label "device": skipped with the reason where no GPU is present.
//  1. vs the reference on the NF4-dequantized checkpoint: the same function, so every layer agrees to
//     FP32 rounding. Limit 1e-4 relative L2 (cpu-nf4 reaches 1e-5 with a summation order close to the
//     reference's; the GPU sums in warp-shuffle trees and cuBLAS's own order, a different rounding
//     path of the same FP32 arithmetic, compounded over the layers), and identical experts.
//  2. vs the original weights: the quantization error, bounded by the naive NF4 model's own error.
//  Plus: decoding token by token (GEMV path) equals one prefill (dequantize + SGEMM path).
#include <gtest/gtest.h>

#include <filesystem>
#include <unistd.h>

#include "analysis/diff.hpp"
#include "analysis/forward_record.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "fixture_util.hpp"
#include "optimized/cpu/quantize.hpp"
#include "optimized/cuda/device_info.hpp"
#include "optimized/cuda/engine.hpp"
#include "reference/model.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;

class CudaEngine : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const auto list = cuda::list_devices();
    if (list.devices.empty()) GTEST_SKIP() << "cuda-nf4: no CUDA device found (" << list.error << ")";
    ck = Checkpoint::open(model_dir(GetParam()));
    tokens = read_i32(SafetensorsFile(model_dir(GetParam()) + "/expected.safetensors"), "tokens");
    dequantized_dir = fs::temp_directory_path() / ("moelab-cuda-deq-" + std::to_string(::getpid()) + "-" + GetParam());
    fs::remove_all(dequantized_dir);
    cpu::write_dequantized_checkpoint(*ck, dequantized_dir.string(), 64, /*double_quant=*/true);
    dequantized = Checkpoint::open(dequantized_dir.string());
  }
  void TearDown() override {
    if (!dequantized_dir.empty()) fs::remove_all(dequantized_dir);
  }

  std::unique_ptr<Checkpoint> ck, dequantized;
  std::vector<int32_t> tokens;
  fs::path dequantized_dir;
};

TEST_P(CudaEngine, MatchesReferenceOnDequantizedWeightsEveryLayer) {
  cuda::CudaNf4Engine engine(*ck);
  ref::Model<float> reference(*dequantized);
  const auto a = analysis::ForwardRecord::run(reference, tokens);
  const auto b = analysis::ForwardRecord::run(engine, tokens);
  const auto d = analysis::diff_records(a, b, "ref(dequantized)", "cuda-nf4");
  std::cout << d.table();
  for (const auto& l : d.layers) {
    EXPECT_LT(l.hidden.rel_l2, 1e-4) << "layer " << l.layer;
    EXPECT_DOUBLE_EQ(l.topk_agreement, 1.0) << "layer " << l.layer;
    if (l.router_logits) {
      EXPECT_LT(l.router_logits->rel_l2, 1e-4) << "layer " << l.layer;
    }
  }
  EXPECT_LT(d.logits.rel_l2, 1e-4);
}

TEST_P(CudaEngine, QuantizationErrorIsThatOfNf4Itself) {
  ref::Model<float> original(*ck), naive_nf4(*dequantized);
  cuda::CudaNf4Engine engine(*ck);
  const auto o = analysis::ForwardRecord::run(original, tokens);
  const auto naive = analysis::diff_records(o, analysis::ForwardRecord::run(naive_nf4, tokens), "ref", "ref(nf4)");
  const auto ours = analysis::diff_records(o, analysis::ForwardRecord::run(engine, tokens), "ref", "cuda-nf4");
  std::cout << ours.table();
  for (size_t l = 0; l < ours.layers.size(); ++l) {
    EXPECT_GT(ours.layers[l].hidden.rel_l2, 0.0);
    EXPECT_LE(ours.layers[l].hidden.rel_l2, naive.layers[l].hidden.rel_l2 * 1.01 + 1e-4);
  }
}

TEST_P(CudaEngine, DecodingTokenByTokenEqualsOnePrefill) {
  cuda::CudaNf4Engine engine(*ck);
  const MatrixRF prefill = engine.forward(tokens);
  engine.reset();
  for (size_t i = 0; i < tokens.size(); ++i) {
    const MatrixRF step = engine.forward(std::span<const int32_t>(&tokens[i], 1));
    EXPECT_LT(rel_l2(step, prefill.row(Eigen::Index(i))), 1e-4) << "position " << i;
  }
  engine.truncate(1);
  EXPECT_EQ(engine.position(), 1);
  EXPECT_THROW(engine.forward(std::vector<int32_t>(size_t(engine.max_context()), 1)), Error);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaEngine,
                         ::testing::Values("mixtral-4e-gqa-f32", "mixtral-8e-bf16-sharded", "mixtral-top1-swa",
                                           "mistral-dense"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (auto& ch : n)
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

TEST(CudaEngineNoDevice, ConstructionIsAClearError) {
  if (!cuda::list_devices().devices.empty()) GTEST_SKIP() << "a CUDA device is present";
  auto ck = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
  try {
    cuda::CudaNf4Engine engine(*ck);
    FAIL() << "constructed without a device";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda-nf4: no CUDA device found"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moelab::test
