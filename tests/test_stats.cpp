// Routing statistics on synthetic traces whose answers are known in closed form, one transformers oracle
// for the aux loss, a seeded statistical check of the random-routing baselines, and `moelab stats` on a
// trace file end to end.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "analysis/stats.hpp"
#include "analysis/trace.hpp"
#include "core/error.hpp"

namespace moelab::test {
namespace {

using analysis::compute_stats;
using analysis::StatsReport;
using analysis::TraceData;
using Route = std::vector<int>;  // one token's top-k at one layer, rank order

// Builds a TraceData sequence by sequence. routes[t][l] is token t's top-k at layer l.
struct TraceBuilder {
  TraceData tr;
  TraceBuilder(int layers, int k, int experts, std::vector<std::string> domains = {}) {
    tr.num_layers = layers;
    tr.top_k = k;
    tr.num_experts = experts;
    tr.domain_names = std::move(domains);
    tr.sequence_offsets = {0};
  }
  TraceBuilder& sequence(const std::vector<std::vector<Route>>& routes, int domain = -1) {
    for (const auto& tok : routes) {
      EXPECT_EQ(int(tok.size()), tr.num_layers);
      tr.tokens.push_back(int32_t(tr.tokens.size()));
      for (const auto& r : tok) {
        EXPECT_EQ(int(r.size()), tr.top_k);
        for (int e : r) tr.experts.push_back(uint8_t(e)), tr.gates.push_back(1.0f / float(tr.top_k));
      }
    }
    tr.sequence_offsets.push_back(int64_t(tr.tokens.size()));
    tr.sequence_domain.push_back(domain);
    return *this;
  }
  // One-layer convenience: routes[t] is token t's top-k.
  TraceBuilder& sequence1(const std::vector<Route>& routes, int domain = -1) {
    std::vector<std::vector<Route>> r;
    for (const auto& x : routes) r.push_back({x});
    return sequence(r, domain);
  }
};

// Round robin: token t chooses {t mod E, t+1 mod E}; every expert gets exactly 2N/E choices when E | N.
std::vector<Route> round_robin(int n, int e) {
  std::vector<Route> r;
  for (int t = 0; t < n; ++t) r.push_back({t % e, (t + 1) % e});
  return r;
}

double binom(int n, int k) {
  if (k < 0 || k > n) return 0;
  double c = 1;
  for (int i = 1; i <= k; ++i) c = c * (n - k + i) / i;
  return c;
}

TEST(StatsBaselines, ClosedFormsAndBruteForce) {
  EXPECT_DOUBLE_EQ(analysis::first_choice_baseline(8), 0.125);
  EXPECT_NEAR(analysis::first_or_second_baseline(8, 2), 1 - (6.0 / 8) * (5.0 / 7), 1e-15);  // 46.43%
  EXPECT_NEAR(analysis::first_or_second_baseline(8, 2), 13.0 / 28.0, 1e-15);
  EXPECT_NEAR(analysis::first_or_second_baseline(8, 1), 1.0 / 8, 1e-15);  // k = 1: the first-choice baseline
  EXPECT_DOUBLE_EQ(analysis::first_or_second_baseline(3, 2), 1.0);      // E < 2k: sets always meet
  EXPECT_NEAR(analysis::first_or_second_baseline(64, 6), 1 - binom(58, 6) / binom(64, 6), 1e-12);
  // Brute force over all ordered pairs of k-subsets (bitmasks) for small E, k.
  for (auto [e, k] : {std::pair{6, 2}, std::pair{7, 3}, std::pair{5, 1}, std::pair{8, 2}}) {
    int64_t pairs = 0, overlap = 0;
    for (int a = 0; a < (1 << e); ++a)
      for (int b = 0; b < (1 << e); ++b)
        if (__builtin_popcount(unsigned(a)) == k && __builtin_popcount(unsigned(b)) == k) {
          ++pairs;
          overlap += (a & b) != 0;
        }
    EXPECT_NEAR(analysis::first_or_second_baseline(e, k), double(overlap) / double(pairs), 1e-14) << e << " " << k;
  }
}

TEST(StatsBalance, FiguresOfAKnownShareVector) {
  const std::vector<double> s = {0.5, 0.25, 0.25, 0.0};  // mean 1/4, population std sqrt(1/32)
  EXPECT_NEAR(analysis::coefficient_of_variation(s), 1 / std::sqrt(2.0), 1e-15);
  EXPECT_DOUBLE_EQ(analysis::max_over_mean(s), 2.0);
  // (½ ln 2 + 2 · ¼ ln 4) / ln 4 = 3/4
  EXPECT_NEAR(analysis::normalized_entropy(s), 0.75, 1e-15);
  EXPECT_DOUBLE_EQ(analysis::normalized_entropy({1.0}), 1.0);  // one expert: balanced by convention
}

TEST(StatsLoad, BalancedRoundRobinWithEqualLogits) {
  const int e = 8, n = 64;
  TraceBuilder b(1, 2, e);
  b.sequence1(round_robin(n, e));
  b.tr.router_logits.assign(size_t(n * e), 0.5f);  // equal logits: P_i = 1/E exactly
  const auto r = compute_stats(b.tr, false);
  const auto& ls = r.overall.layers[0];
  for (int i = 0; i < e; ++i) {
    EXPECT_EQ(ls.counts[size_t(i)], 2 * n / e);
    EXPECT_DOUBLE_EQ(ls.load_share[size_t(i)], 1.0 / e);
    EXPECT_DOUBLE_EQ(ls.top1_share[size_t(i)], 1.0 / e);
    EXPECT_NEAR((*ls.mean_router_prob)[size_t(i)], 1.0 / e, 1e-15);
  }
  EXPECT_NEAR(ls.cv, 0.0, 1e-15);
  EXPECT_NEAR(ls.max_over_mean, 1.0, 1e-15);
  EXPECT_NEAR(ls.normalized_entropy, 1.0, 1e-15);
  // transformers' definition at perfect balance: E · Σ (k/E)(1/E) = k
  ASSERT_TRUE(ls.aux_loss);
  EXPECT_NEAR(*ls.aux_loss, 2.0, 1e-14);
  EXPECT_NEAR(*r.overall.aux_loss_all_layers, 2.0, 1e-14);
  // {t, t+1} then {t+1, t+2}: the first choice never repeats, the sets always share t+1.
  EXPECT_EQ(ls.repetition.pairs, n - 1);
  EXPECT_DOUBLE_EQ(*ls.repetition.first_choice(), 0.0);
  EXPECT_DOUBLE_EQ(*ls.repetition.first_or_second(), 1.0);
}

TEST(StatsLoad, AllTokensToOneExpertK1) {
  const int e = 8, n = 10;
  TraceBuilder b(1, 1, e);
  b.sequence1(std::vector<Route>(size_t(n), Route{3}));
  const auto ls = compute_stats(b.tr, false).overall.layers[0];  // a copy: the report is a temporary
  EXPECT_EQ(ls.counts[3], n);
  EXPECT_DOUBLE_EQ(ls.load_share[3], 1.0);
  EXPECT_DOUBLE_EQ(ls.normalized_entropy, 0.0);
  EXPECT_NEAR(ls.max_over_mean, double(e), 1e-14);
  EXPECT_NEAR(ls.cv, std::sqrt(e - 1.0), 1e-14);  // shares (1, 0, ..., 0): CV = sqrt(E − 1)
  EXPECT_FALSE(ls.aux_loss);                       // no router logits recorded
  EXPECT_FALSE(ls.mean_router_prob);
  EXPECT_DOUBLE_EQ(*ls.repetition.first_choice(), 1.0);
  EXPECT_DOUBLE_EQ(*ls.repetition.first_or_second(), 1.0);
}

TEST(StatsLoad, AllTokensToOnePairK2WithKnownSoftmax) {
  const int e = 8, n = 12;
  TraceBuilder b(1, 2, e);
  b.sequence1(std::vector<Route>(size_t(n), Route{3, 5}));
  // exp(logits) = 1 for six experts and 3 for experts 3 and 5: softmax 1/12 and 1/4.
  std::vector<float> row(size_t(e), 0.0f);
  row[3] = row[5] = float(std::log(3.0));
  for (int t = 0; t < n; ++t) b.tr.router_logits.insert(b.tr.router_logits.end(), row.begin(), row.end());
  const auto r = compute_stats(b.tr, false);
  const auto& ls = r.overall.layers[0];
  // shares: k experts with 1/k, the rest 0 → max/mean E/k, CV sqrt(E/k − 1), entropy ln k / ln E
  EXPECT_NEAR(ls.max_over_mean, 4.0, 1e-14);
  EXPECT_NEAR(ls.cv, std::sqrt(3.0), 1e-14);
  EXPECT_NEAR(ls.normalized_entropy, 1.0 / 3.0, 1e-14);
  EXPECT_DOUBLE_EQ(ls.top1_share[3], 1.0);
  EXPECT_DOUBLE_EQ(ls.top1_share[5], 0.0);
  EXPECT_NEAR((*ls.mean_router_prob)[3], 0.25, 1e-7);
  EXPECT_NEAR((*ls.mean_router_prob)[0], 1.0 / 12, 1e-7);
  // f_3 = f_5 = 1 (every token has both): 8 · (1 · ¼ + 1 · ¼) = 4
  EXPECT_NEAR(*ls.aux_loss, 4.0, 1e-6);
}

TEST(StatsLoad, LayersAreIndexedIndependently) {
  // Three layers routed differently; a stride mistake in [N, L, k] would mix them.
  const int e = 8, n = 16;
  TraceBuilder b(3, 2, e);
  std::vector<std::vector<Route>> routes;
  for (int t = 0; t < n; ++t) routes.push_back({{0, 1}, {t % e, (t + 1) % e}, {7, 6}});
  b.sequence(routes);
  const auto r = compute_stats(b.tr, false);
  ASSERT_EQ(r.overall.layers.size(), 3u);
  EXPECT_DOUBLE_EQ(r.overall.layers[0].load_share[0], 0.5);
  EXPECT_DOUBLE_EQ(r.overall.layers[0].top1_share[0], 1.0);
  EXPECT_NEAR(r.overall.layers[1].normalized_entropy, 1.0, 1e-15);
  EXPECT_DOUBLE_EQ(r.overall.layers[1].repetition.first_choice().value(), 0.0);
  EXPECT_DOUBLE_EQ(r.overall.layers[2].top1_share[7], 1.0);
  EXPECT_DOUBLE_EQ(r.overall.layers[2].load_share[6], 0.5);
  EXPECT_EQ(r.overall.layers[2].layer, 2);
}

TEST(StatsRepetition, AlwaysNeverAndSecondChoiceOnly) {
  TraceBuilder always(1, 2, 8), never(1, 2, 8), swapped(1, 2, 8);
  always.sequence1({{2, 5}, {2, 5}, {2, 5}, {2, 5}});
  never.sequence1({{0, 1}, {2, 3}, {0, 1}, {2, 3}, {4, 5}});
  swapped.sequence1({{0, 1}, {1, 0}, {0, 1}});  // first choices differ, sets equal
  const auto a = compute_stats(always.tr, false).overall.layers[0].repetition;
  const auto b = compute_stats(never.tr, false).overall.layers[0].repetition;
  const auto c = compute_stats(swapped.tr, false).overall.layers[0].repetition;
  EXPECT_EQ(a.pairs, 3);
  EXPECT_DOUBLE_EQ(*a.first_choice(), 1.0);
  EXPECT_DOUBLE_EQ(*a.first_or_second(), 1.0);
  EXPECT_EQ(b.pairs, 4);
  EXPECT_DOUBLE_EQ(*b.first_choice(), 0.0);
  EXPECT_DOUBLE_EQ(*b.first_or_second(), 0.0);
  EXPECT_DOUBLE_EQ(*c.first_choice(), 0.0);
  EXPECT_DOUBLE_EQ(*c.first_or_second(), 1.0);
}

TEST(StatsRepetition, PairsNeverCrossSequenceBoundaries) {
  // Inside each sequence nothing repeats; across the boundary {2,3} → {2,3} would, and must not count.
  TraceBuilder b(1, 2, 8);
  b.sequence1({{0, 1}, {2, 3}}).sequence1({{2, 3}, {4, 5}});
  const auto rep = compute_stats(b.tr, false).overall.layers[0].repetition;
  EXPECT_EQ(rep.pairs, 2);
  EXPECT_EQ(rep.first_choice_same, 0);
  EXPECT_EQ(rep.topk_sets_overlap, 0);
  EXPECT_DOUBLE_EQ(*rep.first_choice(), 0.0);

  // One-token sequences have no pairs at all: the rates are undefined (null), not 0.
  TraceBuilder singles(1, 2, 8);
  singles.sequence1({{0, 1}}).sequence1({{0, 1}}).sequence1({{0, 1}});
  const auto r = compute_stats(singles.tr, false);
  EXPECT_EQ(r.overall.layers[0].repetition.pairs, 0);
  EXPECT_FALSE(r.overall.layers[0].repetition.first_choice());
  EXPECT_TRUE(r.to_json()["overall"]["layers"][0]["repetition"]["first_choice"].is_null());
}

TEST(StatsCoselection, HandBuiltCounts) {
  TraceBuilder b(1, 2, 4);
  b.sequence1({{0, 1}, {1, 0}, {2, 3}, {0, 2}});
  const auto ls = compute_stats(b.tr, false).overall.layers[0];  // a copy: the report is a temporary
  const int64_t expect[4][4] = {{3, 2, 1, 0}, {2, 2, 0, 0}, {1, 0, 2, 1}, {0, 0, 1, 1}};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(ls.cosel(i, i), ls.counts[size_t(i)]);  // the diagonal is the expert's count
    for (int j = 0; j < 4; ++j) EXPECT_EQ(ls.cosel(i, j), expect[i][j]) << i << "," << j;
  }
  // k = 3: one token {0, 1, 2} co-selects every pair among them once.
  TraceBuilder b3(1, 3, 4);
  b3.sequence1({{2, 0, 1}});
  const auto l3 = compute_stats(b3.tr, false).overall.layers[0];  // a copy: the report is a temporary
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) EXPECT_EQ(l3.cosel(i, j), (i < 3 && j < 3) ? 1 : 0) << i << "," << j;
}

