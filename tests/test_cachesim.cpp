// The expert-cache simulator (analysis/cachesim.hpp) against figures derived here, never copied from its
// output: brute-force LRU and FIFO, an exhaustive search for the optimum Belady must equal, "no policy beats
// Belady" over many random traces, exact hit rates of uniform random routing (top-1 by a symmetry
// argument, top-2 by an exact Markov chain and one case by hand), a repeated pair, hand-worked batches and
// prefetch guesses, the cuda-nf4 policy object replayed as the engine drives it, expert sizes, option
// parsing; and `moelab cachesim` through the real binary, bad inputs included.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include <hdf5.h>

#include <filesystem>
#include <fstream>

#include "analysis/cachesim.hpp"
#include "analysis/cachesim_figure.hpp"
#include "analysis/cachesim_time.hpp"
#include "analysis/forward_record.hpp"
#include "analysis/trace.hpp"
#include "analysis/trace_stream.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/model_presets.hpp"
#include "optimized/cuda/expert_cache_policy.hpp"
#include "process_util.hpp"
#include "reference/model.hpp"

namespace moelab::test {
namespace {

using analysis::CacheSimOptions;
using analysis::CacheSimReport;
using analysis::TraceData;
namespace cachesim = analysis::cachesim;
using cachesim::LayerCounts;
using cachesim::Policy;

// routes[s][t][l]: sequence s, token t, layer l: the token's top-k (rank order).
using Routes = std::vector<std::vector<std::vector<std::vector<int>>>>;

TraceData to_trace(int layers, int k, int experts, const Routes& seqs) {
  TraceData tr;
  tr.num_layers = layers;
  tr.top_k = k;
  tr.num_experts = experts;
  tr.sequence_offsets = {0};
  for (const auto& seq : seqs) {
    for (const auto& tok : seq) {
      tr.tokens.push_back(int32_t(tr.tokens.size() % 1000));
      for (const auto& r : tok)
        for (int e : r) tr.experts.push_back(uint8_t(e)), tr.gates.push_back(1.0f / float(k));
    }
    tr.sequence_offsets.push_back(int64_t(tr.tokens.size()));
    tr.sequence_domain.push_back(-1);
  }
  return tr;
}

// Random prefetch guesses (a k-subset per token and layer >= 1; 255 at layer 0), as a trace records them.
void add_random_guesses(TraceData& tr, std::mt19937_64& rng) {
  tr.prefetch_guess.assign(tr.experts.size(), 255);
  std::vector<int> ids(static_cast<size_t>(tr.num_experts));
  for (int64_t t = 0; t < tr.num_tokens(); ++t)
    for (int l = 1; l < tr.num_layers; ++l) {
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      for (int j = 0; j < tr.top_k; ++j)
        tr.prefetch_guess[size_t((t * tr.num_layers + l) * tr.top_k + j)] = uint8_t(ids[size_t(j)]);
    }
}

// A uniformly random k-subset per token and layer, in random rank order.
Routes random_routes(std::mt19937_64& rng, int layers, int k, int experts, int sequences, int max_len) {
  Routes seqs(static_cast<size_t>(sequences));
  std::vector<int> ids(static_cast<size_t>(experts));
  for (auto& seq : seqs) {
    const int n = int(rng() % uint64_t(max_len + 1));
    for (int t = 0; t < n; ++t) {
      std::vector<std::vector<int>> tok;
      for (int l = 0; l < layers; ++l) {
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        tok.emplace_back(ids.begin(), ids.begin() + k);
      }
      seq.push_back(tok);
    }
  }
  return seqs;
}

// Skewed routing (a few popular experts), where policies differ more than under uniform routing.
Routes skewed_routes(std::mt19937_64& rng, int layers, int k, int experts, int sequences, int max_len) {
  Routes seqs(static_cast<size_t>(sequences));
  std::vector<double> w(static_cast<size_t>(experts));
  for (int e = 0; e < experts; ++e) w[size_t(e)] = 1.0 / double(1 + e * e);
  for (auto& seq : seqs) {
    const int n = int(rng() % uint64_t(max_len + 1));
    for (int t = 0; t < n; ++t) {
      std::vector<std::vector<int>> tok;
      for (int l = 0; l < layers; ++l) {
        std::vector<int> chosen;
        while (int(chosen.size()) < k) {
          std::discrete_distribution<int> d(w.begin(), w.end());
          const int e = d(rng);
          if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
        }
        tok.push_back(chosen);
      }
      seq.push_back(tok);
    }
  }
  return seqs;
}

// The steps as docs/cachesim.md defines them, written here independently of the simulator: batches of B
// sequences in file order; step i of a batch needs, per layer, the union of the experts of token i of
// every sequence still running; a step is scored when its lowest token index in the stream is at least
// the calibration count.
struct Steps {
  std::vector<std::vector<uint32_t>> need;  // [step][layer] bit mask (experts < 32)
  std::vector<bool> scored;
  std::vector<int> tokens;
};
Steps steps_of(const Routes& seqs, int layers, int batch, int64_t calibration) {
  Steps st;
  int64_t base = 0;
  for (size_t b0 = 0; b0 < seqs.size(); b0 += size_t(batch)) {
    const size_t b1 = std::min(seqs.size(), b0 + size_t(batch));
    size_t longest = 0;
    std::vector<int64_t> first(b1 - b0);
    int64_t at = base;
    for (size_t s = b0; s < b1; ++s) first[s - b0] = at, at += int64_t(seqs[s].size()), longest = std::max(longest, seqs[s].size());
    for (size_t i = 0; i < longest; ++i) {
      std::vector<uint32_t> need(size_t(layers), 0);
      int64_t lowest = -1;
      int tokens = 0;
      for (size_t s = b0; s < b1; ++s) {
        if (seqs[s].size() <= i) continue;
        if (lowest < 0) lowest = first[s - b0] + int64_t(i);
        ++tokens;
        for (int l = 0; l < layers; ++l)
          for (int e : seqs[s][i][size_t(l)]) need[size_t(l)] |= 1u << e;
      }
      st.need.push_back(need);
      st.scored.push_back(lowest >= calibration);
      st.tokens.push_back(tokens);
    }
    base = at;
  }
  return st;
}

std::vector<int> ids_of(uint32_t mask) {
  std::vector<int> out;
  for (int e = 0; e < 32; ++e)
    if (mask >> e & 1) out.push_back(e);
  return out;
}

// Textbook LRU over the step's experts in ascending id: a recency list, evicting its back. (The engine's
// pins never bind in LRU: the experts a round pinned were just used, so they sit at the front.)
int64_t brute_lru_hits(const Steps& st, int layer, int capacity) {
  std::vector<int> list;  // front = most recent
  int64_t hits = 0;
  for (size_t t = 0; t < st.need.size(); ++t)
    for (int e : ids_of(st.need[t][size_t(layer)])) {
      const auto it = std::find(list.begin(), list.end(), e);
      if (it != list.end()) {
        hits += st.scored[t];
        list.erase(it);
      } else if (int(list.size()) == capacity) {
        list.pop_back();
      }
      list.insert(list.begin(), e);
    }
  return hits;
}

// FIFO with the engine's rounds: rounds of at most C experts in ascending id; a miss evicts the oldest
// load among the experts the round has not acquired yet.
int64_t brute_fifo_hits(const Steps& st, int layer, int capacity) {
  std::vector<int> queue;  // front = oldest load
  int64_t hits = 0;
  for (size_t t = 0; t < st.need.size(); ++t) {
    const auto ids = ids_of(st.need[t][size_t(layer)]);
    for (size_t r0 = 0; r0 < ids.size(); r0 += size_t(capacity)) {
      std::vector<int> pinned;
      for (size_t i = r0; i < std::min(ids.size(), r0 + size_t(capacity)); ++i) {
        const int e = ids[i];
        if (std::find(queue.begin(), queue.end(), e) != queue.end()) {
          hits += st.scored[t];
        } else {
          if (int(queue.size()) == capacity)
            queue.erase(std::find_if(queue.begin(), queue.end(), [&](int x) {
              return std::find(pinned.begin(), pinned.end(), x) == pinned.end();
            }));
          queue.push_back(e);
        }
        pinned.push_back(e);
      }
    }
  }
  return hits;
}

// The fewest scored misses any policy can have at one layer: every choice of what to hold after each step
// (any subset of what was held and what the step used, at most C experts), searched exhaustively.
int64_t optimal_misses(const Steps& st, int layer, int capacity) {
  std::map<uint32_t, int64_t> states{{0u, 0}};
  for (size_t t = 0; t < st.need.size(); ++t) {
    const uint32_t need = st.need[t][size_t(layer)];
    std::map<uint32_t, int64_t> next;
    for (const auto& [held, cost] : states) {
      const int64_t c = cost + (st.scored[t] ? std::popcount(need & ~held) : 0);
      const uint32_t pool = held | need;
      for (uint32_t sub = pool;; sub = (sub - 1) & pool) {  // every subset of the pool
        if (std::popcount(sub) <= capacity) {
          auto [it, fresh] = next.try_emplace(sub, c);
          if (!fresh) it->second = std::min(it->second, c);
        }
        if (sub == 0) break;
      }
    }
    states = std::move(next);
  }
  int64_t best = INT64_MAX;
  for (const auto& [held, cost] : states) best = std::min(best, cost);
  return best;
}

CacheSimReport run(const TraceData& tr, std::vector<Policy> policies, std::vector<int> sizes, int batch = 1,
                   int64_t calibration = 0) {
  const auto src = analysis::memory_routing_source(tr);
  CacheSimOptions o;
  o.policies = std::move(policies);
  o.cache_sizes = std::move(sizes);
  o.batch = batch;
  o.calibrate.tokens = calibration;
  return analysis::simulate_cache({src.get()}, o);
}

LayerCounts counts(const CacheSimReport& r, Policy p, int c, int layer = -1) {
  const auto* res = r.find(p, c);
  EXPECT_NE(res, nullptr) << cachesim::policy_name(p) << " C=" << c;
  if (!res) return {};
  return layer < 0 ? res->total() : res->layers[size_t(layer)];
}

TEST(CacheSim, LruAndFifoEqualBruteForceOnRandomTraces) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 60; ++trial) {
    const int E = 3 + int(rng() % 6), k = 1 + int(rng() % std::min(3, E)), L = 1 + int(rng() % 3);
    const int B = 1 + int(rng() % 3);
    const auto seqs = trial % 2 ? random_routes(rng, L, k, E, 1 + int(rng() % 5), 30)
                                : skewed_routes(rng, L, k, E, 1 + int(rng() % 5), 30);
    const auto tr = to_trace(L, k, E, seqs);
    if (tr.num_tokens() == 0) continue;
    const int64_t calibration = int64_t(rng() % uint64_t(tr.num_tokens()));
    std::vector<int> sizes(static_cast<size_t>(E));
    std::iota(sizes.begin(), sizes.end(), 1);
    const auto r = run(tr, {Policy::Lru, Policy::Fifo}, sizes, B, calibration);
    const auto st = steps_of(seqs, L, B, calibration);
    for (int c = 1; c <= E; ++c)
      for (int l = 0; l < L; ++l) {
        EXPECT_EQ(counts(r, Policy::Lru, c, l).hits, brute_lru_hits(st, l, c)) << "trial " << trial << " C=" << c;
        EXPECT_EQ(counts(r, Policy::Fifo, c, l).hits, brute_fifo_hits(st, l, c)) << "trial " << trial << " C=" << c;
      }
  }
}

