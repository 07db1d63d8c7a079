#pragma once
// The vocabulary of the expert-cache simulator (analysis/cachesim.hpp): a set of experts, the counters a
// policy keeps per layer, and the policies by name.
#include <array>
#include <bit>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moelab::analysis::cachesim {

// A set of expert ids (0..255, as a trace stores them) as a bit mask.
struct ExpertSet {
  std::array<uint64_t, 4> bits{};
  void add(int e) { bits[size_t(e) >> 6] |= uint64_t(1) << (e & 63); }
  void remove(int e) { bits[size_t(e) >> 6] &= ~(uint64_t(1) << (e & 63)); }
  bool has(int e) const { return (bits[size_t(e) >> 6] >> (e & 63)) & 1; }
  int size() const {
    int n = 0;
    for (uint64_t w : bits) n += std::popcount(w);
    return n;
  }
  bool empty() const { return (bits[0] | bits[1] | bits[2] | bits[3]) == 0; }
  ExpertSet operator|(const ExpertSet& o) const {
    ExpertSet r;
    for (size_t i = 0; i < 4; ++i) r.bits[i] = bits[i] | o.bits[i];
    return r;
  }
  ExpertSet operator&(const ExpertSet& o) const {
    ExpertSet r;
    for (size_t i = 0; i < 4; ++i) r.bits[i] = bits[i] & o.bits[i];
    return r;
  }
  bool operator==(const ExpertSet&) const = default;
  // The ids in ascending order into `out` (room for 256); returns how many (no allocation: the hot path).
  int to_ids(int* out) const {
    int n = 0;
    for (size_t i = 0; i < 4; ++i)
      for (uint64_t w = bits[i]; w; w &= w - 1) out[n++] = int(i * 64) + std::countr_zero(w);
    return n;
  }
  std::vector<int> ids() const {  // ascending
    std::vector<int> out;
    for (size_t i = 0; i < 4; ++i)
      for (uint64_t w = bits[i]; w; w &= w - 1) out.push_back(int(i * 64) + std::countr_zero(w));
    return out;
  }
};

// What one policy did at one layer, summed over the scored steps.
struct LayerCounts {
  int64_t steps = 0;          // decode steps (one token each, or one per sequence of a batch)
  int64_t requests = 0;       // experts the steps needed: per step, the distinct experts of its tokens
  int64_t hits = 0;           // needed experts already on the GPU (prefetched ones included)
  int64_t prefetch_hits = 0;  // of the hits, experts a prefetch had copied and not yet used
  int64_t misses = 0;         // needed experts copied on demand (requests = hits + misses)
  int64_t prefetch_copies = 0;  // experts copied by prefetches (used or not)
  // Prefetch guesses (prefetch policies only): experts guessed, guessed experts the step needed, and the
  // experts needed by the steps that had a guess (precision = guess_used / guessed, recall = guess_used /
  // guess_needed).
  int64_t guessed = 0, guess_used = 0, guess_needed = 0;

  LayerCounts& operator+=(const LayerCounts& o) {
    steps += o.steps, requests += o.requests, hits += o.hits, prefetch_hits += o.prefetch_hits, misses += o.misses;
    prefetch_copies += o.prefetch_copies, guessed += o.guessed, guess_used += o.guess_used;
    guess_needed += o.guess_needed;
    return *this;
  }
  int64_t copies() const { return misses + prefetch_copies; }
};

// How often a step at one layer needed u experts, of which m missed, with p prefetch copies (each <= E): the
// time model's per-step terms are not linear in them (analysis/cachesim_time.hpp), so means are not enough.
class StepMix {
 public:
  explicit StepMix(int experts = 0) : side_(size_t(experts) + 1) {
    if (side_ * side_ * side_ <= kDenseLimit) dense_.assign(side_ * side_ * side_, 0);
  }
  void add(int used, int misses, int prefetches, int64_t n = 1) {
    const size_t key = (size_t(used) * side_ + size_t(misses)) * side_ + size_t(prefetches);
    if (!dense_.empty()) dense_[key] += n;
    else sparse_[key] += n;
  }
  void merge(const StepMix& o) {
    o.for_each([&](int u, int m, int p, int64_t n) { add(u, m, p, n); });
  }
  template <class F>
  void for_each(F&& f) const {  // f(used, misses, prefetches, steps) for every non-zero entry, in key order
    const auto call = [&](size_t key, int64_t n) {
      if (n) f(int(key / side_ / side_), int(key / side_ % side_), int(key % side_), n);
    };
    for (size_t i = 0; i < dense_.size(); ++i) call(i, dense_[i]);
    for (const auto& [key, n] : sparse_) call(key, n);
  }

 private:
  static constexpr size_t kDenseLimit = 4096;  // a flat table up to E = 15 (Mixtral's 8: 729 entries)
  size_t side_;
  std::vector<int64_t> dense_;
  std::map<size_t, int64_t> sparse_;
};

enum class Policy { Lru, Lfu, LfuAged, Fifo, Static, Belady, PrefetchPrev, NextLayerGate };

std::vector<Policy> all_policies();
// "lru", "lfu", "lfu-aged", "fifo", "static", "belady", "prefetch-prev", "next-layer-gate"
std::string policy_name(Policy p);
// Throws moelab::Error naming the known policies.
Policy parse_policy(const std::string& name);
// One paragraph: what the policy keeps and evicts (cachesim --help and docs/cachesim.md).
std::string policy_description(Policy p);
bool is_prefetch_policy(Policy p);
bool needs_prefetch_guess(Policy p);  // next-layer-gate: the trace's /prefetch_guess
bool is_bypass_policy(Policy p);  // misses go through a staging buffer and may stay uncached (static, belady)

}  // namespace moelab::analysis::cachesim
