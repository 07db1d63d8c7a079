// cuda-nf4's host-side logic, checked against independent brute-force computations. Runs everywhere
// (no CUDA needed): grouping index maps, the expert cache's LRU policy, the weight arena, prefill bands.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <map>
#include <random>
#include <set>

#include "core/error.hpp"
#include "optimized/cuda/code_table.hpp"
#include "optimized/cuda/expert_cache_policy.hpp"
#include "optimized/cuda/expert_grouping.hpp"
#include "optimized/cuda/prefill_tiles.hpp"
#include "optimized/cuda/weight_arena.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::cuda {
namespace {

// Random routing: each token picks top_k distinct experts.
std::vector<int32_t> random_routing(int n, int top_k, int experts, std::mt19937& rng) {
  std::vector<int32_t> out;
  std::vector<int32_t> all(experts);
  for (int e = 0; e < experts; ++e) all[e] = e;
  for (int t = 0; t < n; ++t) {
    std::shuffle(all.begin(), all.end(), rng);
    out.insert(out.end(), all.begin(), all.begin() + top_k);
  }
  return out;
}

TEST(CudaHostGrouping, MatchesBruteForceOnRandomRouting) {
  std::mt19937 rng(7);
  for (int n : {1, 2, 7, 64, 513}) {
    for (auto [k, e] : {std::pair{2, 8}, std::pair{1, 1}, std::pair{3, 5}}) {
      const auto ex = random_routing(n, k, e, rng);
      const ExpertGroups g = group_by_expert(ex, k, e);
      ASSERT_EQ(g.offsets.size(), size_t(e + 1));
      EXPECT_EQ(g.offsets.front(), 0);
      EXPECT_EQ(g.offsets.back(), n * k);
      for (int x = 0; x < e; ++x) {
        // Brute force: the (token, rank) pairs choosing x, in token order.
        std::vector<std::pair<int, int>> want;
        for (int t = 0; t < n; ++t)
          for (int r = 0; r < k; ++r)
            if (ex[t * k + r] == x) want.push_back({t, r});
        ASSERT_EQ(g.count(x), int(want.size())) << "expert " << x;
        for (size_t i = 0; i < want.size(); ++i) {
          const int row = g.offsets[x] + int(i);
          EXPECT_EQ(g.token[row], want[i].first);
          EXPECT_EQ(g.rank[row], want[i].second);
        }
      }
      // row_of is the inverse permutation.
      std::vector<int> seen(n * k, 0);
      for (int p = 0; p < n * k; ++p) {
        const int row = g.row_of[p];
        ASSERT_GE(row, 0);
        ASSERT_LT(row, n * k);
        ++seen[row];
        EXPECT_EQ(g.token[row], p / k);
        EXPECT_EQ(g.rank[row], p % k);
        EXPECT_EQ(ex[p], std::upper_bound(g.offsets.begin(), g.offsets.end(), row) - g.offsets.begin() - 1);
      }
      EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
    }
  }
}

TEST(CudaHostGrouping, RejectsBadRouting) {
  const std::vector<int32_t> out_of_range = {0, 8};
  EXPECT_THROW(group_by_expert(out_of_range, 2, 8), Error);
  const std::vector<int32_t> twice = {3, 3};
  EXPECT_THROW(group_by_expert(twice, 2, 8), Error);
  const std::vector<int32_t> ragged = {1, 2, 3};
  EXPECT_THROW(group_by_expert(ragged, 2, 8), Error);
}

// An independent LRU model: a recency list per layer (front = most recent).
struct BruteLru {
  int capacity;
  std::map<int, std::deque<int>> lists;
  bool touch(int layer, int e) {  // true on a hit
    auto& l = lists[layer];
    auto it = std::find(l.begin(), l.end(), e);
    const bool hit = it != l.end();
    if (hit) l.erase(it);
    else if (int(l.size()) == capacity) l.pop_back();
    l.push_front(e);
    return hit;
  }
};

TEST(CudaHostExpertCache, LruMatchesBruteForce) {
  std::mt19937 rng(11);
  for (int capacity : {2, 4, 6, 8}) {
    const int layers = 3, experts = 8;
    ExpertCachePolicy cache(layers, experts, capacity, 1000);
    BruteLru brute{capacity, {}};
    int64_t hits = 0, misses = 0;
    for (int step = 0; step < 400; ++step) {
      const int layer = step % layers;
      auto chosen = random_routing(1, 2, experts, rng);
      // Skewed routing so hits happen: half the steps reuse experts 0 and 1.
      if (step % 2) chosen = {int32_t(step % 4 < 2 ? 0 : 1), 5};
      std::vector<int> req(chosen.begin(), chosen.end());
      // The brute model processes the step's experts in order, with the first of the step protected
      // from eviction by the second: equal to LRU since the first was just used.
      const auto got = cache.acquire(layer, req);
      ASSERT_EQ(got.size(), req.size());
      for (size_t i = 0; i < req.size(); ++i) {
        const bool hit = brute.touch(layer, req[i]);
        EXPECT_EQ(!got[i].copy, hit) << "capacity " << capacity << " step " << step;
        (hit ? hits : misses) += 1;
        EXPECT_EQ(cache.slot_of(layer, req[i]), got[i].slot);
      }
      EXPECT_NE(got[0].slot, got[1].slot);
      cache.end_step(layer);
      // Residency agrees with the brute model.
      for (int e = 0; e < experts; ++e) {
        const auto& l = brute.lists[layer];
        EXPECT_EQ(cache.slot_of(layer, e).has_value(), std::find(l.begin(), l.end(), e) != l.end());
      }
    }
    EXPECT_EQ(cache.stats().hits, hits);
    EXPECT_EQ(cache.stats().misses, misses);
    EXPECT_EQ(cache.stats().bytes_copied, misses * 1000);
  }
}

TEST(CudaHostExpertCache, FullCapacityMissesOnlyOnFirstUse) {
  ExpertCachePolicy cache(2, 8, 8, 1);
  std::mt19937 rng(3);
  std::set<std::pair<int, int>> used;
  for (int step = 0; step < 200; ++step) {
    const int layer = step % 2;
    const auto chosen = random_routing(1, 2, 8, rng);
    std::vector<int> req(chosen.begin(), chosen.end());
    for (const auto& r : cache.acquire(layer, req)) EXPECT_EQ(r.copy, used.insert({layer, r.expert}).second);
    cache.end_step(layer);
  }
  EXPECT_EQ(cache.stats().misses, int64_t(used.size()));
}

TEST(CudaHostExpertCache, PinnedExpertsAreNotEvictedAndPrefetchCounts) {
  ExpertCachePolicy cache(1, 8, 2, 10);
  const std::vector<int> a = {0, 1};
  cache.acquire(0, a);
  // Both slots pinned by this step: prefetch has nothing to evict.
  const std::vector<float> probs = {0, 0, 0, 0, 0, 0, 0.9f, 0.1f};
  EXPECT_TRUE(cache.prefetch(0, probs, 2).empty());
  const std::vector<int> three = {2, 3, 4};
  EXPECT_THROW(cache.acquire(0, three), Error);
  cache.end_step(0);
  // Prefetch brings 6 and 7 (the two most probable) into the two slots.
  const auto pf = cache.prefetch(0, probs, 2);
  ASSERT_EQ(pf.size(), 2u);
  EXPECT_EQ(pf[0].expert, 6);
  EXPECT_EQ(pf[1].expert, 7);
  EXPECT_TRUE(pf[0].copy && pf[1].copy);
  const std::vector<int> b = {6, 7};
  for (const auto& r : cache.acquire(0, b)) EXPECT_FALSE(r.copy);
  cache.end_step(0);
  EXPECT_EQ(cache.stats().prefetches, 2);
  EXPECT_EQ(cache.stats().prefetch_hits, 2);
  EXPECT_EQ(cache.stats().misses, 2);
  EXPECT_EQ(cache.stats().bytes_copied, 40);
  EXPECT_DOUBLE_EQ(cache.stats().hit_rate(), 0.5);
  EXPECT_THROW(ExpertCachePolicy(1, 8, 0, 1), Error);
  EXPECT_THROW(ExpertCachePolicy(1, 8, 9, 1), Error);
}

TEST(CudaHostArena, RegionsAlignedDisjointAndSized) {
  WeightArena arena;
  // Mixtral-8x7B shapes (formats.md 3.4 gives packed bytes and block counts) plus a small fixture one.
  const int q = arena.add("q_proj", 4096, 4096);
  const int k = arena.add("k_proj", 1024, 4096);
  const int w2 = arena.add("w2", 4096, 14336);
  const int g = arena.add("gate", 8, 4096);
  const int tiny = arena.add("tiny", 3, 32);
  const int64_t norm = arena.add_raw(4096 * 4);
  EXPECT_EQ(arena.region(q).codes_bytes, 8388608);
  EXPECT_EQ(arena.region(q).absmax_count, 262144);
  EXPECT_EQ(arena.region(k).codes_bytes, 2097152);
  EXPECT_EQ(arena.region(w2).codes_bytes, 29360128);
  EXPECT_EQ(arena.region(w2).absmax_count, 917504);
  EXPECT_EQ(arena.region(g).absmax_count, 512);
  EXPECT_EQ(arena.region(tiny).codes_bytes, 48);
  EXPECT_EQ(arena.region(tiny).absmax_count, 2);  // 96 values: one full block and one partial
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (const auto& r : arena.regions()) {
    EXPECT_EQ(r.codes_offset % kArenaAlign, 0);
    EXPECT_EQ(r.absmax_offset % kArenaAlign, 0);
    spans.push_back({r.codes_offset, r.codes_offset + r.codes_bytes});
    spans.push_back({r.absmax_offset, r.absmax_offset + r.absmax_count * 4});
  }
  EXPECT_EQ(norm % kArenaAlign, 0);
  spans.push_back({norm, norm + 4096 * 4});
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) EXPECT_LE(spans[i - 1].second, spans[i].first);
  EXPECT_EQ(arena.bytes(), spans.back().second);
  EXPECT_THROW(arena.add("odd", 4, 48), Error);
}