TEST(CacheSim, BeladyEqualsTheExhaustiveOptimum) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 80; ++trial) {
    const int E = 3 + int(rng() % 4), k = 1 + int(rng() % 2), L = 1 + int(rng() % 2), B = 1 + int(rng() % 2);
    const auto seqs = trial % 2 ? random_routes(rng, L, k, E, 1 + int(rng() % 3), 14)
                                : skewed_routes(rng, L, k, E, 1 + int(rng() % 3), 14);
    const auto tr = to_trace(L, k, E, seqs);
    if (tr.num_tokens() == 0) continue;
    const int64_t calibration = trial % 3 == 0 ? int64_t(rng() % uint64_t(tr.num_tokens())) : 0;  // with a warm-up too
    std::vector<int> sizes(static_cast<size_t>(E));
    std::iota(sizes.begin(), sizes.end(), 1);
    const auto r = run(tr, {Policy::Belady}, sizes, B, calibration);
    EXPECT_EQ(r.belady_undecided, 0);  // the window holds the whole trace: exact
    const auto st = steps_of(seqs, L, B, calibration);
    for (int c = 1; c <= E; ++c)
      for (int l = 0; l < L; ++l)
        EXPECT_EQ(counts(r, Policy::Belady, c, l).misses, optimal_misses(st, l, c)) << "trial " << trial << " C=" << c;
  }
}

