// Belady's MIN with bypass over a look-ahead window (analysis/cachesim_belady.hpp).
#include "analysis/cachesim_belady.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace moelab::analysis::cachesim {

NextUseIndex::NextUseIndex(int layers, int experts) : experts_(experts), queues_(size_t(layers) * size_t(experts)) {}

void NextUseIndex::push(int64_t step, const std::vector<ExpertSet>& sets) {
  int ids[256];
  for (size_t l = 0; l < sets.size(); ++l)
    for (int i = 0, n = sets[l].to_ids(ids); i < n; ++i) queues_[l * size_t(experts_) + size_t(ids[i])].push_back(step);
}

void NextUseIndex::pop(int64_t step, const std::vector<ExpertSet>& sets) {
  int ids[256];
  for (size_t l = 0; l < sets.size(); ++l)
    for (int i = 0, n = sets[l].to_ids(ids); i < n; ++i) {
      auto& q = queues_[l * size_t(experts_) + size_t(ids[i])];
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

  void step(int64_t, int layer, const ExpertSet& need, const ExpertSet&, LayerCounts& c) override {
    ExpertSet& held = held_[size_t(layer)];
    const int hits = (need & held).size();
    c.hits += hits;
    c.misses += need.size() - hits;
    const ExpertSet candidates = held | need;
    if (candidates.size() <= capacity_) {
      held = candidates;
      return;
    }
    int ids[256];
    std::pair<int64_t, int> by_next[256];
    const int n = candidates.to_ids(ids);
    for (int i = 0; i < n; ++i) by_next[i] = {future_.next_use(layer, ids[i]), ids[i]};
    std::sort(by_next, by_next + n);  // soonest first, ties to the lower id
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
