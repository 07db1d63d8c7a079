// The layer diff: metrics on inputs with closed-form answers, and ref against transformers' dump.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "analysis/diff.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "fixture_util.hpp"
#include "reference/model.hpp"

namespace moelab::test {
namespace {

using analysis::ForwardRecord;

ForwardRecord synthetic(const MatrixRF& logits, const MatrixRF& hidden, const MatrixRI& experts) {
  ForwardRecord r;
  r.tokens.resize(size_t(logits.rows()));
  r.logits = logits;
  r.layers.push_back({hidden, std::nullopt, experts, MatrixRF::Ones(experts.rows(), experts.cols())});
  return r;
}

TEST(Diff, TensorMetricsClosedForm) {
  MatrixRF a(2, 2), b(2, 2);
  a << 3, 0, 0, 4;  // ||a|| = 5
  b = 2 * a;        // b - a = a: rel_l2 1, cosine 1, max_abs 4
  auto d = analysis::diff_tensor(a, b);
  EXPECT_DOUBLE_EQ(d.rel_l2, 1.0);
  EXPECT_NEAR(d.cosine, 1.0, 1e-15);
  EXPECT_DOUBLE_EQ(d.max_abs, 4.0);
  b << 0, 3, -4, 0;  // orthogonal to a: cosine 0, ||b - a|| = sqrt(9+9+16+16)
  d = analysis::diff_tensor(a, b);
  EXPECT_NEAR(d.cosine, 0.0, 1e-15);
  EXPECT_NEAR(d.rel_l2, std::sqrt(50.0) / 5.0, 1e-12);
  EXPECT_THROW(analysis::diff_tensor(a, MatrixRF(3, 2)), Error);
}

TEST(Diff, RoutingAgreementAndKlClosedForm) {
  MatrixRF la(2, 2), lb(2, 2), h = MatrixRF::Ones(2, 4);
  la << 0, 0, 1, 0;              // position 0: p = (1/2, 1/2); position 1: argmax 0
  lb << std::log(3.0f), 0, 0, 1;  // position 0: q = (3/4, 1/4); position 1: argmax 1
  MatrixRI ea(2, 2), eb(2, 2);
  ea << 0, 1, 2, 3;
  eb << 1, 0, 2, 4;  // token 0: same set, other first choice; token 1: same first, other set
  const auto r = analysis::diff_records(synthetic(la, h, ea), synthetic(lb, h, eb), "a", "b");
  EXPECT_DOUBLE_EQ(r.layers[0].top1_agreement, 0.5);
  EXPECT_DOUBLE_EQ(r.layers[0].topk_agreement, 0.5);
  EXPECT_DOUBLE_EQ(r.logits_top1_agreement, 0.5);
  // KL((1/2,1/2) || (3/4,1/4)) = 1/2 ln(2/3) + 1/2 ln(2); position 1: p = softmax(1,0), q = softmax(0,1).
  const double kl0 = 0.5 * std::log(0.5 / 0.75) + 0.5 * std::log(0.5 / 0.25);
  const double p = std::exp(1.0) / (std::exp(1.0) + 1.0);
  const double kl1 = p * std::log(p / (1 - p)) + (1 - p) * std::log((1 - p) / p);
  EXPECT_NEAR(r.mean_kl, (kl0 + kl1) / 2, 1e-7);
}

TEST(Diff, DifferentTokensAreRefused) {
  MatrixRF l = MatrixRF::Zero(1, 2), h = MatrixRF::Ones(1, 2);
  MatrixRI e = MatrixRI::Zero(1, 1);
  auto a = synthetic(l, h, e), b = synthetic(l, h, e);
  b.tokens[0] = 7;
  EXPECT_THROW(analysis::diff_records(a, b, "a", "b"), Error);
}

TEST(Diff, ReferenceAgainstTransformersDump) {
  // The fixture's expected.safetensors uses the forward-dump names, so it reads as a record directly.
  const auto dir = model_dir("mixtral-8e-bf16-sharded");
  const auto want = ForwardRecord::from_dump(dir + "/expected.safetensors");
  const auto ck = Checkpoint::open(dir);
  ref::Model<float> model(*ck);
  const auto got = ForwardRecord::run(model, want.tokens);
  const auto r = analysis::diff_records(want, got, "transformers", "ref");
  ASSERT_EQ(r.layers.size(), 3u);
  for (const auto& l : r.layers) {
    EXPECT_LT(l.hidden.rel_l2, 1e-5);
    ASSERT_TRUE(l.router_logits.has_value());
    EXPECT_DOUBLE_EQ(l.topk_agreement, 1.0);
  }
  EXPECT_DOUBLE_EQ(r.logits_top1_agreement, 1.0);
  EXPECT_LT(r.mean_kl, 1e-9);
  // The dump written from the record reads back identically. The name carries the process id: under
  // ctest -j every test is its own process, and a fixed name let two of them overwrite each other.
  const auto path =
      (std::filesystem::temp_directory_path() / ("moelab-diff-roundtrip-" + std::to_string(::getpid()) + ".safetensors"))
          .string();
  write_safetensors(path, got.to_tensors());
  const auto back = ForwardRecord::from_dump(path);
  std::filesystem::remove(path);
  EXPECT_EQ(analysis::diff_records(got, back, "x", "y").logits.max_abs, 0.0);
}

}  // namespace
}  // namespace moelab::test