TEST(CacheSim, NoPolicyBeatsBeladyOnRandomTraces) {
  std::mt19937_64 rng(13);
  int compared = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int E = 2 + int(rng() % 9), k = 1 + int(rng() % std::min(3, E)), L = 1 + int(rng() % 2);
    const int B = 1 + int(rng() % 4);
    const auto seqs = trial % 2 ? random_routes(rng, L, k, E, 1 + int(rng() % 6), 40)
                                : skewed_routes(rng, L, k, E, 1 + int(rng() % 6), 40);
    auto tr = to_trace(L, k, E, seqs);
    if (tr.num_tokens() < 2) continue;
    add_random_guesses(tr, rng);  // for next-layer-gate
    const int64_t calibration = 1 + int64_t(rng() % uint64_t(tr.num_tokens() - 1));  // static needs some
    std::vector<int> sizes(static_cast<size_t>(E));
    std::iota(sizes.begin(), sizes.end(), 1);
    const auto r = run(tr, cachesim::all_policies(), sizes, B, calibration);
    // Without a warm-up (static needs one, so it is left out there): every policy copies at least as many
    // experts as Belady misses, since a prefetch can be put off to the step that uses the expert without
    // copying more. (During a warm-up prefetches are free, so there a prefetcher may copy less in the scored
    // steps.)
    std::vector<Policy> no_static;
    for (Policy p : cachesim::all_policies())
      if (p != Policy::Static) no_static.push_back(p);
    const auto cold = run(tr, no_static, sizes, B, 0);
    for (int c = 1; c <= E; ++c)
      for (int l = 0; l < L; ++l) {
        const auto best = counts(r, Policy::Belady, c, l), cold_best = counts(cold, Policy::Belady, c, l);
        for (Policy p : cachesim::all_policies()) {
          const auto got = counts(r, p, c, l);
          EXPECT_EQ(got.requests, best.requests);
          // A policy that copies only on demand never hits more often than Belady.
          if (!cachesim::is_prefetch_policy(p))
            EXPECT_LE(got.hits, best.hits) << cachesim::policy_name(p) << " beats belady: trial " << trial << " C=" << c;
          if (p != Policy::Static)
            EXPECT_GE(counts(cold, p, c, l).copies(), cold_best.misses)
                << cachesim::policy_name(p) << " copies less: trial " << trial << " C=" << c;
          ++compared;
        }
      }
  }
  EXPECT_GT(compared, 5000);
}

// Uniform random top-1: with a full cache K (after the warm-up) and a request independent of K, the hit
// probability is Σ_x P(x ∈ K) P(request = x) = (1/E) Σ_x P(x ∈ K) = C/E, for every policy that keeps C.
// Checked on 30 independent traces: |mean − C/E| within 5 standard errors of the 30 rates.
TEST(CacheSim, UniformTop1HitRateIsCOverE) {
  const int E = 8, traces = 30, n = 6000;
  std::mt19937_64 rng(17);
  std::map<std::pair<Policy, int>, std::vector<double>> rates;
  const std::vector<Policy> policies{Policy::Lru, Policy::Fifo, Policy::Lfu, Policy::LfuAged};
  for (int i = 0; i < traces; ++i) {
    Routes seqs(1);
    std::uniform_int_distribution<int> pick(0, E - 1);
    for (int t = 0; t < n; ++t) seqs[0].push_back({{pick(rng)}, {pick(rng)}});
    const auto r = run(to_trace(2, 1, E, seqs), policies, {1, 2, 3, 4, 5, 6, 7, 8}, 1, 100);
    for (Policy p : policies)
      for (int c = 1; c <= E; ++c) {
        const auto t = counts(r, p, c);
        rates[{p, c}].push_back(double(t.hits) / double(t.requests));
      }
  }
  for (const auto& [key, v] : rates) {
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
    double var = 0;
    for (double x : v) var += (x - mean) * (x - mean);
    const double se = std::sqrt(var / double(v.size() - 1) / double(v.size()));
    const double expected = double(key.second) / E;
    EXPECT_NEAR(mean, expected, 5 * se + 1e-12) << cachesim::policy_name(key.first) << " C=" << key.second;
  }
}

// The exact stationary hit rate of LRU or FIFO, as the engine runs them, under uniform random top-2 of E:
// a Markov chain on the cache's ordered contents (recency order for LRU, load order for FIFO); each step
// draws one of the C(E,2) pairs uniformly, takes it in ascending id, in rounds of at most C, and a miss
// evicts the oldest expert the round has not acquired yet.
double markov_top2_hit_rate(int E, int C, bool fifo) {
  std::vector<std::pair<int, int>> pairs;
  for (int a = 0; a < E; ++a)
    for (int b = a + 1; b < E; ++b) pairs.push_back({a, b});
  std::map<std::vector<int>, int> index;
  std::vector<std::vector<int>> states;
  std::vector<std::vector<int>> next;   // [state][pair] -> state
  std::vector<std::vector<int>> hits;   // [state][pair] -> hits
  const auto id = [&](const std::vector<int>& s) {
    auto [it, fresh] = index.try_emplace(s, int(states.size()));
    if (fresh) states.push_back(s);
    return it->second;
  };
  id({});
  for (size_t i = 0; i < states.size(); ++i) {
    std::vector<int> to, h;
    for (const auto& [a, b] : pairs) {
      std::vector<int> s = states[i];  // front = newest (most recent, or latest load)
      int got = 0;
      const std::vector<int> req{a, b};
      for (size_t r0 = 0; r0 < req.size(); r0 += size_t(C)) {
        std::vector<int> pinned;
        for (size_t j = r0; j < std::min(req.size(), r0 + size_t(C)); ++j) {
          const int e = req[j];
          const auto it = std::find(s.begin(), s.end(), e);
          if (it != s.end()) {
            ++got;
            if (!fifo) s.erase(it), s.insert(s.begin(), e);
          } else {
            if (int(s.size()) == C)
              for (int x = int(s.size()) - 1; x >= 0; --x)
                if (std::find(pinned.begin(), pinned.end(), s[size_t(x)]) == pinned.end()) {
                  s.erase(s.begin() + x);
                  break;
                }
            s.insert(s.begin(), e);
          }
          pinned.push_back(e);
        }
      }
      to.push_back(id(s));
      h.push_back(got);
    }
    next.push_back(to);
    hits.push_back(h);
  }
  std::vector<double> p(states.size(), 0.0), q(states.size());
  p[0] = 1;
  for (int it = 0; it < 5000; ++it) {
    std::fill(q.begin(), q.end(), 0.0);
    for (size_t i = 0; i < states.size(); ++i)
      for (size_t j = 0; j < pairs.size(); ++j) q[size_t(next[i][j])] += p[i] / double(pairs.size());
    double change = 0;
    for (size_t i = 0; i < states.size(); ++i) change += std::abs(q[i] - p[i]);
    std::swap(p, q);
    if (change < 1e-13) break;
  }
  double expected_hits = 0;
  for (size_t i = 0; i < states.size(); ++i)
    for (size_t j = 0; j < pairs.size(); ++j) expected_hits += p[i] * hits[i][j] / double(pairs.size());
  return expected_hits / 2;
}

