#include "optimized/cuda/expert_grouping.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace moelab::cuda {

ExpertGroups group_by_expert(std::span<const int32_t> experts, int top_k, int num_experts) {
  if (top_k <= 0 || num_experts <= 0 || experts.size() % size_t(top_k) != 0)
    throw Error(fmt::format("group_by_expert: {} choices do not divide into top_k={} (experts={})", experts.size(),
                            top_k, num_experts));
  const int n = int(experts.size() / size_t(top_k));
  ExpertGroups g;
  g.num_experts = num_experts;
  g.top_k = top_k;
  g.offsets.assign(size_t(num_experts) + 1, 0);
  // Counting sort: one pass to count, a prefix sum, one pass to place (stable in token order).
  for (int t = 0; t < n; ++t) {
    for (int k = 0; k < top_k; ++k) {
      const int32_t e = experts[size_t(t) * top_k + k];
      if (e < 0 || e >= num_experts)
        throw Error(fmt::format("group_by_expert: token {} choice {} is expert {}, outside [0, {})", t, k, e,
                                num_experts));
      for (int j = 0; j < k; ++j)
        if (experts[size_t(t) * top_k + j] == e)
          throw Error(fmt::format("group_by_expert: token {} chose expert {} twice", t, e));
      ++g.offsets[size_t(e) + 1];
    }
  }
  for (int e = 0; e < num_experts; ++e) g.offsets[size_t(e) + 1] += g.offsets[size_t(e)];
  std::vector<int32_t> next(g.offsets.begin(), g.offsets.end() - 1);
  g.token.resize(experts.size());
  g.rank.resize(experts.size());
  g.row_of.resize(experts.size());
  for (int t = 0; t < n; ++t) {
    for (int k = 0; k < top_k; ++k) {
      const size_t pair = size_t(t) * top_k + k;
      const int32_t row = next[size_t(experts[pair])]++;
      g.token[size_t(row)] = t;
      g.rank[size_t(row)] = k;
      g.row_of[pair] = row;
    }
  }
  return g;
}

}  // namespace moelab::cuda