TEST(StatsDomains, SplitsBySequenceDomain) {
  // "code" always {0,1}, "prose" always {2,3}; "math" has no sequences and is left out; one unlabeled sequence.
  TraceBuilder b(1, 2, 4, {"code", "prose", "math"});
  b.sequence1({{0, 1}, {0, 1}, {0, 1}}, 0)
      .sequence1({{2, 3}, {3, 2}}, 1)
      .sequence1({{0, 1}}, 0)
      .sequence1({{1, 3}, {1, 3}}, -1);
  const auto plain = compute_stats(b.tr, false);
  EXPECT_TRUE(plain.domains.empty());
  const auto r = compute_stats(b.tr, true);
  ASSERT_EQ(r.domains.size(), 3u);
  EXPECT_EQ(r.domains[0].name, "code");
  EXPECT_EQ(r.domains[1].name, "prose");
  EXPECT_EQ(r.domains[2].name, "(unlabeled)");
  EXPECT_EQ(r.domains[0].tokens, 4);
  EXPECT_EQ(r.domains[0].sequences, 2);
  EXPECT_EQ(r.domains[1].tokens, 2);
  const auto& code = r.domains[0].layers[0];
  const auto& prose = r.domains[1].layers[0];
  EXPECT_DOUBLE_EQ(code.load_share[0], 0.5);
  EXPECT_DOUBLE_EQ(code.load_share[2], 0.0);
  EXPECT_DOUBLE_EQ(prose.load_share[2], 0.5);
  EXPECT_DOUBLE_EQ(prose.top1_share[2], 0.5);
  // code: 2 pairs in its first sequence, none in the one-token sequence, none with the other domains
  EXPECT_EQ(code.repetition.pairs, 2);
  EXPECT_DOUBLE_EQ(*code.repetition.first_choice(), 1.0);
  EXPECT_DOUBLE_EQ(*prose.repetition.first_choice(), 0.0);
  EXPECT_DOUBLE_EQ(*prose.repetition.first_or_second(), 1.0);
  // overall is the token-weighted whole: expert 1 has 4 (code) + 2 (unlabeled) of 16 choices
  EXPECT_EQ(r.overall.tokens, 8);
  EXPECT_DOUBLE_EQ(r.overall.layers[0].load_share[1], 6.0 / 16);
  EXPECT_EQ(r.overall.layers[0].repetition.pairs, 2 + 1 + 1);
  const auto j = r.to_json();
  EXPECT_EQ(j["domains"].size(), 3u);
  EXPECT_EQ(j["domains"][1]["name"], "prose");
}

