#pragma once
// What the NF4 engine tests (cpu-nf4, cuda-nf4) share: a fixture model with its NF4-dequantized twin
// (the reference on it computes what an exact NF4 engine computes: DESIGN.md's first step), and one way
// to assert a layer-by-layer diff against stated limits.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "analysis/diff.hpp"
#include "analysis/forward_record.hpp"
#include "core/checkpoint.hpp"
#include "fixture_util.hpp"
#include "optimized/cpu/quantize.hpp"

namespace moelab::test {

// Parameter: a fixture model name. SetUp opens it, reads its tokens and writes the dequantized twin to
// a temporary folder (removed in TearDown). Subclasses may skip before calling SetUp().
class DequantizedFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ck = Checkpoint::open(model_dir(GetParam()));
    tokens = read_i32(SafetensorsFile(model_dir(GetParam()) + "/expected.safetensors"), "tokens");
    dequantized_dir = std::filesystem::temp_directory_path() /
                      ("moelab-deq-" + std::to_string(::getpid()) + "-" + GetParam());
    std::filesystem::remove_all(dequantized_dir);
    cpu::write_dequantized_checkpoint(*ck, dequantized_dir.string(), 64, /*double_quant=*/true);
    dequantized = Checkpoint::open(dequantized_dir.string());
  }
  void TearDown() override {
    if (!dequantized_dir.empty()) std::filesystem::remove_all(dequantized_dir);
  }

  std::unique_ptr<Checkpoint> ck, dequantized;
  std::vector<int32_t> tokens;
  std::filesystem::path dequantized_dir;
};

// Relative-L2 limits for every layer's hidden state and router logits and for the logits, and the least
// fraction of tokens whose top-k expert set must agree in every layer.
struct DiffLimits {
  double hidden = 0, router_logits = 0, logits = 0;
  double min_topk_agreement = 1.0;
};

inline void expect_within(const analysis::DiffReport& d, const DiffLimits& limits) {
  for (const auto& l : d.layers) {
    EXPECT_LT(l.hidden.rel_l2, limits.hidden) << "layer " << l.layer;
    EXPECT_GE(l.topk_agreement, limits.min_topk_agreement) << "layer " << l.layer;
    if (l.router_logits) {
      EXPECT_LT(l.router_logits->rel_l2, limits.router_logits) << "layer " << l.layer;
    }
  }
  EXPECT_LT(d.logits.rel_l2, limits.logits);
}

// Two runs of the same tokens with different rounding (BF16 or int8 activations against FP32, decode
// against prefill), compared where their routing agrees. A token whose top-k set flips (a router near-tie
// under the rounding: the fixture adapters leave margins of 0.003) runs other experts and differs by O(1),
// as in any engine, and every later token sees it through (causal) attention in the layers after. So
// token t is compared in layer l only if its set is the same there and, in every earlier layer, no token
// up to t flipped; the logits of t only if it is compared in the last layer. At most `max_flip_fraction`
// of the (token, layer) sets may flip (at least one may), and at least one token must be left to compare.
// A flip is excused only where the rounding can explain it: a's gap between its k-th and (k+1)-th router
// logits must be at most twice the largest difference between a's and b's router logits of that token
// (two logits each moved by at most that much cannot swap across a larger gap). An engine that picks other
// experts from nearly the same logits (a top-k bug) fails. Returns the number of flips.
struct RoutedAlikeLimits {
  std::function<double(int layer)> hidden;         // relative-L2 limit of layer l's hidden rows
  std::function<double(int layer)> router_logits;  // of the router logits of tokens whose inputs are alike
                                                   // (empty: not compared)
  double logits = 0;
  double max_flip_fraction = 0.1;
};

