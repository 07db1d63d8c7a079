#pragma once
// The replacement policy of the cuda-nf4 expert cache (`--gpu-expert-cache N`), host-callable, no CUDA.
//
// Each layer has N device slots for its experts; the others live in pinned host memory. Before a
// layer's expert stage the engine asks for the experts the router chose: a resident expert is a hit,
// a missing one takes the least recently used slot not needed by the current step (a miss: its
// weights are copied into that slot on the side stream). Experts requested in the same step are
// pinned until end_step(), so a step never evicts an expert it is about to use. prefetch() ranks the
// experts a predicted router distribution favours and claims slots for those not resident (bytes are
// counted as copies; a prefetch that is later used is counted as a prefetch hit, not a hit).
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace moelab::cuda {

struct CacheStats {
  int64_t hits = 0, misses = 0, prefetches = 0, prefetch_hits = 0;
  int64_t bytes_copied = 0;
  double hit_rate() const {
    const int64_t total = hits + misses + prefetch_hits;
    return total ? double(hits + prefetch_hits) / double(total) : 0.0;
  }
};

struct SlotRequest {
  int expert = 0;
  int slot = 0;
  bool copy = false;  // true: the expert's weights must be copied into `slot` before use
  int evicted = -1;   // the expert that held `slot` before, or -1
};

class ExpertCachePolicy {
 public:
  // capacity: slots per layer, 1 <= capacity <= num_experts (capacity == num_experts: all resident
  // after first use). expert_bytes: bytes one expert's NF4 weights occupy (for the copied-bytes count).
  ExpertCachePolicy(int num_layers, int num_experts, int capacity, int64_t expert_bytes);

  // The experts a layer's step needs (distinct). Throws moelab::Error when more distinct experts than
  // slots are requested in one step (the engine then runs them in several rounds).
  std::vector<SlotRequest> acquire(int layer, std::span<const int> experts);
  // Makes the `count` most probable experts of `probs` (size num_experts) resident in `layer`, copying
  // those that are not, never evicting one pinned by the current step. Returns the copies to issue.
  std::vector<SlotRequest> prefetch(int layer, std::span<const float> probs, int count);
  void end_step(int layer);  // releases the pins of the layer's current step

  std::optional<int> slot_of(int layer, int expert) const;
  int capacity() const { return capacity_; }
  const CacheStats& stats() const { return stats_; }

 private:
  struct Slot {
    int expert = -1;
    uint64_t last_use = 0;
    bool pinned = false;
    bool prefetched = false;  // filled by prefetch and not yet used
  };
  int victim(int layer) const;  // the unpinned slot to reuse: an empty one first, else the LRU
  Slot& slot(int layer, int s) { return slots_[size_t(layer) * capacity_ + s]; }
  const Slot& slot(int layer, int s) const { return slots_[size_t(layer) * capacity_ + s]; }

  int num_layers_, num_experts_, capacity_;
  int64_t expert_bytes_;
  uint64_t clock_ = 0;
  std::vector<Slot> slots_;
  CacheStats stats_;
};

}  // namespace moelab::cuda