// Uniform random top-2 of 8 is NOT C/E under the engine's order of work: when the lower-id expert of a
// step misses, it may evict the other one (the LRU or oldest), which then misses too; and taking experts in
// ascending id makes higher ids more recent, so the one evicted is not a uniformly random one. By hand for
// C = 1: the slot holds the higher id m of the previous pair (P(m) = m/28, m = 1..7) and the next step hits
// only when m is the lower id of its pair (P = (7 − m)/28): Σ m(7 − m)/784 = 1/14 hits a step, a hit rate
// of 1/28 (not 1/8). For every C the exact chain above gives the figure; the simulator's mean over 30
// independent traces must be within 5 standard errors of it.
TEST(CacheSim, UniformTop2MatchesTheExactMarkovChain) {
  const int E = 8, traces = 30, n = 6000;
  EXPECT_NEAR(markov_top2_hit_rate(E, 1, false), 1.0 / 28, 1e-12);
  EXPECT_NEAR(markov_top2_hit_rate(E, 1, true), 1.0 / 28, 1e-12);
  std::map<std::pair<Policy, int>, double> exact;
  for (int c = 1; c <= 5; ++c) {  // C = 6 and 7 have 20160 and 40320 ordered states: slow for a unit test
    exact[{Policy::Lru, c}] = markov_top2_hit_rate(E, c, false);
    exact[{Policy::Fifo, c}] = markov_top2_hit_rate(E, c, true);
  }
  // Below C/E for 1 < C < E: the evict-the-partner effect.
  for (const auto& [key, v] : exact) {
    if (key.second > 1) EXPECT_LT(v, double(key.second) / E) << cachesim::policy_name(key.first);
  }
  std::mt19937_64 rng(19);
  std::map<std::pair<Policy, int>, std::vector<double>> rates;
  for (int i = 0; i < traces; ++i) {
    Routes one(1);
    std::vector<int> ids(static_cast<size_t>(E));
    for (int t = 0; t < n; ++t) {
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      one[0].push_back({{ids[0], ids[1]}});
    }
    const auto r = run(to_trace(1, 2, E, one), {Policy::Lru, Policy::Fifo}, {1, 2, 3, 4, 5}, 1, 200);
    for (const auto& [key, v] : exact) {
      const auto t = counts(r, key.first, key.second);
      rates[key].push_back(double(t.hits) / double(t.requests));
    }
  }
  for (const auto& [key, v] : rates) {
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
    double var = 0;
    for (double x : v) var += (x - mean) * (x - mean);
    const double se = std::sqrt(var / double(v.size() - 1) / double(v.size()));
    EXPECT_NEAR(mean, exact[key], 5 * se + 1e-12) << cachesim::policy_name(key.first) << " C=" << key.second
                                                  << " (C/E = " << double(key.second) / E << ")";
  }
}

// Every token of every layer chooses experts 3 and 5. After the first token (the warm-up: --calibrate 1),
// every policy with C >= 2 hits every request. With C = 1 the engine's rounds load 3, then 5, every step:
// lru, lfu, lfu-aged and fifo never hit; Belady keeps one of the two (one hit a step); static keeps the
// lower id of the tie, 3 (one hit a step); prefetch-prev prefetches the lower id of its guess {3, 5}, 3,
// over the 5 the step left (one copy a step), which then hits (one hit a step); next-layer-gate, whose
// recorded guess is {3, 5} at every layer but the first (which has none), does the same at layers 1 and 2
// and what lru does at layer 0.
TEST(CacheSim, RepeatedPairHitsEverythingAfterWarmUp) {
  const int L = 3, E = 8, N = 50;
  for (int batch : {1, 2}) {
    Routes seqs(3);
    for (auto& s : seqs)
      for (int t = 0; t < N; ++t) s.push_back(std::vector<std::vector<int>>(size_t(L), std::vector<int>{5, 3}));
    auto tr = to_trace(L, 2, E, seqs);
    tr.prefetch_guess = tr.experts;
    for (int64_t t = 0; t < tr.num_tokens(); ++t) tr.prefetch_guess[size_t(t * L * 2)] = tr.prefetch_guess[size_t(t * L * 2 + 1)] = 255;
    const auto r = run(tr, cachesim::all_policies(), {1, 2, 3, 8}, batch, 1);
    const int64_t steps = batch == 1 ? 3 * N - 1 : 2 * N - 1;  // batch 2: sequences {0,1} then {2}
    for (Policy p : cachesim::all_policies()) {
      for (int c : {2, 3, 8}) {
        const auto t = counts(r, p, c);
        EXPECT_EQ(t.steps, steps * L);
        EXPECT_EQ(t.requests, 2 * steps * L);
        EXPECT_EQ(t.hits, t.requests) << cachesim::policy_name(p) << " C=" << c;
        EXPECT_EQ(t.misses, 0);
      }
      const auto one = counts(r, p, 1);
      if (p == Policy::NextLayerGate) {
        EXPECT_EQ(one.hits, steps * (L - 1));
        EXPECT_EQ(one.misses, 2 * steps + steps * (L - 1));
        EXPECT_EQ(one.prefetch_copies, steps * (L - 1));
        EXPECT_EQ(one.prefetch_hits, steps * (L - 1));
        continue;
      }
      const bool keeps_one = p == Policy::Belady || p == Policy::Static || p == Policy::PrefetchPrev;
      EXPECT_EQ(one.hits, keeps_one ? steps * L : 0) << cachesim::policy_name(p);
      EXPECT_EQ(one.misses, keeps_one ? steps * L : 2 * steps * L) << cachesim::policy_name(p);
      EXPECT_EQ(one.prefetch_copies, p == Policy::PrefetchPrev ? steps * L : 0) << cachesim::policy_name(p);
      EXPECT_EQ(one.prefetch_hits, p == Policy::PrefetchPrev ? steps * L : 0) << cachesim::policy_name(p);
    }
  }
}

// Batches by hand: sequences A = 0 1 2 and B = 3 4 (top-1, one layer) decoded together need {0,3}, {1,4},
// {2}: 5 requests in 3 steps, 5 tokens, all misses with room for every expert.
TEST(CacheSim, BatchStepsNeedTheUnionOfTheirTokensExperts) {
  Routes seqs{{{{0}}, {{1}}, {{2}}}, {{{3}}, {{4}}}};
  auto r = run(to_trace(1, 1, 8, seqs), {Policy::Lru}, {8}, 2);
  auto t = counts(r, Policy::Lru, 8);
  EXPECT_EQ(r.scored_tokens, 5);
  EXPECT_EQ(r.scored_steps, 3);
  EXPECT_EQ(t.steps, 3);
  EXPECT_EQ(t.requests, 5);
  EXPECT_EQ(t.misses, 5);
  // A = 0 0, B = 0 1: steps {0}, {0, 1}: 3 requests, 2 misses (0 once, 1 once).
  Routes shared{{{{0}}, {{0}}}, {{{0}}, {{1}}}};
  r = run(to_trace(1, 1, 8, shared), {Policy::Lru}, {8}, 2);
  t = counts(r, Policy::Lru, 8);
  EXPECT_EQ(t.requests, 3);
  EXPECT_EQ(t.misses, 2);
  EXPECT_EQ(t.hits, 1);
}