TEST(CudaHostTiles, BandsCoverRowsOnceWithinScratch) {
  for (int64_t rows : {1, 8, 63, 64, 65, 1024, 14336}) {
    for (int64_t cols : {64, 4096, 14336}) {
      for (int64_t scratch : {int64_t(64) * 14336, int64_t(1) << 22, int64_t(1) << 26}) {
        const auto bands = plan_row_bands(rows, cols, scratch);
        int64_t next = 0;
        for (size_t i = 0; i < bands.size(); ++i) {
          EXPECT_EQ(bands[i].row_begin, next);
          EXPECT_GT(bands[i].rows, 0);
          EXPECT_LE(bands[i].rows * cols, scratch);
          if (i + 1 < bands.size()) {
            EXPECT_EQ(bands[i].rows % 64, 0);
          }
          next += bands[i].rows;
        }
        EXPECT_EQ(next, rows);
        // As few bands as the scratch allows: the largest multiple of 64 rows that fits.
        const int64_t band = std::max<int64_t>(std::min<int64_t>(rows, 64), scratch / cols / 64 * 64);
        EXPECT_EQ(int64_t(bands.size()), (rows + band - 1) / band);
      }
    }
  }
  EXPECT_THROW(plan_row_bands(128, 4096, 4096 * 63), Error);
  EXPECT_NO_THROW(plan_row_bands(8, 4096, 4096 * 8));
}