TEST(StatsAuxLoss, MatchesTransformersLoadBalancingLoss) {
  // Oracle: transformers 4.57.3 load_balancing_loss_func(gate_logits, num_experts=4, top_k=2) on these logits
  // in float64 (all exact in float16); experts are torch.topk of the softmax (no ties). transformers rounds f
  // to float32 (expert_mask.float()), so its results differ from the exact ones by ~4e-8; the exact values
  // below are its formula with f kept in float64:
  //   p = softmax(cat(gs), -1); m = one_hot(topk(p, 2).indices, 4).double()
  //   4 * (m.mean(0) * p.mean(0).unsqueeze(0)).sum()
  const std::vector<std::vector<float>> l0 = {{0.25f, -1.0f, 2.0f, 0.5f},   {1.5f, 1.25f, -0.75f, 0.0f},
                                              {-2.0f, 0.75f, 0.5f, 3.0f},   {0.0f, 0.125f, 1.0f, -1.0f},
                                              {2.5f, -0.5f, 0.25f, 1.75f}};
  const std::vector<std::vector<float>> l1 = {{-0.5f, 0.5f, 1.5f, -1.25f},  {3.0f, -2.0f, 0.0f, 1.0f},
                                              {0.25f, 0.5f, 0.75f, 1.0f},   {1.0f, 2.0f, -1.0f, -3.0f},
                                              {-0.25f, -0.75f, 2.25f, 0.125f}};
  const std::vector<Route> e0 = {{2, 3}, {0, 1}, {3, 1}, {2, 1}, {0, 3}};
  const std::vector<Route> e1 = {{2, 1}, {0, 3}, {3, 2}, {1, 0}, {2, 3}};
  TraceBuilder b(2, 2, 4);
  std::vector<std::vector<Route>> routes;
  for (size_t t = 0; t < 5; ++t) {
    routes.push_back({e0[t], e1[t]});
    for (const auto* l : {&l0, &l1}) b.tr.router_logits.insert(b.tr.router_logits.end(), (*l)[t].begin(), (*l)[t].end());
  }
  // Two sequences: the aux loss ignores sequence boundaries (it is per token).
  b.sequence({routes.begin(), routes.begin() + 2}).sequence({routes.begin() + 2, routes.end()});
  const auto r = compute_stats(b.tr, false);
  // load_balancing_loss_func((g0,)), ((g1,)) and ((g0, g1)): the last pools both layers, not their mean.
  EXPECT_NEAR(*r.overall.layers[0].aux_loss, 1.9517015973685656, 1e-12);
  EXPECT_NEAR(*r.overall.layers[1].aux_loss, 1.9825558101525143, 1e-12);
  EXPECT_NEAR(*r.overall.aux_loss_all_layers, 1.969671699757574, 1e-12);
  // transformers' own float32-rounded outputs, as a user would see them
  EXPECT_NEAR(*r.overall.layers[0].aux_loss, 1.9517016352719183, 1e-7);
  EXPECT_NEAR(*r.overall.layers[1].aux_loss, 1.9825558396948981, 1e-7);
  EXPECT_NEAR(*r.overall.aux_loss_all_layers, 1.969671737514779, 1e-7);
  EXPECT_GT(std::abs(*r.overall.aux_loss_all_layers - 0.5 * (1.9517015973685656 + 1.9825558101525143)), 1e-3);
}

