#include "core/sampling.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.hpp"

namespace moelab {

int32_t argmax(std::span<const float> logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

Sampler::Sampler(SamplingParams p) : p_(p), rng_(p.seed) {
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature))
    throw Error(fmt::format("temperature must be >= 0, got {}", p.temperature));
  if (p.top_k < 0) throw Error(fmt::format("top-k must be >= 0, got {}", p.top_k));
  if (!(p.top_p > 0 && p.top_p <= 1)) throw Error(fmt::format("top-p must be in (0, 1], got {}", p.top_p));
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (p_.temperature == 0.0f) return argmax(logits);
  const int n = int(logits.size());
  // Candidates sorted by logit, descending (stable: lower id first on ties).
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  int keep = (p_.top_k > 0 && p_.top_k < n) ? p_.top_k : n;
  std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                    [&](int32_t a, int32_t b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
  order.resize(keep);
  // Softmax over the kept candidates at the given temperature, in double for a stable sum.
  std::vector<double> prob(keep);
  const double top = logits[order[0]] / double(p_.temperature);
  double sum = 0;
  for (int i = 0; i < keep; ++i) sum += prob[i] = std::exp(logits[order[i]] / double(p_.temperature) - top);
  for (auto& q : prob) q /= sum;
  // Nucleus: the smallest prefix whose mass reaches top_p (always at least one token).
  if (p_.top_p < 1.0f) {
    double mass = 0;
    int cut = 0;
    while (cut < keep && mass < p_.top_p) mass += prob[cut++];
    prob.resize(cut);
    order.resize(cut);
  }
  std::discrete_distribution<int> pick(prob.begin(), prob.end());
  return order[pick(rng_)];
}

}  // namespace moelab