inline int expect_close_where_routed_alike(const analysis::ForwardRecord& a, const analysis::ForwardRecord& b,
                                           const RoutedAlikeLimits& lim) {
  const int n = int(a.tokens.size()), L = int(a.layers.size());
  if (b.layers.size() != a.layers.size() || b.tokens.size() != a.tokens.size() || b.logits.rows() != a.logits.rows()) {
    ADD_FAILURE() << "records of different shapes: " << a.layers.size() << " and " << b.layers.size() << " layers, "
                  << a.tokens.size() << " and " << b.tokens.size() << " tokens";
    return 0;
  }
  const auto none = [](const std::vector<bool>& keep) { return std::count(keep.begin(), keep.end(), true) == 0; };
  const auto rows = [&](const MatrixRF& m, const std::vector<bool>& keep) {
    MatrixRF out(std::count(keep.begin(), keep.end(), true), m.cols());
    for (int t = 0, i = 0; t < n; ++t)
      if (keep[size_t(t)]) out.row(i++) = m.row(t);
    return out;
  };
  std::vector<bool> inputs_alike(size_t(n), true);  // nothing up to t flipped in an earlier layer
  int flips = 0;
  for (int l = 0; l < L; ++l) {
    const auto& x = a.layers[size_t(l)], &y = b.layers[size_t(l)];
    std::vector<bool> alike = inputs_alike;
    for (int t = 0; t < n; ++t) {
      auto e = x.experts.row(t).eval(), f = y.experts.row(t).eval();
      std::sort(e.data(), e.data() + e.size());
      std::sort(f.data(), f.data() + f.size());
      if (alike[size_t(t)] && e != f) {
        alike[size_t(t)] = false;
        ++flips;
        if (!x.router_logits || !y.router_logits) {
          ADD_FAILURE() << "token " << t << ", layer " << l << ": other experts, and no router logits to explain it";
          continue;
        }
        Eigen::RowVectorXf ra = x.router_logits->row(t), rb = y.router_logits->row(t);
        const float moved = (ra - rb).cwiseAbs().maxCoeff();
        std::sort(ra.data(), ra.data() + ra.size(), std::greater<float>());
        const Eigen::Index k = x.experts.cols();
        const float gap = k < ra.size() ? ra[k - 1] - ra[k] : 0.0f;
        EXPECT_LE(gap, 2 * moved) << "token " << t << ", layer " << l << ": other experts across a routing gap of " << gap
                                  << " while its router logits moved by at most " << moved;
      }
    }
    if (lim.router_logits && x.router_logits && y.router_logits && !none(inputs_alike)) {
      EXPECT_LT(rel_l2(rows(*y.router_logits, inputs_alike), rows(*x.router_logits, inputs_alike)), lim.router_logits(l))
          << "layer " << l;
    }
    if (!none(alike)) {
      EXPECT_LT(rel_l2(rows(y.hidden, alike), rows(x.hidden, alike)), lim.hidden(l)) << "layer " << l;
    }
    // A flip at t reaches every later token in the next layer.
    bool clean = true;
    for (int t = 0; t < n; ++t) {
      clean = clean && alike[size_t(t)];
      inputs_alike[size_t(t)] = clean;
    }
    if (l == L - 1) {
      EXPECT_FALSE(none(alike)) << "no token routed alike in every layer: nothing left to compare";
      if (!none(alike)) {
        EXPECT_LT(rel_l2(rows(b.logits, alike), rows(a.logits, alike)), lim.logits);
      }
    }
  }
  EXPECT_LE(flips, std::max(1, int(lim.max_flip_fraction * n * L))) << "top-k sets that flipped";
  return flips;
}

// The record of decoding `tokens` one at a time from an empty cache (rows in token order), to compare
// with ForwardRecord::run's one prefill.
inline analysis::ForwardRecord decode_record(Engine& engine, std::span<const int32_t> tokens) {
  struct Append : Probe {
    analysis::ForwardRecord& r;
    explicit Append(analysis::ForwardRecord& rec) : r(rec) {}
    static void add(MatrixRF& m, const MatrixRF& row) {
      m.conservativeResize(m.rows() + 1, row.cols());
      m.row(m.rows() - 1) = row.row(0);
    }
    void on_layer(const LayerObservation& o) override {
      if (size_t(o.layer) >= r.layers.size()) r.layers.resize(size_t(o.layer) + 1);
      auto& l = r.layers[size_t(o.layer)];
      add(l.hidden, *o.hidden);
      if (o.router_logits) {
        if (!l.router_logits) l.router_logits = MatrixRF(0, o.router_logits->cols());
        add(*l.router_logits, *o.router_logits);
      }
      add(l.gates, *o.gates);
      l.experts.conservativeResize(l.experts.rows() + 1, o.experts->cols());
      l.experts.row(l.experts.rows() - 1) = o.experts->row(0);
    }
  };
  analysis::ForwardRecord r;
  r.tokens.assign(tokens.begin(), tokens.end());
  Append probe(r);
  engine.reset();
  for (size_t i = 0; i < tokens.size(); ++i) Append::add(r.logits, engine.forward(tokens.subspan(i, 1), &probe));
  return r;
}

}  // namespace moelab::test
