// Belady's MIN with bypass over a look-ahead window (analysis/cachesim_belady.hpp).
#include "analysis/cachesim_belady.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace moelab::analysis::cachesim {

NextUseIndex::NextUseIndex(int layers, int experts) : experts_(experts), queues_(size_t(layers) * size_t(experts)) {}

void NextUseIndex::push(int64_t step, const std::vector<ExpertSet>& sets) {
  for (size_t l = 0; l < sets.size(); ++l)
    for (int e : sets[l].ids()) queues_[l * size_t(experts_) + size_t(e)].push_back(step);
}

void NextUseIndex::pop(int64_t step, const std::vector<ExpertSet>& sets) {
  for (size_t l = 0; l < sets.size(); ++l)
    for (int e : sets[l].ids()) {
      auto& q = queues_[l * size_t(experts_) + size_t(e)];
      if (q.empty() || q.front() != step) throw Error("cachesim: look-ahead window out of order");
      q.pop_front();
    }
}

int64_t NextUseIndex::next_use(int layer, int expert) const {
  const auto& q = queues_[size_t(layer) * size_t(experts_) + size_t(expert)];
  if (!q.empty()) return q.front();
  return complete_ ? kNever : kBeyond;
}

namespace {

class BeladyPolicy : public CachePolicy {
 public:
  explicit BeladyPolicy(const PolicyParams& p)
      : capacity_(p.capacity), future_(*p.future), undecided_(p.belady_undecided), held_(size_t(p.layers)) {}

  void step(int64_t, int layer, const ExpertSet& need, LayerCounts& c) override {
    ExpertSet& held = held_[size_t(layer)];
    const int hits = (need & held).size();
    c.hits += hits;
    c.misses += need.size() - hits;
    const ExpertSet candidates = held | need;
    if (candidates.size() <= capacity_) {
      held = candidates;
      return;
    }
    std::vector<std::pair<int64_t, int>> by_next;
    for (int e : candidates.ids()) by_next.push_back({future_.next_use(layer, e), e});
    std::sort(by_next.begin(), by_next.end());  // soonest first, ties to the lower id
    held = ExpertSet{};
    for (int i = 0; i < capacity_; ++i) held.add(by_next[size_t(i)].second);
    const auto cut = size_t(capacity_);
    if (undecided_ && by_next[cut - 1].first == NextUseIndex::kBeyond && by_next[cut].first == NextUseIndex::kBeyond)
      ++*undecided_;
  }

 private:
  int capacity_;
  const NextUseIndex& future_;
  int64_t* undecided_;
  std::vector<ExpertSet> held_;  // per layer
};

}  // namespace

std::unique_ptr<CachePolicy> make_belady(const PolicyParams& params) { return std::make_unique<BeladyPolicy>(params); }

}  // namespace moelab::analysis::cachesim