TEST(StatsRandom, UniformRoutingMatchesBaselinesWithin5StandardErrors) {
  // Each token: a uniformly random k-subset in random order (so the first choice is uniform too).
  // Consecutive-pair indicators are pairwise independent under this model, so SE = sqrt(p(1−p)/pairs).
  std::mt19937_64 rng(20240108);
  for (const auto& ek : {std::pair{8, 2}, std::pair{8, 1}, std::pair{16, 4}}) {
    const int e = ek.first, k = ek.second;  // not a structured binding: the lambda below captures them (clang 14)
    TraceBuilder b(1, k, e);
    std::vector<int> perm(static_cast<size_t>(e));
    for (int s = 0; s < 40; ++s) {
      std::vector<Route> seq;
      for (int t = 0; t < 2500; ++t) {
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        seq.emplace_back(perm.begin(), perm.begin() + k);
      }
      b.sequence1(seq);
    }
    const auto r = compute_stats(b.tr, false);
    const auto& ls = r.overall.layers[0];
    const double pairs = double(ls.repetition.pairs);
    EXPECT_EQ(ls.repetition.pairs, 40 * 2499);
    const auto check = [&](double got, double p, const char* what) {
      const double se = std::sqrt(p * (1 - p) / pairs);
      EXPECT_LT(std::abs(got - p), 5 * se) << what << " E=" << e << " k=" << k << " got " << got << " want " << p;
    };
    check(*ls.repetition.first_choice(), r.baseline_first_choice, "first choice");
    check(*ls.repetition.first_or_second(), r.baseline_first_or_second, "first or second");
    // Load shares: each expert's count is Binomial(N, k/E) → share SE = sqrt((k/E)(1 − k/E)/N) / k.
    const double n = double(r.tokens), q = double(k) / e;
    for (double s : ls.load_share) EXPECT_LT(std::abs(s - 1.0 / e), 5 * std::sqrt(q * (1 - q) / n) / k);
    EXPECT_GT(ls.normalized_entropy, 0.999);
  }
}

