// The cuda-nf4 attention bookkeeping against brute-force enumeration: every visible key is covered by
// exactly one split, splits are aligned and never empty, and the prefill visits exactly the key tiles its
// queries can see.
#include <gtest/gtest.h>

#include <vector>

#include "optimized/cuda/attention_plan.hpp"

namespace moelab::cuda {
namespace {

TEST(AttentionPlan, FirstVisibleKeyFollowsTheSlidingWindow) {
  EXPECT_EQ(first_visible_key(10, 0), 0);
  EXPECT_EQ(first_visible_key(10, 4), 7);   // keys 7, 8, 9, 10: four of them
  EXPECT_EQ(first_visible_key(2, 4), 0);
  EXPECT_EQ(first_visible_key(4095, 4096), 0);
  EXPECT_EQ(first_visible_key(4096, 4096), 1);
}

TEST(AttentionPlan, SplitsCoverEveryVisibleKeyOnce) {
  for (int n : {1, 2, 4})
    for (int start : {0, 1, 63, 64, 1000, 12287, 40000})
      for (int window : {0, 37, 4096})
        for (int sm : {1, 108, 132}) {
          const KvSplitPlan p = plan_kv_splits(n, start, window, 32, sm);
          SCOPED_TRACE(testing::Message() << n << " " << start << " " << window << " " << sm);
          ASSERT_GE(p.splits, 1);
          ASSERT_LE(p.splits, kMaxSplits);
          EXPECT_EQ(p.keys_per_split % kSplitAlign, 0);
          EXPECT_EQ(p.first_key, first_visible_key(start, window));
          EXPECT_EQ(p.first_key + p.keys, start + n);
          std::vector<int> covered(size_t(p.keys), 0);
          for (int s = 0; s < p.splits; ++s) {
            const int b = s * p.keys_per_split, e = std::min(p.keys, b + p.keys_per_split);
            ASSERT_LT(b, e) << "split " << s << " is empty";
            for (int k = b; k < e; ++k) ++covered[size_t(k)];
          }
          for (int c : covered) ASSERT_EQ(c, 1);
          if (p.splits > 1) {
            EXPECT_GE(p.keys_per_split, kMinKeysPerSplit);
          }
          for (int t = 0; t < n; ++t) EXPECT_GE(first_visible_key(start + t, window), p.first_key);
        }
  // One query over 40,000 keys on 132 multiprocessors with 32 heads: 9 splits of 4,448 keys would give
  // 288 blocks >= 2 x 132.
  const KvSplitPlan p = plan_kv_splits(1, 39999, 0, 32, 132);
  EXPECT_EQ(p.splits, 9);
  EXPECT_EQ(attention_workspace_floats(p, 1, 32, 128), int64_t(32) * 9 * 130);
}

TEST(AttentionPlan, PrefillVisitsExactlyTheVisibleTiles) {
  for (int start : {0, 5, 100})
    for (int window : {0, 4, 37})
      for (int t0 = 0; t0 < 64; t0 += kPrefillQueries) {
        const int count = kPrefillQueries;
        const TileRange r = prefill_key_tiles(start, t0, count, window);
        std::vector<bool> seen(size_t(start + t0 + count) / kPrefillKeys + 1, false);
        for (int t = t0; t < t0 + count; ++t)
          for (int k = first_visible_key(start + t, window); k <= start + t; ++k) seen[size_t(k / kPrefillKeys)] = true;
        for (int tile = 0; tile < int(seen.size()); ++tile)
          EXPECT_EQ(seen[size_t(tile)], tile >= r.begin && tile < r.end)
              << "start " << start << " window " << window << " t0 " << t0 << " tile " << tile;
      }
}

}  // namespace
}  // namespace moelab::cuda
