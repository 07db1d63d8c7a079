// --lm-head bf16: the kernels against float64 on the same BF16 values, and the engine's logits against
// the FP32 head with a bound derived from BF16 rounding.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "analysis/forward_record.hpp"
#include "core/checkpoint.hpp"
#include "core/dtype.hpp"
#include "engine_test_util.hpp"
#include "fixture_util.hpp"
#include "isa_test_util.hpp"
#include "optimized/cpu/bf16_matrix.hpp"
#include "optimized/cpu/engine.hpp"

namespace moelab::test {
namespace {

using cpu::Isa;

// FP32 accumulation of `cols` products in any order, each product and sum rounded once (FMA rounds
// the product into the sum): at most (cols + 4) u sum|w x| with u = 2^-24.
double fp32_bound(int64_t cols, double magnitude) { return (double(cols) + 4) * std::ldexp(1.0, -24) * magnitude; }

// The BF16 head has scalar and AVX2 kernels; one this CPU lacks is SKIPPED with the flags it lacks.
class Bf16MatrixRows : public ::testing::TestWithParam<Isa> {};

TEST_P(Bf16MatrixRows, MatchFloat64) {
  const Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  // Widths: a multiple of 16 (the unrolled loop), 4096 (Mixtral), tails of 4 and of 7 columns.
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{37, 96}, {5, 4096}, {9, 100}, {3, 7}}) {
    MatrixRF w(rows, cols);
    for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = normal(rng);
    const auto m = cpu::round_rows_bf16(w);
    ASSERT_EQ(m.bytes(), rows * cols * 2);
    for (int n : {1, 3, 4, 6}) {  // the four-token kernel, its remainder, and both together
      MatrixRF x(n, cols);
      for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng) * 50.0f;
      {
        std::vector<float> y(static_cast<size_t>(n * rows), std::nanf(""));
        cpu::bf16_matrix_rows(isa, m, x.data(), cols, n, y.data(), rows, 0, rows);
        for (int t = 0; t < n; ++t)
          for (int64_t r = 0; r < rows; ++r) {
            double exact = 0, magnitude = 0, rounding = 0;
            for (int64_t c = 0; c < cols; ++c) {
              const double wv = bf16_to_f32(m.values[size_t(r * cols + c)]);
              exact += wv * double(x(t, c));
              magnitude += std::abs(wv * double(x(t, c)));
              rounding = std::max(rounding, std::abs(wv - double(w(r, c))) / std::abs(double(w(r, c))));
            }
            ASSERT_LE(rounding, std::ldexp(1.0, -8)) << "round to nearest: half of BF16's 2^-7 step";
            const float got = y[size_t(t * rows + r)];
            ASSERT_LE(std::abs(got - exact), fp32_bound(cols, magnitude))
                << cpu::isa_name(isa) << " token " << t << " row " << r << " of " << rows << "x" << cols;
          }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, Bf16MatrixRows, ::testing::Values(Isa::Scalar, Isa::Avx2),
                         [](const auto& info) { return isa_test_name(info.param); });

class Bf16LmHead : public DequantizedFixture {};

// The engine with the BF16 head against the FP32 head, both in the exact activation mode. Everything
// before the head is the same computation, so logit r differs only by the head's rounding,
// |sum_c (bf16(w) - w) x_c| <= 2^-8 sum_c |w_rc x_c|, plus the two heads' FP32 accumulation. x is the
// final RMSNorm of the last layer's hidden state, recomputed here in float64 from the record (the
// engine's FP32 x is within about (d + 8) 2^-24 of it relatively: the second term covers it).
TEST_P(Bf16LmHead, LogitsWithinBf16RoundingOfTheFp32Head) {
  cpu::Nf4Engine fp32(*ck, cpu::EngineOptions{.activations = "fp32", .lm_head = "fp32"});
  cpu::Nf4Engine bf16(*ck, cpu::EngineOptions{.activations = "fp32", .lm_head = "bf16"});
  EXPECT_EQ(bf16.lm_head_format(), "bf16");
  const auto a = analysis::ForwardRecord::run(fp32, tokens);
  const auto b = analysis::ForwardRecord::run(bf16, tokens);
  const auto& cfg = ck->config();
  const auto head_name = cfg.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  const auto w = ck->read_f32(head_name);
  const auto g = ck->read_f32("model.norm.weight");
  const int64_t d = cfg.hidden_size;
  EXPECT_EQ(fp32.weight_bytes() - bf16.weight_bytes(), int64_t(cfg.vocab_size) * d * 2);
  const MatrixRF& h = a.layers.back().hidden;
  for (Eigen::Index t = 0; t < h.rows(); ++t) {
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += double(h(t, c)) * h(t, c);
    const double inv = 1.0 / std::sqrt(ss / double(d) + cfg.rms_norm_eps);
    for (int64_t r = 0; r < cfg.vocab_size; ++r) {
      double magnitude = 0;
      for (int64_t c = 0; c < d; ++c) magnitude += std::abs(double(w[size_t(r * d + c)]) * h(t, c) * inv * g[size_t(c)]);
      const double bound = (std::ldexp(1.0, -8) + 2 * (double(d) + 64) * std::ldexp(1.0, -24)) * magnitude;
      ASSERT_LE(std::abs(double(a.logits(t, r)) - b.logits(t, r)), bound) << "token " << t << " logit " << r;
    }
  }
  for (size_t l = 0; l < a.layers.size(); ++l) ASSERT_EQ(a.layers[l].hidden, b.layers[l].hidden) << "layer " << l;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Bf16LmHead, MOELAB_FIXTURE_MODELS, fixture_test_name);

}  // namespace
}  // namespace moelab::test