TEST(StatsValidate, RejectsInconsistentTraces) {
  const auto good = [] {
    TraceBuilder b(1, 2, 4, {"a"});
    b.sequence1({{0, 1}, {2, 3}});
    return b.tr;
  };
  EXPECT_NO_THROW(analysis::validate_trace(good()));
  auto t = good();
  t.experts[1] = 4;  // id >= E
  EXPECT_THROW(compute_stats(t, false), Error);
  t = good();
  t.experts[1] = 0;  // expert 0 twice in one top-k
  EXPECT_THROW(compute_stats(t, false), Error);
  t = good();
  t.sequence_offsets.back() = 1;  // offsets must end at N
  EXPECT_THROW(compute_stats(t, false), Error);
  t = good();
  t.experts.pop_back();
  EXPECT_THROW(compute_stats(t, false), Error);
  t = good();
  t.sequence_domain[0] = 1;  // only one domain name
  EXPECT_THROW(compute_stats(t, false), Error);
  t = good();
  t.router_logits.assign(3, 0.0f);  // not N·L·E
  EXPECT_THROW(compute_stats(t, false), Error);
  t = good();
  t.router_logits.assign(2 * 4, 0.0f);
  EXPECT_NO_THROW(analysis::validate_trace(t));
  t.router_logits[5] = std::numeric_limits<float>::infinity();  // float16 overflow: softmax would be NaN
  EXPECT_THROW(compute_stats(t, false), Error);
  t = good();
  t.top_k = 5;
  EXPECT_THROW(compute_stats(t, false), Error);
  TraceBuilder empty(1, 2, 4);
  EXPECT_THROW(compute_stats(empty.tr, false), Error);  // no tokens
}

