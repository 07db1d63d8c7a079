#pragma once
// Next-token sampling shared by every engine: greedy, temperature, top-k, top-p (nucleus), seeded.
// Order as in Hugging Face's logits processors: temperature, then top-k, then top-p, then draw.
#include <cstdint>
#include <random>
#include <span>

namespace moelab {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax)
  int top_k = 0;             // 0: no limit
  float top_p = 1.0f;        // 1: no limit
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(SamplingParams p);  // throws moelab::Error on out-of-range parameters
  int32_t sample(std::span<const float> logits);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

int32_t argmax(std::span<const float> logits);  // lowest index on ties

}  // namespace moelab
