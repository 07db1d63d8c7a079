// The cuda-nf4 attention bookkeeping against brute-force enumeration: every visible key is covered by
// exactly one split, splits are aligned and never empty, and the prefill visits exactly the key tiles its
// queries can see.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "core/error.hpp"
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

// Splitting only pays when the (query, head) pairs alone leave multiprocessors idle, and never below
// kMinKeysPerSplit keys a split.
TEST(AttentionPlan, SplitsOnlyWhereTheyHelp) {
  EXPECT_EQ(plan_kv_splits(1, 100000, 0, 264, 132).splits, 1);  // 264 blocks: two per multiprocessor already
  EXPECT_EQ(plan_kv_splits(4, 100000, 0, 32, 64).splits, 1);    // 128 blocks on 64 multiprocessors
  EXPECT_EQ(plan_kv_splits(1, 126, 0, 32, 132).splits, 1);      // 127 keys: two splits would be under 64 each
  EXPECT_EQ(plan_kv_splits(1, 127, 0, 32, 132).splits, 2);      // 128 keys: two splits of 64
  EXPECT_EQ(plan_kv_splits(1, 1000000, 0, 1, 132).splits, kMaxSplits);  // capped
  // A window bounds the keys: 37 visible keys are one split however long the cache.
  const KvSplitPlan w = plan_kv_splits(1, 50000, 37, 32, 132);
  EXPECT_EQ(w.splits, 1);
  EXPECT_EQ(w.first_key, 50000 - 36);
  EXPECT_EQ(w.keys, 37);
  EXPECT_THROW(plan_kv_splits(0, 0, 0, 32, 132), Error);
}

// prefill_key_tiles against enumeration, for full and partial (the last) query tiles: a tile is visited
// exactly when one of the tile's queries sees one of its keys. The number of tiles visited is what the
// masks save: a window of 37 keeps it at most 4 whatever the position.
TEST(AttentionPlan, PrefillVisitsExactlyTheVisibleTiles) {
  for (int start : {0, 5, 16, 100, 4000})
    for (int window : {0, 1, 4, 16, 37, 4096})
      for (int count : {1, 3, kPrefillQueries})
        for (int t0 = 0; t0 < 64; t0 += kPrefillQueries) {
          const TileRange r = prefill_key_tiles(start, t0, count, window);
          SCOPED_TRACE(testing::Message() << "start " << start << " window " << window << " t0 " << t0 << " count "
                                          << count);
          std::vector<bool> seen(size_t(start + t0 + count) / kPrefillKeys + 1, false);
          for (int t = t0; t < t0 + count; ++t)
            for (int k = 0; k <= start + t; ++k)
              if (window == 0 || k > start + t - window) seen[size_t(k / kPrefillKeys)] = true;
          for (int tile = 0; tile < int(seen.size()); ++tile)
            EXPECT_EQ(seen[size_t(tile)], tile >= r.begin && tile < r.end) << "tile " << tile;
          if (window == 37) {
            EXPECT_LE(r.end - r.begin, 4);
          }
          if (window == 0) {
            EXPECT_EQ(r.begin, 0);
          }
        }
}

}  // namespace
}  // namespace moelab::cuda