// prefetch-prev by hand (one layer, E = 4, top-2, C = 2): tokens {0,1} {0,1} {2,3} {2,3}. The guess is the
// previous step's experts: none at step 0; {0,1} at steps 1 and 2 (used at 1, not at 2); {2,3} at step 3
// (used). The guessed experts are always resident (just used), so nothing is copied: 4 hits, 4 misses;
// guessed 6, used 4, needed 6 by the guessed steps: precision 2/3, recall 2/3.
TEST(CacheSim, PrefetchPreviousTokensGuessesByHand) {
  Routes seqs{{{{0, 1}}, {{0, 1}}, {{2, 3}}, {{2, 3}}}};
  const auto r = run(to_trace(1, 2, 4, seqs), {Policy::PrefetchPrev}, {2});
  const auto t = counts(r, Policy::PrefetchPrev, 2);
  EXPECT_EQ(t.hits, 4);
  EXPECT_EQ(t.misses, 4);
  EXPECT_EQ(t.prefetch_copies, 0);
  EXPECT_EQ(t.guessed, 6);
  EXPECT_EQ(t.guess_used, 4);
  EXPECT_EQ(t.guess_needed, 6);
  const auto j = r.to_json();
  EXPECT_NEAR(j["results"][0]["prefetch"]["precision"].get<double>(), 2.0 / 3, 1e-15);
  EXPECT_NEAR(j["results"][0]["layers"][0]["prefetch"]["recall"].get<double>(), 2.0 / 3, 1e-15);
  EXPECT_TRUE(j["results"][0]["prefetch"].is_object());
}

// The simulator's lru IS the cuda-nf4 policy object: the same object, replayed here as
// optimized/cuda/moe_stage.cpp drives it (distinct experts in ascending id, rounds of at most C, acquire,
// then end_step; prefetch-prev: prefetch before the step), gives the simulator's hit and miss counts.
TEST(CacheSim, LruAndPrefetchEqualTheEnginePolicyReplayed) {
  std::mt19937_64 rng(23);
  for (int trial = 0; trial < 20; ++trial) {
    const int E = 8, k = 2, L = 3, B = 1 + trial % 3;
    const auto seqs = skewed_routes(rng, L, k, E, 4, 50);
    const auto tr = to_trace(L, k, E, seqs);
    if (tr.num_tokens() == 0) continue;
    const auto st = steps_of(seqs, L, B, 0);
    for (int c = 1; c <= E; ++c) {
      const auto r = run(tr, {Policy::Lru, Policy::PrefetchPrev}, {c}, B);
      for (bool prefetch : {false, true}) {
        cuda::ExpertCachePolicy engine(L, E, c, 1);
        std::vector<uint32_t> previous(size_t(L), 0);
        for (const auto& need : st.need)
          for (int l = 0; l < L; ++l) {
            if (prefetch && previous[size_t(l)]) {
              std::vector<float> probs(size_t(E), 0.0f);
              for (int e : ids_of(previous[size_t(l)])) probs[size_t(e)] = 1;
              engine.prefetch(l, probs, std::min(c, std::popcount(previous[size_t(l)])));
            }
            previous[size_t(l)] = need[size_t(l)];
            const auto ids = ids_of(need[size_t(l)]);
            for (size_t r0 = 0; r0 < ids.size(); r0 += size_t(c)) {
              const std::vector<int> round(ids.begin() + long(r0), ids.begin() + long(std::min(ids.size(), r0 + size_t(c))));
              engine.acquire(l, round);
              engine.end_step(l);
            }
          }
        const auto t = counts(r, prefetch ? Policy::PrefetchPrev : Policy::Lru, c);
        EXPECT_EQ(t.hits, engine.stats().hits + engine.stats().prefetch_hits) << "C=" << c;
        EXPECT_EQ(t.prefetch_hits, engine.stats().prefetch_hits);
        EXPECT_EQ(t.misses, engine.stats().misses);
        EXPECT_EQ(t.prefetch_copies, engine.stats().prefetches);
      }
    }
  }
}

// Mixtral-8x7B's expert: w1, w3 [14336, 4096] and w2 [4096, 14336], 58,720,256 weights each. NF4 as
// cuda-nf4 holds it: 4 bits a weight (29,360,128 bytes) + one FP32 absmax per 64 (917,504 × 4 =
// 3,670,016 bytes), each a multiple of 256: 3 × 33,030,144 = 99,090,432 bytes. BF16: 3 × 58,720,256 × 2.
TEST(CacheSim, ExpertBytesOfMixtral8x7B) {
  const auto b = analysis::expert_bytes_of({{"hidden_size", 4096}, {"intermediate_size", 14336}});
  EXPECT_EQ(b.nf4, 99090432);
  EXPECT_EQ(b.bf16, 352321536);
  EXPECT_FALSE(analysis::expert_bytes_of({{"hidden_size", 4096}}).known());
  EXPECT_FALSE(analysis::expert_bytes_of(nullptr).known());
  // The bundled model's shape (128 x 256): codes 16,384 + absmax 512 × 4 = 2,048 a matrix, each on 256 bytes.
  EXPECT_EQ(analysis::expert_bytes_of({{"hidden_size", 128}, {"intermediate_size", 256}}).nf4, 3 * (16384 + 2048));
}

