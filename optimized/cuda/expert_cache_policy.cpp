#include "optimized/cuda/expert_cache_policy.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>

#include "core/error.hpp"

namespace moelab::cuda {

ExpertCachePolicy::ExpertCachePolicy(int num_layers, int num_experts, int capacity, int64_t expert_bytes)
    : num_layers_(num_layers), num_experts_(num_experts), capacity_(capacity), expert_bytes_(expert_bytes) {
  if (num_layers <= 0 || num_experts <= 0 || capacity < 1 || capacity > num_experts)
    throw Error(fmt::format("expert cache: {} slots per layer must be in [1, {}] experts", capacity, num_experts));
  slots_.resize(size_t(num_layers) * size_t(capacity));
}

std::optional<int> ExpertCachePolicy::slot_of(int layer, int expert) const {
  for (int s = 0; s < capacity_; ++s)
    if (slot(layer, s).expert == expert) return s;
  return std::nullopt;
}

int ExpertCachePolicy::victim(int layer) const {
  int best = -1;
  for (int s = 0; s < capacity_; ++s) {
    const Slot& sl = slot(layer, s);
    if (sl.pinned) continue;
    if (sl.expert < 0) return s;
    if (best < 0 || sl.last_use < slot(layer, best).last_use) best = s;
  }
  return best;
}

std::vector<SlotRequest> ExpertCachePolicy::acquire(int layer, std::span<const int> experts) {
  if (layer < 0 || layer >= num_layers_) throw Error(fmt::format("expert cache: layer {} out of range", layer));
  if (int(experts.size()) > capacity_)
    throw Error(fmt::format("expert cache: {} experts requested in one step, {} slots", experts.size(), capacity_));
  std::vector<SlotRequest> out;
  for (int e : experts) {
    if (e < 0 || e >= num_experts_) throw Error(fmt::format("expert cache: expert {} out of range", e));
    SlotRequest r{.expert = e};
    if (auto s = slot_of(layer, e)) {
      Slot& sl = slot(layer, *s);
      if (sl.pinned) throw Error(fmt::format("expert cache: expert {} requested twice in one step", e));
      r.slot = *s;
      if (sl.prefetched) ++stats_.prefetch_hits; else ++stats_.hits;
      sl.prefetched = false;
    } else {
      const int v = victim(layer);  // never -1: fewer pins than slots (checked above)
      Slot& sl = slot(layer, v);
      r.slot = v;
      r.copy = true;
      r.evicted = sl.expert;
      sl.expert = e;
      sl.prefetched = false;
      ++stats_.misses;
      stats_.bytes_copied += expert_bytes_;
    }
    Slot& sl = slot(layer, r.slot);
    sl.pinned = true;
    sl.last_use = ++clock_;
    out.push_back(r);
  }
  return out;
}

std::vector<SlotRequest> ExpertCachePolicy::prefetch(int layer, std::span<const float> probs, int count) {
  if (int(probs.size()) != num_experts_) throw Error("expert cache: prefetch needs one probability per expert");
  std::vector<int> order(static_cast<size_t>(num_experts_));
  std::iota(order.begin(), order.end(), 0);
  // Highest probability first; ties to the lower index, as the router's top-k does.
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return probs[size_t(a)] > probs[size_t(b)]; });
  std::vector<SlotRequest> out;
  for (int i = 0; i < std::min(count, num_experts_); ++i) {
    const int e = order[size_t(i)];
    if (slot_of(layer, e)) continue;
    const int s = victim(layer);
    if (s < 0) break;
    Slot& sl = slot(layer, s);
    out.push_back({.expert = e, .slot = s, .copy = true, .evicted = sl.expert});
    sl.expert = e;
    sl.prefetched = true;
    // A prefetched expert counts as just used, so the next prefetch of the same step does not evict it.
    sl.last_use = ++clock_;
    ++stats_.prefetches;
    stats_.bytes_copied += expert_bytes_;
  }
  return out;
}

void ExpertCachePolicy::end_step(int layer) {
  for (int s = 0; s < capacity_; ++s) slot(layer, s).pinned = false;
}

}  // namespace moelab::cuda
