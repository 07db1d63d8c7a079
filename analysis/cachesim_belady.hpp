#pragma once
// Belady's MIN for the expert cache (analysis/cachesim.hpp), and the look-ahead it needs.
//
// MIN here may bypass: after each step the cache keeps, of the experts it held and those the step used,
// the C whose next use comes soonest (ties: the lower id); an expert it drops right after using it was
// computed from a staging buffer. That is the optimum of every policy with C slots per layer, whether it
// caches each miss (the engine's way) or not (static): at each step any policy's cache is some C of the
// experts it held and those the step used, and each needed expert not held is at least one copy. The
// tests check it against an exhaustive search over those choices.
//
// Only the scored steps count as uses (analysis/cachesim.hpp: the warm-up is not scored): during the
// warm-up, misses cost nothing and MIN gathers the experts the scored steps want soonest, so it is the
// optimum of the scored steps too.
// The future comes from a window of the next W steps (NextUseIndex). An expert not needed within the
// window counts as needed after all of them; when two or more such experts compete for the last kept
// place before the window reaches the trace's end, the choice is a tie MIN cannot resolve from the
// window: such decisions are counted ("undecided"); with none, the figure is the exact optimum.
// Memory: per layer and expert a queue of the window's steps that need it: at most W × L × min(E, B·k)
// step numbers (8 bytes each), beside the window's W steps of per-layer sets (L × 32 bytes each).
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <vector>

#include "analysis/cachesim_policy.hpp"

namespace moelab::analysis::cachesim {

class NextUseIndex {
 public:
  static constexpr int64_t kNever = std::numeric_limits<int64_t>::max();      // not needed again in the trace
  static constexpr int64_t kBeyond = std::numeric_limits<int64_t>::max() - 1;  // not within the window

  NextUseIndex(int layers, int experts);
  // A step entering the window (steps enter in increasing order); sets[l] is what layer l needs.
  void push(int64_t step, const std::vector<ExpertSet>& sets);
  // The window's first step, about to be simulated: from now on next_use looks past it.
  void pop(int64_t step, const std::vector<ExpertSet>& sets);
  // True once the window holds every remaining step of the trace (what it lacks is never needed again).
  void set_complete(bool complete) { complete_ = complete; }
  bool complete() const { return complete_; }
  // The first step in the window that needs `expert` at `layer`; kBeyond or kNever when none does.
  int64_t next_use(int layer, int expert) const;

 private:
  int experts_;
  bool complete_ = false;
  std::vector<std::deque<int64_t>> queues_;  // [L, E]
};

// The MIN policy; `undecided` (may be null) counts decisions the window could not resolve (above).
std::unique_ptr<CachePolicy> make_belady(const PolicyParams& params);

}  // namespace moelab::analysis::cachesim
