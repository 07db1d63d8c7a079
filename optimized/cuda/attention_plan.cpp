#include "optimized/cuda/attention_plan.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace moelab::cuda {

int first_visible_key(int position, int window) { return window > 0 ? std::max(0, position - window + 1) : 0; }

KvSplitPlan plan_kv_splits(int n, int start, int window, int heads, int sm_count) {
  if (n < 1 || start < 0 || heads < 1) throw Error("attention plan: needs n >= 1, start >= 0, heads >= 1");
  KvSplitPlan p;
  p.first_key = first_visible_key(start, window);  // the earliest query sees the earliest key
  p.keys = start + n - p.first_key;
  const int want = std::max(1, (2 * std::max(sm_count, 1) + n * heads - 1) / (n * heads));
  const int most = std::max(1, std::min(kMaxSplits, p.keys / kMinKeysPerSplit));
  const int splits = std::min(want, most);
  p.keys_per_split = (p.keys + splits - 1) / splits;
  p.keys_per_split = (p.keys_per_split + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  p.splits = (p.keys + p.keys_per_split - 1) / p.keys_per_split;  // rounding up may leave fewer, none empty
  return p;
}

int64_t attention_workspace_floats(const KvSplitPlan& plan, int n, int heads, int head_dim) {
  return int64_t(n) * heads * plan.splits * (head_dim + 2);
}

TileRange prefill_key_tiles(int start, int t0, int count, int window) {
  const int first = first_visible_key(start + t0, window);  // the tile's first query sees the lowest keys
  const int last = start + t0 + count - 1;                  // its last query sees the highest
  return {first / kPrefillKeys, last / kPrefillKeys + 1};
}

}  // namespace moelab::cuda
