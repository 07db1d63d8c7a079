// The comparison the BF16/int8 engine tests use (engine_test_util.hpp, expect_close_where_routed_alike),
// checked on made-up records: a flipped top-k set and what it reaches through attention are left out and
// counted; a difference anywhere else still fails.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include "engine_test_util.hpp"

namespace moelab::test {
namespace {

// n tokens, L layers, hidden width 4, top-2 of 4 experts; every token routed to {0, 1}.
analysis::ForwardRecord record(int n, int L) {
  analysis::ForwardRecord r;
  r.tokens.assign(size_t(n), 1);
  r.logits = MatrixRF::Constant(n, 6, 1.0f);
  for (int l = 0; l < L; ++l) {
    analysis::LayerRecord layer;
    layer.hidden = MatrixRF::Constant(n, 4, float(l + 1));
    layer.router_logits = MatrixRF(n, 4);
    layer.router_logits->rowwise() = Eigen::RowVector4f(2.0f, 1.0f, 0.0f, 0.9995f);  // experts 1 and 3 nearly tied
    layer.experts = MatrixRI(n, 2);
    layer.experts.col(0).setConstant(0);
    layer.experts.col(1).setConstant(1);
    layer.gates = MatrixRF::Constant(n, 2, 0.5f);
    r.layers.push_back(layer);
  }
  return r;
}

const RoutedAlikeLimits kLimits{.hidden = [](int) { return 1e-3; }, .router_logits = [](int) { return 1e-3; },
                                .logits = 1e-3, .max_flip_fraction = 0.1};

TEST(RoutedAlike, EqualRecordsPassWithNoFlips) {
  const auto a = record(10, 2);
  EXPECT_EQ(expect_close_where_routed_alike(a, a, kLimits), 0);
}

TEST(RoutedAlike, AFlipAndWhatItReachesAreLeftOut) {
  const auto a = record(10, 2);
  auto b = a;
  // Token 6 flips in layer 0 (expert 1 -> 3, in another rank order too): its own rows differ from layer 0
  // on; tokens 6..9 differ from layer 1 on (attention), and so do their logits.
  b.layers[0].experts(6, 0) = 3;
  b.layers[0].experts(6, 1) = 0;
  (*b.layers[0].router_logits)(6, 1) -= 0.001f;  // the rounding that flipped it (gap 0.0005)
  b.layers[0].hidden.row(6).setConstant(9);
  b.layers[1].hidden.bottomRows(4).setConstant(9);
  b.layers[1].router_logits->bottomRows(4).setConstant(9);
  b.logits.bottomRows(4).setConstant(9);
  EXPECT_EQ(expect_close_where_routed_alike(a, b, kLimits), 1);
}

TEST(RoutedAlike, ADifferenceWhereRoutingAgreesFails) {
  const auto a = record(10, 2);
  auto b = a;
  b.layers[0].experts(6, 1) = 3;  // a flip at token 6 ...
  (*b.layers[0].router_logits)(6, 1) -= 0.001f;
  b.layers[1].hidden.row(5).setConstant(9);  // ... does not excuse token 5, which comes before it
  EXPECT_NONFATAL_FAILURE(expect_close_where_routed_alike(a, b, kLimits), "layer 1");
}

TEST(RoutedAlike, TooManyFlipsFail) {
  const auto a = record(10, 2);
  auto b = a;
  for (int t = 7; t < 10; ++t) {  // 3 of 20 sets: over one in ten
    b.layers[1].experts(t, 1) = 3;
    (*b.layers[1].router_logits)(t, 1) -= 0.001f;
  }
  EXPECT_NONFATAL_FAILURE(expect_close_where_routed_alike(a, b, kLimits), "top-k sets that flipped");
}

TEST(RoutedAlike, AFlipAcrossAClearGapFails) {
  const auto a = record(10, 2);
  auto b = a;
  b.layers[0].experts(6, 1) = 2;  // expert 2 is 1.0 below expert 1, and the logits did not move
  EXPECT_NONFATAL_FAILURE(expect_close_where_routed_alike(a, b, kLimits), "routing gap");
}

TEST(RoutedAlike, NothingLeftToCompareFails) {
  const auto a = record(4, 2);
  auto b = a;
  b.layers[0].experts(0, 1) = 3;  // token 0 flips in layer 0: every token's layer-1 input sees it
  (*b.layers[0].router_logits)(0, 1) -= 0.001f;
  EXPECT_NONFATAL_FAILURE(expect_close_where_routed_alike(a, b, {.hidden = [](int) { return 1e-3; },
                                                                 .router_logits = {},
                                                                 .logits = 1e-3,
                                                                 .max_flip_fraction = 1.0}),
                          "nothing left to compare");
}

}  // namespace
}  // namespace moelab::test