TEST(StatsJson, StableLayoutAndTables) {
  TraceBuilder b(2, 2, 4, {"code", "prose"});
  b.sequence({{{0, 1}, {2, 3}}, {{1, 0}, {2, 1}}}, 0).sequence({{{3, 2}, {0, 1}}}, 1);
  b.tr.attributes = {{"engine", "ref"}};
  const auto r = compute_stats(b.tr, true);
  const auto j = r.to_json();
  EXPECT_EQ(j["format"], "moelab-stats-v1");
  EXPECT_EQ(j["trace"]["num_experts"], 4);
  EXPECT_EQ(j["trace"]["tokens"], 3);
  EXPECT_EQ(j["trace"]["has_router_logits"], false);
  EXPECT_EQ(j["trace"]["attributes"]["engine"], "ref");
  EXPECT_DOUBLE_EQ(j["baselines"]["first_choice"].get<double>(), 0.25);
  EXPECT_DOUBLE_EQ(j["baselines"]["first_or_second_choice"].get<double>(), 1 - (2.0 / 4) * (1.0 / 3));
  EXPECT_DOUBLE_EQ(j["baselines"]["aux_loss_balanced"].get<double>(), 2.0);
  const auto& l0 = j["overall"]["layers"][0];
  EXPECT_EQ(l0["layer"], 0);
  for (const char* key : {"expert_counts", "top1_counts", "load_share", "top1_share", "coselection"})
    EXPECT_EQ(l0[key].size(), 4u) << key;
  EXPECT_EQ(l0["coselection"][0].size(), 4u);
  EXPECT_EQ(l0["coselection"][0][1], 2);
  EXPECT_TRUE(l0["aux_loss"].is_null());
  EXPECT_TRUE(l0["mean_router_prob"].is_null());
  EXPECT_TRUE(j["overall"]["aux_loss_all_layers"].is_null());
  for (const char* key : {"cv", "max_over_mean", "normalized_entropy"}) EXPECT_TRUE(l0[key].is_number()) << key;
  EXPECT_EQ(l0["repetition"]["pairs"], 1);
  EXPECT_DOUBLE_EQ(l0["repetition"]["first_or_second_choice"].get<double>(), 1.0);
  EXPECT_EQ(j["domains"].size(), 2u);
  EXPECT_EQ(j["overall"]["name"], "all");

  const std::string table = r.table();
  EXPECT_NE(table.find("load share per expert"), std::string::npos);
  EXPECT_NE(table.find("random"), std::string::npos);
  EXPECT_NE(table.find("prose"), std::string::npos);
  EXPECT_NE(table.find("83.3"), std::string::npos);  // the 1st-or-2nd baseline 1 − (2/4)(1/3) for E=4, k=2
  EXPECT_THROW(r.table({5}), Error);                 // no layer 5
}