TEST(CacheSim, OptionParsing) {
  EXPECT_EQ(analysis::parse_cache_sizes("1-8"), (std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(analysis::parse_cache_sizes("8,2,4,2"), (std::vector<int>{2, 4, 8}));
  EXPECT_EQ(analysis::parse_cache_sizes("1-3,8"), (std::vector<int>{1, 2, 3, 8}));
  for (const char* bad : {"", "a", "3-1", "1,,2", "-2", "1-"}) EXPECT_THROW(analysis::parse_cache_sizes(bad), Error) << bad;
  EXPECT_EQ(analysis::parse_calibration("4096").tokens, 4096);
  EXPECT_DOUBLE_EQ(analysis::parse_calibration("0.25").fraction, 0.25);
  EXPECT_DOUBLE_EQ(analysis::parse_calibration("10%").fraction, 0.10);
  EXPECT_EQ(analysis::parse_calibration("10%").resolve(1000), 100);
  for (const char* bad : {"", "x", "1.5", "-3", "100%", "5%%"}) EXPECT_THROW(analysis::parse_calibration(bad), Error) << bad;
  EXPECT_EQ(analysis::parse_policies("all").size(), cachesim::all_policies().size());
  EXPECT_EQ(analysis::parse_policies("lru,belady,lru"), (std::vector<Policy>{Policy::Lru, Policy::Belady}));
  EXPECT_THROW(analysis::parse_policies("lru,mru"), Error);
  for (Policy p : cachesim::all_policies()) {
    EXPECT_EQ(cachesim::parse_policy(cachesim::policy_name(p)), p);
    EXPECT_FALSE(cachesim::policy_description(p).empty());
  }
}

TEST(CacheSim, BadOptionsAreClearErrors) {
  Routes seqs{{{{0, 1}}, {{2, 3}}}};
  const auto tr = to_trace(1, 2, 4, seqs);
  const auto expect_error = [&](auto&& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error; expected " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { run(tr, {Policy::Lru}, {5}); }, "cache size 5 is outside 1..4");
  expect_error([&] { run(tr, {Policy::Lru}, {0}); }, "cache size 0 is outside 1..4");
  expect_error([&] { run(tr, {Policy::Static}, {2}); }, "static policy needs calibration tokens");
  expect_error([&] { run(tr, {Policy::Lru}, {2}, 1, 2); }, "nothing is left to score");
}

// The time model by hand on a one-layer "model" whose every figure is chosen round: an expert of b bytes,
// attention a, lm_head h; steps that use u experts with m misses. Each prediction is the formula of
// analysis/cachesim_time.hpp evaluated here on the simulated (u, m) of each step.
TEST(CacheSimTime, PredictionsFollowTheStatedFormula) {
  // Top-1 of 4, one layer: tokens 0 1 0 1 ... with C = 1: every step misses (u = 1, m = 1); with C = 2
  // none after the first two (which the warm-up takes).
  Routes seqs(1);
  for (int t = 0; t < 100; ++t) seqs[0].push_back({{t % 2}});
  const auto r = run(to_trace(1, 1, 4, seqs), {Policy::Lru}, {1, 2}, 1, 2);
  analysis::TimeModelParams p;
  p.model = model_preset("mixtral-8x7b");
  p.gpu_gb_per_s = 1000;
  p.link = analysis::parse_link("pcie4-x16");
  p.context = 1;
  for (bool overlap : {true, false}) {
    p.overlap = overlap;
    const auto tm = analysis::predict_decode(r, p);
    ASSERT_EQ(tm.predictions.size(), 2u);
    const double G = 1e12, X = 25e9, b = 99090432, a = double(tm.attention_bytes) / G, h = double(tm.head_bytes) / G;
    const double x = b / G, copy = b / X;
    EXPECT_EQ(tm.expert_bytes, 99090432);
    // lm_head FP32 [32000, 4096] + the final norm; attention q, o [4096, 4096], k, v [1024, 4096], router [8, 4096]
    // in NF4 with FP32 absmax (each region on 256 bytes), + two FP32 norms.
    EXPECT_EQ(tm.head_bytes, 32000LL * 4096 * 4 + 4096 * 4);
    const auto nf4 = [](int64_t n) { return (n / 2 + 255) / 256 * 256 + (n / 64 * 4 + 255) / 256 * 256; };
    EXPECT_EQ(tm.attention_bytes, 2 * nf4(4096LL * 4096) + 2 * nf4(1024LL * 4096) + nf4(8LL * 4096) + 2 * 4096 * 4);
    // C = 1: 32 layers, each step one expert, one miss; C = 2: one expert, no miss.
    const double miss_layer = overlap ? a + std::max(x, copy + x) : a + x + copy;
    EXPECT_NEAR(tm.predictions[0].step_seconds, h + 32 * miss_layer, 1e-12);
    EXPECT_NEAR(tm.predictions[1].step_seconds, h + 32 * (a + x), 1e-12);
    EXPECT_NEAR(tm.predictions[1].tokens_per_second, 1 / (h + 32 * (a + x)), 1e-9);
    // GPU memory: the fixed part + 32 · C experts + an FP32 KV cache of 1 token (32 layers · 2 · 8 heads · 128 · 4).
    EXPECT_EQ(tm.predictions[1].gpu_bytes - tm.predictions[0].gpu_bytes, 32 * 99090432LL);
    EXPECT_EQ(tm.kv_bytes, 32 * 2 * 8 * 128 * 4);
    EXPECT_GE(tm.assumptions.size(), 6u);
  }
  EXPECT_THROW(analysis::parse_link("pcie9"), Error);
  EXPECT_DOUBLE_EQ(analysis::parse_link("12.5").gb_per_s, 12.5);
  EXPECT_DOUBLE_EQ(analysis::parse_link("nvlink-c2c").gb_per_s, 360);
}

// ---- `moelab cachesim` through the real binary -------------------------------------------------------

// A trace file of `seqs` written by the TraceWriter, with a config that names the expert's shape.
void write_trace(const std::string& path, int layers, int k, int experts, const Routes& seqs) {
  analysis::TraceHeader h;
  h.model_config = {{"architectures", {"MixtralForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
                    {"num_hidden_layers", layers}, {"num_local_experts", experts}, {"num_experts_per_tok", k}};
  h.num_layers = layers;
  h.top_k = k;
  h.num_experts = experts;
  h.engine = "synthetic";
  h.tool_version = "test";
  analysis::TraceWriter w(path, h);
  const auto tr = to_trace(layers, k, experts, seqs);
  const size_t lk = size_t(layers * k);
  for (int64_t s = 0; s < tr.num_sequences(); ++s) {
    const auto t0 = size_t(tr.sequence_offsets[size_t(s)]), t1 = size_t(tr.sequence_offsets[size_t(s) + 1]);
    if (t1 == t0) continue;
    w.add_sequence(-1, {tr.tokens.data() + t0, t1 - t0}, {tr.experts.data() + t0 * lk, (t1 - t0) * lk},
                   {tr.gates.data() + t0 * lk, (t1 - t0) * lk});
  }
  w.close();
}

std::string read_text(const std::string& path) { return read_file_bytes(path); }

TEST(CacheSimCli, TraceFileToTablesJsonAndFigure) {
  TempDir tmp("moelab-cachesim-cli");
  std::mt19937_64 rng(29);
  Routes seqs = skewed_routes(rng, 2, 2, 4, 5, 40);
  seqs.push_back(skewed_routes(rng, 2, 2, 4, 1, 40)[0]);
  if (seqs[0].empty()) seqs[0] = skewed_routes(rng, 2, 2, 4, 1, 40)[0];
  const std::string trace = tmp.file("t.h5");
  write_trace(trace, 2, 2, 4, seqs);
  const auto run_cli = run_moelab({"cachesim", trace, "--cache-sizes", "1-4", "--policy", "lru,fifo,belady", "--batch", "2",
                                   "--calibrate", "0", "-o", tmp.file("r.json"), "--json", tmp.file("s.json"), "--svg",
                                   tmp.file("f.svg"), "--progress", "none"},
                                  tmp.path());
  ASSERT_EQ(run_cli.status, 0) << run_cli.err;
  for (const char* needle : {"hit rate", "lru", "fifo", "belady", "MB/tok NF4", "time model", "tokens/s", "GPU GiB",
                             "pcie4-x16", "hit rate per layer"})
    EXPECT_NE(run_cli.out.find(needle), std::string::npos) << needle << " not in:\n" << run_cli.out;
  // The same simulation in memory gives the same counts.
  const auto tr = to_trace(2, 2, 4, seqs);
  const auto expected = run(tr, {Policy::Lru, Policy::Fifo, Policy::Belady}, {1, 2, 3, 4}, 2);
  const auto got = nlohmann::json::parse(read_text(tmp.file("r.json")));
  EXPECT_EQ(got["format"], "moelab-cachesim-v1");
  EXPECT_EQ(got["traces"][0], trace);
  EXPECT_EQ(got["settings"]["batch"], 2);
  EXPECT_EQ(got["expert_bytes"]["bf16"], 3 * 64 * 128 * 2);
  ASSERT_EQ(got["results"].size(), expected.results.size());
  const std::string svg = read_text(tmp.file("f.svg"));
  for (size_t i = 0; i < expected.results.size(); ++i) {
    const auto& e = expected.results[i];
    const auto& g = got["results"][i];
    const auto t = e.total();
    EXPECT_EQ(g["policy"], cachesim::policy_name(e.policy));
    EXPECT_EQ(g["cache_size"], e.cache_size);
    EXPECT_EQ(g["hits"], t.hits);
    EXPECT_EQ(g["misses"], t.misses);
    EXPECT_EQ(g["requests"], t.requests);
    EXPECT_EQ(g["layers"][1]["hits"], e.layers[1].hits);
    EXPECT_NEAR(g["bytes_per_token"]["bf16"].get<double>(), double(t.copies()) / double(tr.num_tokens()) * 3 * 64 * 128 * 2, 1e-6);
    // The figure draws each point at its hit rate.
    const std::string point = fmt::format("data-policy=\"{}\" data-cache-size=\"{}\" data-hit-rate=\"{:.6f}\"",
                                          cachesim::policy_name(e.policy), e.cache_size, double(t.hits) / double(t.requests));
    EXPECT_NE(svg.find(point), std::string::npos) << point;
  }
  EXPECT_TRUE(got["time_model"]["assumptions"].is_array());
  EXPECT_EQ(got["time_model"]["predictions"].size(), expected.results.size());
  // --json: the printed summary, without the per-layer arrays.
  const auto summary = nlohmann::json::parse(read_text(tmp.file("s.json")));
  EXPECT_FALSE(summary["results"][0].contains("layers"));
  EXPECT_EQ(summary["results"][0]["hits"], got["results"][0]["hits"]);
}

TEST(CacheSimCli, HelpDocumentsEveryPolicyAndTheTimeModel) {
  TempDir tmp("moelab-cachesim-help");
  const auto r = run_moelab({"cachesim", "--help"}, tmp.path());
  ASSERT_EQ(r.status, 0);
  for (Policy p : cachesim::all_policies()) {
    EXPECT_NE(r.out.find(cachesim::policy_name(p) + ": "), std::string::npos) << cachesim::policy_name(p);
    EXPECT_NE(r.out.find(cachesim::policy_description(p).substr(0, 40)), std::string::npos) << cachesim::policy_name(p);
  }
  for (const auto& l : analysis::link_presets())
    EXPECT_NE(r.out.find(fmt::format("{}: {} GB/s", l.name, l.gb_per_s)), std::string::npos) << l.name;
  for (const char* opt : {"--cache-sizes TEXT=1-E", "--policy TEXT=all", "--batch INT", "=1", "--calibrate TEXT=10%",
                          "--gpu-bandwidth FLOAT:POSITIVE=900", "--link TEXT=pcie4-x16", "--no-overlap",
                          "--time-model TEXT=mixtral-8x7b", "--context", "=4096", "--belady-window", "=16384",
                          "--lfu-aging", "=64", "-o,--output", "--json", "--svg", "--progress"})
    EXPECT_NE(r.out.find(opt), std::string::npos) << opt;
}

// Bad inputs end in one line on stderr naming the file (or the option), exit 1.
TEST(CacheSimCli, BadInputsAreOneClearLine) {
  TempDir tmp("moelab-cachesim-bad");
  const std::string good = tmp.file("good.h5");
  Routes seqs{{{{0, 1}}, {{2, 3}}, {{1, 2}}}};
  write_trace(good, 1, 2, 4, seqs);
  // A trace without /experts.
  const std::string no_experts = tmp.file("no-experts.h5");
  write_trace(no_experts, 1, 2, 4, seqs);
  {
    const hid_t f = H5Fopen(no_experts.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    ASSERT_GE(H5Ldelete(f, "experts", H5P_DEFAULT), 0);
    H5Fclose(f);
  }
  // A truncated trace: its first half.
  const std::string truncated = tmp.file("truncated.h5");
  {
    const std::string bytes = read_text(good);
    std::ofstream(truncated, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  const std::string text = tmp.file("notes.txt");
  std::ofstream(text) << "not a trace\n";
  const struct {
    std::vector<std::string> args;
    std::string needle;
  } cases[] = {
      {{no_experts}, no_experts + ": not a moelab trace (no /experts dataset)"},
      {{truncated}, truncated + ": "},
      {{text}, text + ": not an HDF5 file"},
      {{tmp.file("missing.h5")}, tmp.file("missing.h5") + ": cannot open"},
      {{good, "--cache-sizes", "0-2"}, good + ": cache size 0 is outside 1..4"},
      {{good, "--cache-sizes", "5"}, good + ": cache size 5 is outside 1..4"},
      {{good, "--cache-sizes", "2-x"}, "--cache-sizes 2-x"},
      {{good, "--policy", "mru"}, "unknown policy 'mru'"},
      {{good, "--policy", "static", "--calibrate", "0"}, "static policy needs calibration tokens"},
      {{good, "--calibrate", "1.5"}, "--calibrate 1.5"},
      {{good, "--link", "pcie9"}, "--link pcie9"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args{"cachesim"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    args.insert(args.end(), {"--progress", "none"});
    const auto r = run_moelab(args, tmp.path());
    EXPECT_EQ(r.status, 1) << c.needle << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("moelab: error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << "expected '" << c.needle << "' in: " << r.err;
  }
}

// next-layer-gate by hand (E = 4, top-1, C = 1): layer 1 needs 0, 1, 2 and the trace guessed 0, 1, 3 for it.
// Step 0: 0 is prefetched into the empty slot and used (a prefetch hit). Step 1: 1 is prefetched over 0 and
// used. Step 2: 3 is prefetched over 1, then 2 misses. Layer 1: 2 hits (both prefetch hits), 1 miss, 3 copies
// by prefetch; guessed 3, used 2, needed 3. Layer 0 (always expert 0, no guess) is plain lru: 1 miss, 2 hits.
TEST(CacheSim, NextLayerGateByHand) {
  Routes seqs{{{{0}, {0}}, {{0}, {1}}, {{0}, {2}}}};
  auto tr = to_trace(2, 1, 4, seqs);
  tr.prefetch_guess = {255, 0, 255, 1, 255, 3};
  const auto r = run(tr, {Policy::NextLayerGate}, {1});
  const auto l1 = counts(r, Policy::NextLayerGate, 1, 1), l0 = counts(r, Policy::NextLayerGate, 1, 0);
  EXPECT_EQ(l1.hits, 2);
  EXPECT_EQ(l1.prefetch_hits, 2);
  EXPECT_EQ(l1.misses, 1);
  EXPECT_EQ(l1.prefetch_copies, 3);
  EXPECT_EQ(l1.guessed, 3);
  EXPECT_EQ(l1.guess_used, 2);
  EXPECT_EQ(l1.guess_needed, 3);
  EXPECT_EQ(l0.hits, 2);
  EXPECT_EQ(l0.misses, 1);
  EXPECT_EQ(l0.guessed, 0);
  // A trace without guesses: next-layer-gate is refused by name, and "all" leaves it out.
  const auto plain = to_trace(2, 1, 4, seqs);
  EXPECT_THROW(run(plain, {Policy::NextLayerGate}, {1}), Error);
  const auto src = analysis::memory_routing_source(plain);
  CacheSimOptions every;
  every.calibrate.tokens = 1;  // static needs some
  const auto all = analysis::simulate_cache({src.get()}, every);
  EXPECT_EQ(all.find(Policy::NextLayerGate, 1), nullptr);
  EXPECT_NE(all.find(Policy::Lru, 1), nullptr);
}

// The optional /prefetch_guess dataset: written, read back whole and streamed, refused on an append of
// the other kind.
TEST(CacheSimTrace, PrefetchGuessDatasetRoundTrip) {
  TempDir tmp("moelab-guess-trace");
  std::mt19937_64 rng(31);
  const int L = 3, k = 2, E = 8;
  const auto seqs = random_routes(rng, L, k, E, 4, 30);
  auto tr = to_trace(L, k, E, seqs);
  add_random_guesses(tr, rng);
  analysis::TraceHeader h;
  h.model_config = {{"hidden_size", 64}, {"intermediate_size", 128}};
  h.num_layers = L, h.top_k = k, h.num_experts = E, h.engine = "synthetic", h.tool_version = "test";
  h.prefetch_guess = true;
  const std::string path = tmp.file("g.h5");
  {
    analysis::TraceWriter w(path, h, analysis::TraceWriterOptions{.flush_tokens = 7});
    const size_t lk = size_t(L * k);
    for (int64_t s = 0; s < tr.num_sequences(); ++s) {
      const auto a = size_t(tr.sequence_offsets[size_t(s)]), b = size_t(tr.sequence_offsets[size_t(s) + 1]);
      if (a == b) continue;
      w.add_sequence(-1, {tr.tokens.data() + a, b - a}, {tr.experts.data() + a * lk, (b - a) * lk},
                     {tr.gates.data() + a * lk, (b - a) * lk}, {}, {tr.prefetch_guess.data() + a * lk, (b - a) * lk});
    }
    EXPECT_THROW(w.add_sequence(-1, {tr.tokens.data(), 1}, {tr.experts.data(), size_t(L * k)},
                                {tr.gates.data(), size_t(L * k)}),
                 Error);  // a sequence without its guesses
    w.close();
  }
  const auto back = analysis::read_trace(path);
  EXPECT_EQ(back.prefetch_guess, tr.prefetch_guess);
  analysis::TraceStream stream(path);
  ASSERT_TRUE(stream.has_prefetch_guess());
  std::vector<uint8_t> rows;
  stream.read_prefetch_guess(3, 5, rows);
  EXPECT_EQ(rows, std::vector<uint8_t>(tr.prefetch_guess.begin() + 3 * L * k, tr.prefetch_guess.begin() + 8 * L * k));
  // Appending without guesses to a trace with them (and the other way round) is refused.
  auto without = h;
  without.prefetch_guess = false;
  try {
    analysis::TraceWriter w(path, without, analysis::TraceWriterOptions{.append = true});
    ADD_FAILURE() << "append of another kind accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("append with --record-prefetch-guess"), std::string::npos) << e.what();
  }
  // The simulator replays the file's guesses as it does the in-memory ones.
  const auto from_file = analysis::simulate_cache(std::vector<std::string>{path}, [] {
    CacheSimOptions o;
    o.policies = {Policy::NextLayerGate};
    return o;
  }());
  const auto from_memory = run(tr, {Policy::NextLayerGate}, {1, 2, 3, 4, 5, 6, 7, 8});
  for (int c = 1; c <= E; ++c) {
    EXPECT_EQ(counts(from_file, Policy::NextLayerGate, c).hits, counts(from_memory, Policy::NextLayerGate, c).hits);
    EXPECT_EQ(counts(from_file, Policy::NextLayerGate, c).guess_used, counts(from_memory, Policy::NextLayerGate, c).guess_used);
  }
}

// `moelab trace --record-prefetch-guess` on the bundled model: every guess is the top-k of layer l's router
// applied to layer l-1's output after layer l's post-attention RMSNorm, recomputed here with Eigen from the
// reference engine's hidden states of the same window; layer 0 has none.
TEST(CacheSimTrace, RecordedGuessesAreTheNextLayerGate) {
  TempDir tmp("moelab-guess-cli");
  std::ofstream(tmp.file("text.txt")) << "The licensee may copy and distribute verbatim copies of the program.";
  const auto r = run_moelab({"trace", "--model", MOELAB_BUNDLED_MODEL, "--input", tmp.file("text.txt"), "--output",
                             tmp.file("t.h5"), "--record-prefetch-guess", "--progress", "none"},
                            tmp.path());
  ASSERT_EQ(r.status, 0) << r.err;
  const auto tr = analysis::read_trace(tmp.file("t.h5"));
  ASSERT_TRUE(tr.has_prefetch_guess());
  ASSERT_EQ(tr.num_sequences(), 1);
  const auto ck = Checkpoint::open(MOELAB_BUNDLED_MODEL);
  const auto& cfg = ck->config();
  ref::Model<float> model(*ck);
  const auto rec = analysis::ForwardRecord::run(model, tr.tokens);
  int64_t total = 0;
  for (int l = 0; l < tr.num_layers; ++l)
    for (int64_t t = 0; t < tr.num_tokens(); ++t) {
      if (l == 0) {
        for (int j = 0; j < tr.top_k; ++j) EXPECT_EQ(tr.prefetch_guess[size_t((t * tr.num_layers) * tr.top_k + j)], 255);
        continue;
      }
      const Eigen::VectorXd h = rec.layers[size_t(l - 1)].hidden.row(Eigen::Index(t)).cast<double>().transpose();
      const auto w = ck->read_f32(fmt::format("model.layers.{}.post_attention_layernorm.weight", l));
      const auto g = ck->read_f32(cfg.router_name(l));
      const Eigen::VectorXd wn = Eigen::Map<const Eigen::VectorXf>(w.data(), cfg.hidden_size).cast<double>();
      const Eigen::MatrixXd router =
          Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(g.data(), cfg.num_experts,
                                                                                                 cfg.hidden_size)
              .cast<double>();
      const Eigen::VectorXd x = (h / std::sqrt(h.squaredNorm() / double(cfg.hidden_size) + cfg.rms_norm_eps)).cwiseProduct(wn);
      const Eigen::VectorXd logits = router * x;
      std::vector<int> order(size_t(cfg.num_experts));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits(a) > logits(b); });
      for (int j = 0; j < tr.top_k; ++j) {
        EXPECT_EQ(int(tr.prefetch_guess[size_t((t * tr.num_layers + l) * tr.top_k + j)]), order[size_t(j)])
            << "token " << t << " layer " << l << " rank " << j;
      }
      ++total;
    }
  EXPECT_GT(total, 0);
  // On a checkpoint without the guesses' kind: appending without the flag is refused in one line.
  const auto again = run_moelab({"trace", "--model", MOELAB_BUNDLED_MODEL, "--input", tmp.file("text.txt"), "--output",
                                 tmp.file("t.h5"), "--append", "--progress", "none"},
                                tmp.path());
  EXPECT_EQ(again.status, 1);
  EXPECT_NE(again.err.find("append with --record-prefetch-guess"), std::string::npos) << again.err;
}

}  // namespace
}  // namespace moelab::test