// The device's code table is optimized/nf4's (kernels.cu initializes it from nf4::kCodeValues, the one
// table); what is left to check on the host is that the nibble order decodes what quantize_nf4 packed.
TEST(CudaHostCodeTable, PackingDecodesWhatQuantizeNf4Packed) {
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> w(2 * 64 + 32);
  for (auto& x : w) x = d(rng);
  const auto q = nf4::quantize_nf4(w.data(), int64_t(w.size()), 64, /*double_quant=*/false);
  const auto deq = nf4::dequantize(q);
  for (size_t i = 0; i < w.size(); ++i)
    EXPECT_EQ(nf4::kCodeValues[nf4_code_at(q.packed.data(), (long long)i)] * q.absmax[i / 64], deq[i]) << i;
}

// `--engine cuda-nf4` where it cannot run (this CI: no GPU, or a build without nvcc) ends with one
// clear error line, never a crash; where a GPU is present the command succeeds.
TEST(CudaHostCli, EngineWithoutDeviceIsAClearError) {
  namespace fs = std::filesystem;
  const fs::path err = fs::temp_directory_path() / ("moelab-cuda-cli-" + std::to_string(::getpid()) + ".txt");
  const fs::path dump = fs::temp_directory_path() / ("moelab-cuda-cli-" + std::to_string(::getpid()) + ".safetensors");
  const std::string cmd = std::string(MOELAB_BIN) + " forward --model " + MOELAB_FIXTURES +
                          "/models/mixtral-4e-gqa-f32 --engine cuda-nf4 --prompt hi --output " + dump.string() +
                          " >/dev/null 2>" + err.string();
  const int status = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(status)) << "moelab did not exit normally (crashed?)";
  std::ifstream in(err);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  fs::remove(err);
  fs::remove(dump);
  if (WEXITSTATUS(status) == 0) GTEST_SKIP() << "cuda-nf4 ran: a CUDA device is present";
  EXPECT_TRUE(text.find("cuda-nf4: no CUDA device found") != std::string::npos ||
              text.find("cuda-nf4: this moelab was built without CUDA") != std::string::npos)
      << text;
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 1) << text;
}

}  // namespace
}  // namespace moelab::cuda
