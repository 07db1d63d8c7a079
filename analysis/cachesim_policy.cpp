// The slot policies and the static policy of the cache simulator (analysis/cachesim_policy.hpp); Belady's
// is in cachesim_belady.cpp.
#include "analysis/cachesim_policy.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>

#include "analysis/cachesim_belady.hpp"
#include "core/error.hpp"
#include "optimized/cuda/expert_cache_policy.hpp"

namespace moelab::analysis::cachesim {
namespace {

// The rounds of a step, as the engine forms them: ascending ids, at most `capacity` per round.
template <class F>
void for_each_round(const ExpertSet& need, int capacity, F&& f) {
  int ids[256];
  const int n = need.to_ids(ids);
  for (int r0 = 0; r0 < n; r0 += capacity) f(std::span<const int>(ids + r0, size_t(std::min(capacity, n - r0))));
}

// lru: the cuda-nf4 engine's ExpertCachePolicy, driven as moe_stage.cpp drives it. With a prefetch guess
// (prefetch-prev: the previous step's experts; next-layer-gate: the trace's guess), the guessed experts are
// prefetched before the step, as the engine's prefetch is issued before the layer's step.
class EnginePolicy : public CachePolicy {
 public:
  enum class Guess { None, Previous, Recorded };
  EnginePolicy(const PolicyParams& p, Guess guess)
      : cache_(p.layers, p.experts, p.capacity, p.expert_bytes), capacity_(p.capacity), experts_(p.experts),
        mode_(guess), previous_(size_t(p.layers)) {}

  void step(int64_t, int layer, const ExpertSet& need, const ExpertSet& recorded, LayerCounts& c) override {
    const int64_t prefetch_hits_before = cache_.stats().prefetch_hits;
    if (mode_ != Guess::None) {
      const ExpertSet guess = mode_ == Guess::Previous ? previous_[size_t(layer)] : recorded;
      if (!guess.empty()) {
        std::vector<float> probs(size_t(experts_), 0.0f);
        for (int e : guess.ids()) probs[size_t(e)] = 1.0f;
        // At most C: a guess larger than the cache would evict its own first experts.
        c.prefetch_copies += int64_t(cache_.prefetch(layer, probs, std::min(guess.size(), capacity_)).size());
        c.guessed += guess.size();
        c.guess_used += (guess & need).size();
        c.guess_needed += need.size();
      }
      if (mode_ == Guess::Previous) previous_[size_t(layer)] = need;
    }
    for_each_round(need, capacity_, [&](std::span<const int> round) {
      for (const auto& r : cache_.acquire(layer, round)) (r.copy ? c.misses : c.hits) += 1;
      cache_.end_step(layer);
    });
    c.prefetch_hits += cache_.stats().prefetch_hits - prefetch_hits_before;
  }

 private:
  moelab::cuda::ExpertCachePolicy cache_;
  int capacity_, experts_;
  Guess mode_;
  std::vector<ExpertSet> previous_;  // per layer, the previous step's experts (prefetch-prev's guess)
};

// fifo, lfu, lfu-aged: C slots per layer, an empty slot first, else the victim with the smallest key
// among the slots not in the current round.
class SlotPolicy : public CachePolicy {
 public:
  enum class Kind { Fifo, Lfu, LfuAged };
  SlotPolicy(const PolicyParams& p, Kind kind)
      : kind_(kind), capacity_(p.capacity), experts_(p.experts), aging_(p.lfu_aging_steps),
        slots_(size_t(p.layers) * size_t(p.capacity), -1), loaded_(slots_.size(), 0),
        count_(size_t(p.layers) * size_t(p.experts), 0), last_use_(count_.size(), 0), aged_at_(size_t(p.layers), 0) {
    if (kind == Kind::LfuAged && aging_ < 1) throw Error("cachesim: the lfu-aged halving period must be at least 1 step");
  }

  void step(int64_t t, int layer, const ExpertSet& need, const ExpertSet&, LayerCounts& c) override {
    const size_t l = size_t(layer);
    if (kind_ == Kind::LfuAged && t - aged_at_[l] >= aging_) {  // every `aging_` steps, counts halve
      for (int e = 0; e < experts_; ++e) count_[l * size_t(experts_) + size_t(e)] >>= 1;
      aged_at_[l] = t;
    }
    for_each_round(need, capacity_, [&](std::span<const int> round) {
      for (size_t i = 0; i < round.size(); ++i) {
        const int e = round[i];
        ++clock_;
        const size_t ce = l * size_t(experts_) + size_t(e);
        ++count_[ce];
        last_use_[ce] = clock_;
        int* slots = &slots_[l * size_t(capacity_)];
        if (std::find(slots, slots + capacity_, e) != slots + capacity_) {
          ++c.hits;
          continue;
        }
        ++c.misses;
        const int v = victim(layer, round.first(i));
        slots[v] = e;
        loaded_[l * size_t(capacity_) + size_t(v)] = clock_;
      }
    });
  }

