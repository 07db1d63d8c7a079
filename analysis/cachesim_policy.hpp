#pragma once
// Expert-cache policies of the simulator (analysis/cachesim.hpp), one object per (policy, cache size)
// covering every layer. A step is one decode step at one layer: the experts its tokens need.
//
// Slot policies (lru, lfu, lfu-aged, fifo, prefetch-prev) work as the cuda-nf4 engine does
// (optimized/cuda/moe_stage.cpp): a step's experts are taken in ascending id, in rounds of at most C
// (the cache size); each round acquires its experts in order (a resident one is a hit; a missing one is
// copied into a free slot, else into the victim slot the policy picks among those the round has not
// acquired yet: acquired ones are pinned), then releases them. So every expert a step uses is on the GPU while it computes, and C < (experts a step
// needs) costs reloads within the step, as it does in the engine. lru and prefetch-prev ARE the engine's
// policy object (moelab::cuda::ExpertCachePolicy), not a copy of it.
// Bypass policies (static, belady) may compute an expert from a staging buffer without caching it.
#include <memory>
#include <vector>

#include "analysis/cachesim_types.hpp"

namespace moelab::analysis::cachesim {

class NextUseIndex;

class CachePolicy {
 public:
  virtual ~CachePolicy() = default;
  // Step `t` (counted from 0 over the whole run) at `layer`, needing `need`, with the trace's prefetch guess
  // for it (`guess`: empty when none); adds what happened to `c`.
  virtual void step(int64_t t, int layer, const ExpertSet& need, const ExpertSet& guess, LayerCounts& c) = 0;
};

struct PolicyParams {
  int layers = 0, experts = 0, capacity = 0;
  int64_t expert_bytes = 1;   // for the engine's policy object's byte counter (not used by the figures)
  int lfu_aging_steps = 64;   // lfu-aged: every this many steps, every count is halved
  std::vector<ExpertSet> static_sets;  // static: per layer, the C experts kept
  const NextUseIndex* future = nullptr;  // belady: next uses within the look-ahead window
  int64_t* belady_undecided = nullptr;   // belady: decisions the window could not resolve (may be null)
};

// Throws moelab::Error when a parameter the policy needs is missing or C is outside 1..E.
std::unique_ptr<CachePolicy> make_policy(Policy p, const PolicyParams& params);

// static: per layer the `capacity` experts with the highest counts (ties to the lower id), leaving out those
// never chosen (count 0: the calibration part never loaded them, so static may keep fewer than C).
// counts[l][e].
std::vector<ExpertSet> most_used(const std::vector<std::vector<int64_t>>& counts, int capacity);

}  // namespace moelab::analysis::cachesim
