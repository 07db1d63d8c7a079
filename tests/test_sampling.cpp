// Sampling: greedy, temperature, top-k, top-p draw from the distributions they define. Frequencies
// over many seeded draws are compared with probabilities computed here in double; the bound is 5
// binomial standard deviations, which a correct sampler exceeds with probability < 1e-6 per check.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

#include "core/error.hpp"
#include "core/sampling.hpp"

namespace moelab::test {
namespace {

std::vector<double> softmax(const std::vector<float>& logits, double temperature) {
  std::vector<double> p;
  double sum = 0;
  for (float l : logits) sum += std::exp(l / temperature);
  for (float l : logits) p.push_back(std::exp(l / temperature) / sum);
  return p;
}

std::map<int, int> draw(Sampler& s, const std::vector<float>& logits, int n) {
  std::map<int, int> counts;
  for (int i = 0; i < n; ++i) ++counts[s.sample(logits)];
  return counts;
}

void expect_frequency(int count, int n, double p) {
  const double sd = std::sqrt(n * p * (1 - p));
  EXPECT_NEAR(count, n * p, 5 * sd + 1e-9) << "expected probability " << p;
}

const std::vector<float> kLogits{2.0f, 1.0f, 0.5f, -1.0f, 0.0f};

TEST(Sampling, GreedyIsArgmax) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(kLogits), 0);
  EXPECT_EQ(argmax(std::vector<float>{1, 3, 3, 2}), 1);  // lowest index on ties
}

TEST(Sampling, TemperatureDrawsFromTheSoftmax) {
  for (float t : {1.0f, 0.5f, 2.0f}) {
    Sampler s(SamplingParams{t, 0, 1.0f, 42});
    const int n = 40000;
    const auto counts = draw(s, kLogits, n);
    const auto p = softmax(kLogits, t);
    for (int i = 0; i < int(kLogits.size()); ++i) expect_frequency(counts.count(i) ? counts.at(i) : 0, n, p[size_t(i)]);
  }
}

TEST(Sampling, TopKKeepsOnlyTheKMostLikely) {
  Sampler s(SamplingParams{1.0f, 2, 1.0f, 7});
  const int n = 20000;
  const auto counts = draw(s, kLogits, n);
  ASSERT_EQ(counts.size(), 2u);
  const double p0 = std::exp(2.0) / (std::exp(2.0) + std::exp(1.0));
  expect_frequency(counts.at(0), n, p0);
  expect_frequency(counts.at(1), n, 1 - p0);
}

TEST(Sampling, TopPKeepsTheSmallestNucleus) {
  // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps {0.5, 0.3} (as transformers' TopPLogitsWarper).
  const std::vector<float> logits{std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  Sampler s(SamplingParams{1.0f, 0, 0.7f, 3});
  const int n = 20000;
  const auto counts = draw(s, logits, n);
  ASSERT_EQ(counts.size(), 2u);
  expect_frequency(counts.at(0), n, 0.5 / 0.8);
  expect_frequency(counts.at(1), n, 0.3 / 0.8);
  // A tiny top_p still keeps the most likely token.
  Sampler tiny(SamplingParams{1.0f, 0, 1e-6f, 3});
  EXPECT_EQ(draw(tiny, logits, 100).size(), 1u);
}

TEST(Sampling, SeedMakesItReproducible) {
  Sampler a(SamplingParams{1.0f, 0, 1.0f, 123}), b(SamplingParams{1.0f, 0, 1.0f, 123}),
      c(SamplingParams{1.0f, 0, 1.0f, 124});
  std::vector<int> xa, xb, xc;
  for (int i = 0; i < 200; ++i) {
    xa.push_back(a.sample(kLogits));
    xb.push_back(b.sample(kLogits));
    xc.push_back(c.sample(kLogits));
  }
  EXPECT_EQ(xa, xb);
  EXPECT_NE(xa, xc);
}

TEST(Sampling, BadParametersAreErrors) {
  EXPECT_THROW(Sampler(SamplingParams{-1.0f}), Error);
  EXPECT_THROW(Sampler(SamplingParams{1.0f, -2}), Error);
  EXPECT_THROW(Sampler(SamplingParams{1.0f, 0, 0.0f}), Error);
  EXPECT_THROW(Sampler(SamplingParams{1.0f, 0, 1.5f}), Error);
}

}  // namespace
}  // namespace moelab::test