 private:
  // An empty slot, else the smallest key among the experts not `pinned` (those the round has already
  // acquired, as the engine pins them): fifo the load time; lfu the (count, last use) pair, so equal
  // counts evict the least recently used.
  int victim(int layer, std::span<const int> pinned) const {
    const size_t l = size_t(layer);
    const int* slots = &slots_[l * size_t(capacity_)];
    int best = -1;
    for (int s = 0; s < capacity_; ++s) {
      if (slots[s] < 0) return s;
      if (std::find(pinned.begin(), pinned.end(), slots[s]) != pinned.end()) continue;
      if (best < 0 || key(layer, s) < key(layer, best)) best = s;
    }
    return best;  // fewer pins than slots (a round has at most C experts): never -1
  }
  std::pair<uint64_t, uint64_t> key(int layer, int s) const {
    const size_t l = size_t(layer), ce = l * size_t(experts_) + size_t(slots_[l * size_t(capacity_) + size_t(s)]);
    if (kind_ == Kind::Fifo) return {loaded_[l * size_t(capacity_) + size_t(s)], 0};
    return {count_[ce], last_use_[ce]};
  }

  Kind kind_;
  int capacity_, experts_, aging_;
  std::vector<int> slots_;            // [L, C] expert in the slot, -1 empty
  std::vector<uint64_t> loaded_;      // [L, C] when the slot's expert was loaded
  std::vector<uint64_t> count_;       // [L, E] uses (lfu: kept for every expert, resident or not)
  std::vector<uint64_t> last_use_;    // [L, E]
  std::vector<int64_t> aged_at_;      // [L] the step counts were last halved at
  uint64_t clock_ = 0;
};

// static: a fixed set per layer; the others are computed from a staging buffer and never cached.
class StaticPolicy : public CachePolicy {
 public:
  explicit StaticPolicy(std::vector<ExpertSet> sets) : sets_(std::move(sets)) {}
  void step(int64_t, int layer, const ExpertSet& need, const ExpertSet&, LayerCounts& c) override {
    const int hits = (need & sets_[size_t(layer)]).size();
    c.hits += hits;
    c.misses += need.size() - hits;
  }

 private:
  std::vector<ExpertSet> sets_;
};

}  // namespace

std::vector<ExpertSet> most_used(const std::vector<std::vector<int64_t>>& counts, int capacity) {
  std::vector<ExpertSet> out;
  for (const auto& layer : counts) {
    std::vector<int> order(layer.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return layer[size_t(a)] > layer[size_t(b)]; });
    ExpertSet s;
    for (int i = 0; i < std::min<int>(capacity, int(order.size())); ++i)
      if (layer[size_t(order[size_t(i)])] > 0) s.add(order[size_t(i)]);  // never chosen: not kept
    out.push_back(s);
  }
  return out;
}

std::unique_ptr<CachePolicy> make_policy(Policy p, const PolicyParams& params) {
  if (params.capacity < 1 || params.capacity > params.experts)
    throw Error(fmt::format("cachesim: cache size {} is outside 1..{} (the experts per layer)", params.capacity,
                            params.experts));
  switch (p) {
    case Policy::Lru: return std::make_unique<EnginePolicy>(params, EnginePolicy::Guess::None);
    case Policy::PrefetchPrev: return std::make_unique<EnginePolicy>(params, EnginePolicy::Guess::Previous);
    case Policy::NextLayerGate: return std::make_unique<EnginePolicy>(params, EnginePolicy::Guess::Recorded);
    case Policy::Fifo: return std::make_unique<SlotPolicy>(params, SlotPolicy::Kind::Fifo);
    case Policy::Lfu: return std::make_unique<SlotPolicy>(params, SlotPolicy::Kind::Lfu);
    case Policy::LfuAged: return std::make_unique<SlotPolicy>(params, SlotPolicy::Kind::LfuAged);
    case Policy::Static:
      if (int(params.static_sets.size()) != params.layers)
        throw Error("cachesim: the static policy needs a calibration part of the trace (--calibrate)");
      return std::make_unique<StaticPolicy>(params.static_sets);
    case Policy::Belady:
      if (!params.future) throw Error("cachesim: belady needs the trace's future (a look-ahead window)");
      return make_belady(params);
  }
  throw Error("cachesim: unknown policy");
}

}  // namespace moelab::analysis::cachesim
