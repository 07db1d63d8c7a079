#pragma once
// Python's random.Random(seed) for the parts lm-evaluation-harness uses to pick few-shot examples:
// the same MT19937 seeding (init_by_array over the seed's 32-bit words) and the same random.sample
// algorithm, so a seed gives the same few-shot examples here as in the harness.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace moelab::evals {

class PyRandom {
 public:
  explicit PyRandom(uint64_t seed);
  uint32_t next_u32();
  uint32_t getrandbits(int k);  // 1 <= k <= 32
  uint64_t randbelow(uint64_t n);
  // Indices of random.sample(range(n), k), in draw order.
  std::vector<std::size_t> sample(std::size_t n, std::size_t k);

 private:
  uint32_t mt_[624];
  int index_ = 624;
};

}  // namespace moelab::evals
