#pragma once
// Bookkeeping of the cuda-nf4 attention kernels (host-callable, no CUDA; tested in CI).
//
// Decode (a few queries over a long KV cache) splits the visible keys into chunks, one thread block
// each, so that even one query keeps every multiprocessor busy (flash-decoding); a second kernel merges
// the chunks' partial softmax statistics. Prefill walks key tiles with an online softmax and skips the
// tiles a query tile cannot see (causal and sliding-window masks).
#include <cstdint>

namespace moelab::cuda {

// The first key a query at `position` sees: 0 without a window, else position - window + 1 (keys in
// (p - window, p], as transformers' Mistral/Mixtral sliding window), never below 0.
int first_visible_key(int position, int window);

struct KvSplitPlan {
  int first_key = 0;      // the first key any of the queries sees
  int keys = 0;           // the span [first_key, first_key + keys) the splits cover
  int splits = 1;         // blocks per (query, head)
  int keys_per_split = 0; // a multiple of kSplitAlign; the last split may hold fewer (never none)
};

inline constexpr int kSplitAlign = 32;      // whole warps of keys per split
inline constexpr int kMinKeysPerSplit = 64; // below this a split's fixed cost outweighs its work
inline constexpr int kMaxSplits = 64;

// The split of the keys that queries at positions start .. start + n - 1 see, for `blocks` = n * heads
// independent (query, head) pairs on a device with `sm_count` multiprocessors: enough splits to give
// every multiprocessor two blocks, none shorter than kMinKeysPerSplit keys, at most kMaxSplits.
KvSplitPlan plan_kv_splits(int n, int start, int window, int heads, int sm_count);

// Floats of workspace the decode path needs: per (query, head, split) a running max, a sum and
// head_dim partial outputs.
int64_t attention_workspace_floats(const KvSplitPlan& plan, int n, int heads, int head_dim);

// Queries per block of the prefill kernel (one warp each) and keys per shared-memory tile.
inline constexpr int kPrefillQueries = 8;
inline constexpr int kPrefillKeys = 16;

// The key tiles [begin, end) (in units of kPrefillKeys, absolute positions / kPrefillKeys) that the
// prefill query tile holding queries t0 .. t0 + count - 1 (positions start + t) must visit: every tile
// one of its queries sees at least one key of, and no other.
struct TileRange {
  int begin = 0, end = 0;
};
TileRange prefill_key_tiles(int start, int t0, int count, int window);

}  // namespace moelab::cuda