// `moelab stats` end to end: a trace written by TraceWriter, read back, tables printed, JSON written; the
// numbers equal compute_stats on the same data in memory (logits chosen exact in float16).
TEST(StatsCli, TraceFileToTablesAndJson) {
  namespace fs = std::filesystem;
  const fs::path tmp = fs::temp_directory_path() / ("moelab-stats-cli-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  const int e = 4, k = 2, layers = 2;
  analysis::TraceHeader h;
  h.model_config = {{"num_local_experts", e}, {"num_experts_per_tok", k}, {"num_hidden_layers", layers}};
  h.num_layers = layers;
  h.top_k = k;
  h.num_experts = e;
  h.engine = "synthetic";
  h.tool_version = "test";
  h.router_logits = true;
  h.domain_names = {"code", "prose"};
  TraceBuilder b(layers, k, e, {"code", "prose"});
  b.sequence({{{0, 1}, {2, 3}}, {{0, 1}, {3, 2}}, {{1, 0}, {2, 3}}}, 0).sequence({{{2, 3}, {0, 1}}, {{3, 2}, {1, 0}}}, 1);
  for (size_t i = 0; i < size_t(5 * layers * e); ++i) b.tr.router_logits.push_back(0.25f * float(i % 7) - 0.5f);
  {
    analysis::TraceWriter w((tmp / "t.h5").string(), h);
    for (int64_t s = 0; s < b.tr.num_sequences(); ++s) {
      const size_t t0 = size_t(b.tr.sequence_offsets[size_t(s)]), t1 = size_t(b.tr.sequence_offsets[size_t(s) + 1]);
      const size_t rk = size_t(layers * k), re = size_t(layers * e);
      w.add_sequence(w.domain_id(h.domain_names[size_t(s)]), {b.tr.tokens.data() + t0, t1 - t0},
                     {b.tr.experts.data() + t0 * rk, (t1 - t0) * rk}, {b.tr.gates.data() + t0 * rk, (t1 - t0) * rk},
                     {b.tr.router_logits.data() + t0 * re, (t1 - t0) * re});
    }
    w.close();
  }
  const auto expected = compute_stats(b.tr, true).to_json();

  const fs::path out = tmp / "stdout.txt", json = tmp / "stats.json";
  const std::string cmd = std::string(MOELAB_BIN) + " stats " + (tmp / "t.h5").string() + " --by-domain --json " +
                          json.string() + " >" + out.string() + " 2>&1";
  const int status = std::system(cmd.c_str());
  std::stringstream printed;
  printed << std::ifstream(out).rdbuf();
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << printed.str();
  for (const char* needle : {"load share per expert", "repetition between consecutive tokens", "code", "prose",
                             "random", "aux loss"})
    EXPECT_NE(printed.str().find(needle), std::string::npos) << needle << " not in:\n" << printed.str();
  std::ifstream in(json);
  const auto got = nlohmann::json::parse(in);
  EXPECT_EQ(got["format"], "moelab-stats-v1");
  EXPECT_EQ(got["trace"]["path"], (tmp / "t.h5").string());
  EXPECT_EQ(got["trace"]["tokens"], 5);
  EXPECT_EQ(got["overall"], expected["overall"]);
  EXPECT_EQ(got["domains"], expected["domains"]);
  EXPECT_EQ(got["baselines"], expected["baselines"]);
  fs::remove_all(tmp);
}

}  // namespace
}  // namespace moelab::test

namespace moelab::test {
namespace {

// The co-selection tables are layers x experts^2 doubles per group whatever the token count: a one-token trace
// of 65536 layers and 256 experts (a 300 KB file) asked for 32 GiB twice, an out-of-memory kill. Refused
// before allocating, naming the trace; a real model's shape (Mixtral: 32 x 8) is far below the bound.
TEST(StatsBounds, CoselectionTablesPastTheBudgetAreRefused) {
  TraceBuilder b(65536, 1, 256, {"a"});
  b.sequence(std::vector<std::vector<Route>>(1, std::vector<Route>(65536, Route{255})), 0);
  try {
    compute_stats(b.tr, false, "huge.h5");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("huge.h5: 65536 layers of 256 experts in 1 group(s) need 65.0 GiB"),
              std::string::npos) << e.what();
  }
  TraceBuilder m(32, 2, 8, {"a", "b"});
  m.sequence({std::vector<Route>(32, Route{0, 1}), std::vector<Route>(32, Route{2, 3})}, 0);
  m.sequence({std::vector<Route>(32, Route{4, 5})}, 1);
  EXPECT_EQ(compute_stats(m.tr, true, "mixtral.h5").domains.size(), 2u);
}

}  // namespace
}  // namespace moelab::test
