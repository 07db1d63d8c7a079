#pragma once
// The Engine contract (core/engine.hpp) as one parameterised suite: every engine, on every fixture model,
// through the same checks. tests/test_engine_contract.cpp instantiates it for the host engines (ref,
// ref-f64, cpu-nf4 in each activation and lm_head mode); tests/test_cuda_engine_contract.cpp for cuda-nf4
// (label "device", skipped with the reason where no GPU is present).
//
// What an engine promises, and how each promise is checked here:
//  - decode == prefill: token-by-token decoding and chunked prefill give the rows of one prefill, within
//    the engine's stated decode tolerance (EngineUnderTest::decode_tol, derived beside each engine);
//  - reset() and truncate(0) start over: the same tokens then give the same logits bit for bit (same
//    arithmetic on the same inputs; a stale KV row read by mistake would change them);
//  - truncate(position()) changes nothing (bit for bit); truncate(m) in the middle keeps m tokens and the
//    next tokens, even different ones, are computed from those m only; truncate(-1) and
//    truncate(position() + 1) are moelab::Error and leave the cache as it was;
//  - forward() past max_context() is a "context overflow" moelab::Error that leaves the cache as it was,
//    and a context beyond max_position_embeddings is refused at construction;
//  - a token id outside [0, vocab) is a moelab::Error naming the vocabulary, before any state changes;
//  - forward_tail(tokens, first) returns rows [first, n) of forward(tokens); first outside [0, n) is an
//    error that leaves the cache as it was;
//  - a Probe sees every layer once per call, in order, with tensors of the documented shapes: experts in
//    range, distinct, ranked by the router logits and the top-k of them; gates the renormalized softmax of
//    the chosen router logits (dense models: expert 0, gate 1); finite non-negative timings; on_logits
//    once, with the logits returned; and the lm_head applied to the last layer's observed hidden state
//    gives those logits;
//  - a Probe does not change the logits: bit for bit, prefill and decode.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <numeric>
#include <ostream>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/engine.hpp"
#include "core/error.hpp"
#include "fixture_util.hpp"

namespace moelab::test {

// One engine configuration under the contract, with its tolerances (each derived where it is defined).
struct EngineUnderTest {
  std::string name;  // gtest identifier characters only
  std::function<std::unique_ptr<Engine>(const Checkpoint&, int max_context)> make;
  std::function<std::string()> skip_reason = [] { return std::string(); };  // non-empty: cannot run here
  // Relative L2 between logits the engine computes for the same positions by different call shapes
  // (one prefill, token by token, chunks, recomputation after truncate, forward_tail).
  double decode_tol = 0;
  // Checked per row (false: over the whole sequence, for engines whose prefill and decode use
  // differently rounded weights, see cuda-nf4 BF16).
  bool decode_per_row = true;
  // Engines that round activations to int8 (cpu-nf4 int8, the q8 lm_head): a value that the two call
  // shapes compute a rounding apart may sit on either side of an int8 rounding boundary and take the
  // next code. Such a row may differ by up to flip_tol; at most max_flipped_rows of a call's rows may
  // (both 0 where nothing is rounded to int8). Derived beside the engines.
  double flip_tol = 0;
  double max_flipped_rows = 0;  // a fraction of the rows compared (at least one row is allowed when > 0)
  // Least fraction of (token, layer) top-k expert sets on which decode and prefill agree.
  double min_expert_agreement = 1.0;
  // Relative L2 of the returned logits against the checkpoint's FP32 lm_head applied (in float64) to
  // the final norm of the last layer's observed hidden state.
  double lm_head_tol = 0;
  // Absolute difference of each observed gate from the softmax of the observed router logits.
  double gate_tol = 0;
};

// gtest prints a parameter on failure: the engine's name, not its bytes.
inline void PrintTo(const EngineUnderTest& e, std::ostream* os) { *os << e.name; }

inline std::string contract_test_name(const ::testing::TestParamInfo<EngineUnderTest>& info) { return info.param.name; }

// Records every call's observations (copies: the engine's matrices live only during the callback).
struct ContractRecorder : Probe {
  struct Layer {
    int layer = 0;
    MatrixRF hidden, router_logits, gates;
    bool has_router_logits = false;
    MatrixRI experts;
    double attention_seconds = 0, router_seconds = 0, experts_seconds = 0;
    bool has_expert_timings = false;
    std::vector<ExpertTiming> expert_timings;
  };
  std::vector<Layer> layers;
  std::vector<MatrixRF> logits;  // one per on_logits call
  void on_layer(const LayerObservation& o) override {
    Layer l;
    l.layer = o.layer;
    if (o.hidden) l.hidden = *o.hidden;
    if (o.router_logits) l.router_logits = *o.router_logits, l.has_router_logits = true;
    if (o.experts) l.experts = *o.experts;
    if (o.gates) l.gates = *o.gates;
    l.attention_seconds = o.attention_seconds;
    l.router_seconds = o.router_seconds;
    l.experts_seconds = o.experts_seconds;
    if (o.expert_timings) l.expert_timings = *o.expert_timings, l.has_expert_timings = true;
    layers.push_back(std::move(l));
  }
  void on_logits(const MatrixRF& l, double seconds) override {
    EXPECT_TRUE(std::isfinite(seconds) && seconds >= 0) << "lm_head seconds " << seconds;
    logits.push_back(l);
  }
};

// The parameter is the engine; each test runs it on every fixture model in turn (one process per engine
// and check keeps ctest's start-up cost small).
class EngineContract : public ::testing::TestWithParam<EngineUnderTest> {
 protected:
  void SetUp() override {
    if (const std::string why = spec().skip_reason(); !why.empty()) GTEST_SKIP() << spec().name << ": " << why;
  }
  // Runs `check` on each fixture model, with ck, tokens, n, a fresh engine and its prefill set up.
  template <class F>
  void on_every_model(F&& check) {
    for (const std::string model : {"mixtral-4e-gqa-f32", "mixtral-8e-bf16-sharded", "mixtral-top1-swa", "mistral-dense"}) {
      SCOPED_TRACE(spec().name + " on " + model);
      load(model);
      if (HasFatalFailure()) return;
      check();
      if (HasFatalFailure()) return;
    }
  }
  void load(const std::string& model) {
    ck = Checkpoint::open(model_dir(model));
    tokens = read_i32(SafetensorsFile(model_dir(model) + "/expected.safetensors"), "tokens");
    n = int(tokens.size());
    ASSERT_GE(n, 10) << "the checks below split the fixture's tokens";
    engine = make();
    prefill = engine->forward(tokens);
    ASSERT_EQ(prefill.rows(), n);
    ASSERT_EQ(prefill.cols(), ck->config().vocab_size);
    ASSERT_TRUE(prefill.allFinite());
    ASSERT_EQ(engine->position(), n);
  }

  const EngineUnderTest& spec() const { return GetParam(); }
  std::unique_ptr<Engine> make(int max_context = 0) const { return spec().make(*ck, max_context); }
  std::span<const int32_t> span(int first, int count) const {
    return std::span<const int32_t>(tokens.data() + first, size_t(count));
  }
  // The logits of positions [first, first + rows) computed another way, against the one prefill.
  void expect_rows_match(const MatrixRF& got, int first, const std::string& what) const {
    ASSERT_EQ(got.cols(), prefill.cols()) << what;
    expect_close(got, prefill.middleRows(first, got.rows()), first, what);
  }
  // Rows of one quantity (logits, a layer's hidden state) for positions [first, first + rows) computed
  // by two call shapes: within decode_tol (per row or over all), or, for a few rows, within flip_tol.
  void expect_close(const MatrixRF& got, const MatrixRF& want, int first, const std::string& what) const {
    ASSERT_EQ(got.rows(), want.rows()) << what;
    if (!spec().decode_per_row) {
      EXPECT_LT(rel_l2(got, want), spec().decode_tol) << what;
      return;
    }
    int flipped = 0;
    for (Eigen::Index r = 0; r < got.rows(); ++r) {
      const double e = rel_l2(got.row(r), want.row(r));
      if (e < spec().decode_tol) continue;
      ++flipped;
      EXPECT_LT(e, spec().flip_tol) << what << ", position " << first + r << " (decode_tol " << spec().decode_tol << ")";
    }
    if (flipped > 0 && spec().max_flipped_rows > 0) {
      const double allowed = std::max(1.0, spec().max_flipped_rows * double(got.rows()));
      EXPECT_LE(flipped, allowed) << what << ": rows beyond decode_tol " << spec().decode_tol;
      flipped_rows_seen += flipped;
    }
  }
  static void expect_bitwise(const MatrixRF& got, const MatrixRF& want, const std::string& what) {
    ASSERT_EQ(got.rows(), want.rows()) << what;
    ASSERT_EQ(got.cols(), want.cols()) << what;
    EXPECT_EQ((got - want).cwiseAbs().maxCoeff(), 0.0f) << what;
  }
  // The message of the moelab::Error `f` throws ("" and a failure when it throws none or another type).
  template <class F>
  static std::string error_of(F&& f) {
    try {
      f();
    } catch (const Error& e) {
      return e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "expected moelab::Error, got " << e.what();
      return {};
    }
    ADD_FAILURE() << "expected moelab::Error, got none";
    return {};
  }

  std::unique_ptr<Checkpoint> ck;
  std::vector<int32_t> tokens;
  int n = 0;
  std::unique_ptr<Engine> engine;
  MatrixRF prefill;  // forward(tokens) on a fresh engine
  mutable int flipped_rows_seen = 0;  // rows within flip_tol but not decode_tol (reported, not asserted)

  void TearDown() override {
    if (flipped_rows_seen > 0) RecordProperty("rows_with_an_int8_flip", flipped_rows_seen);
  }
};

// Token by token (the decode path), then chunks of 5 and the rest, both against one prefill.
TEST_P(EngineContract, DecodeEqualsPrefill) {
  on_every_model([&] {
    engine->reset();
    EXPECT_EQ(engine->position(), 0);
    MatrixRF decoded(n, prefill.cols());
    for (int i = 0; i < n; ++i) {
      const MatrixRF step = engine->forward(span(i, 1));
      ASSERT_EQ(step.rows(), 1);
      decoded.row(i) = step.row(0);
      EXPECT_EQ(engine->position(), i + 1);
    }
    expect_rows_match(decoded, 0, "token by token");
    engine->reset();
    const MatrixRF a = engine->forward(span(0, 5));
    const MatrixRF b = engine->forward(span(5, n - 5));
    expect_rows_match(a, 0, "chunk [0, 5)");
    expect_rows_match(b, 5, "chunk [5, n)");
    EXPECT_EQ(engine->position(), n);
  });
}

TEST_P(EngineContract, ResetAndTruncate) {
  on_every_model([&] {
    // reset() and truncate(0): the same tokens give the same logits, bit for bit.
    engine->reset();
    EXPECT_EQ(engine->position(), 0);
    expect_bitwise(engine->forward(tokens), prefill, "after reset()");
    engine->truncate(0);
    EXPECT_EQ(engine->position(), 0);
    expect_bitwise(engine->forward(tokens), prefill, "after truncate(0)");

    // truncate(position()) is a no-op: the next chunk is what it is without the call.
    const int half = n / 2;
    engine->reset();
    engine->forward(span(0, half));
    const MatrixRF untouched = engine->forward(span(half, n - half));
    engine->reset();
    engine->forward(span(0, half));
    engine->truncate(engine->position());
    EXPECT_EQ(engine->position(), half);
    expect_bitwise(engine->forward(span(half, n - half)), untouched, "after truncate(position())");

    // truncate(m) in the middle: the rest recomputed from m cached tokens is the prefill's rows.
    for (const int m : {1, half, n - 1}) {
      SCOPED_TRACE("truncate(" + std::to_string(m) + ")");
      engine->reset();
      engine->forward(tokens);
      engine->truncate(m);
      EXPECT_EQ(engine->position(), m);
      expect_rows_match(engine->forward(span(m, n - m)), m, "recomputed after truncate");
      EXPECT_EQ(engine->position(), n);
    }
    // Different tokens after truncate(m): computed from the m kept tokens only (not from the dropped
    // ones, not appended after them): the same as a fresh engine given the first m tokens, then those.
    std::vector<int32_t> other(tokens.begin(), tokens.begin() + half);
    for (int i = half; i < n; ++i) other.push_back(int32_t((tokens[size_t(i)] * 7 + 3) % ck->config().vocab_size));
    auto fresh = make();
    const MatrixRF want = fresh->forward(other);
    engine->reset();
    engine->forward(tokens);
    engine->truncate(half);
    const MatrixRF got = engine->forward(std::span<const int32_t>(other.data() + half, other.size() - size_t(half)));
    const MatrixRF saved = prefill;
    prefill = want;  // the reference rows for expect_rows_match
    expect_rows_match(got, half, "other tokens after truncate");
    prefill = saved;

    // Out of range: an error, and the cache stays as it was.
    engine->reset();
    engine->forward(span(0, half));
    for (const int bad : {-1, half + 1, n + 5}) {
      const std::string msg = error_of([&] { engine->truncate(bad); });
      EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << "the message names the position: " << msg;
      EXPECT_EQ(engine->position(), half) << "truncate(" << bad << ")";
    }
    expect_bitwise(engine->forward(span(half, n - half)), untouched, "after refused truncates");
    engine->reset();
    error_of([&] { engine->truncate(1); });  // nothing cached: only 0 is in range
    EXPECT_EQ(engine->position(), 0);
  });
}

TEST_P(EngineContract, ContextOverflowIsAnErrorThatLeavesTheCache) {
  on_every_model([&] {
    constexpr int kContext = 8;
    ASSERT_GT(n, kContext);
    auto small = make(kContext);
    EXPECT_EQ(small->max_context(), kContext);
    EXPECT_NE(error_of([&] { small->forward(tokens); }).find("context overflow"), std::string::npos);
    EXPECT_EQ(small->position(), 0);
    expect_rows_match(small->forward(span(0, kContext)), 0, "filling the context exactly");
    EXPECT_EQ(small->position(), kContext);
    EXPECT_NE(error_of([&] { small->forward(span(kContext, 1)); }).find("context overflow"), std::string::npos);
    EXPECT_NE(error_of([&] { small->forward_tail(span(kContext, 2), 1); }).find("context overflow"), std::string::npos);
    EXPECT_EQ(small->position(), kContext);
    // Room made by truncate: the next token continues from the kept ones.
    small->truncate(kContext - 1);
    expect_rows_match(small->forward(span(kContext - 1, 1)), kContext - 1, "after truncate at a full context");
    // A context beyond the model's positions is refused when the engine is built.
    const int max_pos = ck->config().max_position_embeddings;
    EXPECT_NE(error_of([&] { make(max_pos + 1); }).find(std::to_string(max_pos)), std::string::npos);
  });
}

TEST_P(EngineContract, TokenOutsideTheVocabularyIsAnErrorBeforeAnyStateChanges) {
  on_every_model([&] {
    const int vocab = ck->config().vocab_size;
    engine->reset();
    for (const int32_t bad : {vocab, -1, vocab + 1000}) {
      const std::vector<int32_t> call{tokens[0], tokens[1], bad};
      const std::string msg = error_of([&] { engine->forward(call); });
      EXPECT_NE(msg.find("outside the vocabulary"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << msg;
      EXPECT_EQ(engine->position(), 0);
    }
    expect_bitwise(engine->forward(tokens), prefill, "after refused tokens");
    // Mid-sequence: the cached tokens stay, and the next call continues from them.
    engine->reset();
    engine->forward(span(0, 5));
    error_of([&] { engine->forward(std::vector<int32_t>{tokens[5], vocab}); });
    error_of([&] { engine->forward_tail(std::vector<int32_t>{tokens[5], -7}, 1); });
    EXPECT_EQ(engine->position(), 5);
    expect_rows_match(engine->forward(span(5, n - 5)), 5, "after a refused token mid-sequence");
  });
}

// forward_tail runs the layers as forward does (same call shape, same hidden states); only the lm_head
// may run on fewer rows, reordering its FP32 sums of hidden <= 64 terms: sqrt(64) u = 5e-7 relative per
// row, limit 1e-6 (an int8 lm_head quantizes each row on its own: the same codes, the same sums).
TEST_P(EngineContract, ForwardTailReturnsTheLastRowsOfForward) {
  on_every_model([&] {
    for (const int first : {0, n - 3, n - 1}) {
      SCOPED_TRACE("first " + std::to_string(first));
      engine->reset();
      const MatrixRF tail = engine->forward_tail(tokens, first);
      ASSERT_EQ(tail.rows(), n - first);
      ASSERT_EQ(tail.cols(), prefill.cols());
      for (int r = 0; r < n - first; ++r)
        EXPECT_LT(rel_l2(tail.row(r), prefill.row(first + r)), 1e-6) << "position " << first + r;
      EXPECT_EQ(engine->position(), n);
    }
    engine->reset();
    engine->forward(span(0, 4));
    for (const int bad : {-1, n - 4, n}) {
      const std::string msg = error_of([&] { engine->forward_tail(span(4, n - 4), bad); });
      EXPECT_NE(msg.find("forward_tail"), std::string::npos) << msg;
      EXPECT_EQ(engine->position(), 4) << "first " << bad;
    }
    expect_rows_match(engine->forward_tail(span(4, n - 4), n - 5), n - 1, "forward_tail after refused calls");
  });
}

// Every layer observed once per call, in order, with consistent contents; on_logits once.
TEST_P(EngineContract, ProbeObservationsArePresentAndConsistent) {
  on_every_model([&] {
    const ModelConfig& c = ck->config();
    engine->reset();
    ContractRecorder rec;
    const MatrixRF logits = engine->forward(tokens, &rec);
    ASSERT_EQ(int(rec.layers.size()), c.num_layers);
    ASSERT_EQ(rec.logits.size(), 1u);
    expect_bitwise(rec.logits[0], logits, "on_logits sees the returned logits");
    for (int l = 0; l < c.num_layers; ++l) {
      SCOPED_TRACE("layer " + std::to_string(l));
      const auto& o = rec.layers[size_t(l)];
      EXPECT_EQ(o.layer, l);
      ASSERT_EQ(o.hidden.rows(), n);
      ASSERT_EQ(o.hidden.cols(), c.hidden_size);
      EXPECT_TRUE(o.hidden.allFinite());
      ASSERT_EQ(o.experts.rows(), n);
      ASSERT_EQ(o.experts.cols(), c.top_k);
      ASSERT_EQ(o.gates.rows(), n);
      ASSERT_EQ(o.gates.cols(), c.top_k);
      for (const double s : {o.attention_seconds, o.router_seconds, o.experts_seconds})
        EXPECT_TRUE(std::isfinite(s) && s >= 0) << s;
      if (!c.is_moe()) {
        EXPECT_FALSE(o.has_router_logits) << "dense models have no router";
        EXPECT_EQ(o.experts.cwiseAbs().maxCoeff(), 0);
        EXPECT_EQ((o.gates.array() - 1.0f).abs().maxCoeff(), 0.0f);
        continue;
      }
      ASSERT_TRUE(o.has_router_logits);
      ASSERT_EQ(o.router_logits.rows(), n);
      ASSERT_EQ(o.router_logits.cols(), c.num_experts);
      for (int t = 0; t < n; ++t) {
        const auto lg = o.router_logits.row(t);
        std::set<int> chosen;
        double denom = 0;
        for (int j = 0; j < c.top_k; ++j) {
          const int e = o.experts(t, j);
          ASSERT_TRUE(e >= 0 && e < c.num_experts) << "token " << t << ": expert " << e;
          chosen.insert(e);
          denom += std::exp(double(lg(e)) - double(lg(o.experts(t, 0))));
        }
        // Rank order: a later choice's logit is not above an earlier one's; no unchosen expert above the last.
        for (int j = 1; j < c.top_k; ++j) EXPECT_LE(lg(o.experts(t, j)), lg(o.experts(t, j - 1))) << "token " << t;
        EXPECT_EQ(int(chosen.size()), c.top_k) << "distinct experts, token " << t;
        const float least_chosen = lg(o.experts(t, c.top_k - 1));
        for (int e = 0; e < c.num_experts; ++e) {
          if (chosen.count(e)) continue;
          EXPECT_LE(lg(e), least_chosen) << "expert " << e << " beats a chosen one, token " << t;
        }
        for (int j = 0; j < c.top_k; ++j) {
          const double want = std::exp(double(lg(o.experts(t, j))) - double(lg(o.experts(t, 0)))) / denom;
          EXPECT_NEAR(o.gates(t, j), want, spec().gate_tol) << "gate " << j << ", token " << t;
        }
      }
      if (o.has_expert_timings) {
        int routed = 0;
        std::set<int> seen;
        for (const auto& et : o.expert_timings) {
          EXPECT_TRUE(et.expert >= 0 && et.expert < c.num_experts) << et.expert;
          EXPECT_TRUE(seen.insert(et.expert).second) << "expert " << et.expert << " timed twice";
          EXPECT_GT(et.tokens, 0);
          EXPECT_TRUE(std::isfinite(et.seconds) && et.seconds >= 0);
          routed += et.tokens;
        }
        EXPECT_EQ(routed, n * c.top_k) << "every (token, choice) counted once";
      }
    }
    // The lm_head applied to the last observed hidden state gives the logits (float64 here, FP32 weights).
    const MatrixRF& h = rec.layers.back().hidden;
    const auto norm = ck->read_f32("model.norm.weight");
    const std::string head = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    MatrixRF w(c.vocab_size, c.hidden_size);
    ck->read_rows_f32(head, 0, c.vocab_size, w.data());
    MatrixRD normed(n, c.hidden_size);
    for (int t = 0; t < n; ++t) {
      const double ms = h.row(t).cast<double>().squaredNorm() / c.hidden_size;
      const double inv = 1.0 / std::sqrt(ms + c.rms_norm_eps);
      for (int i = 0; i < c.hidden_size; ++i) normed(t, i) = double(h(t, i)) * inv * double(norm[size_t(i)]);
    }
    const MatrixRD from_hidden = normed * w.cast<double>().transpose();
    EXPECT_LT(rel_l2(logits, from_hidden), spec().lm_head_tol) << "logits against lm_head(last observed hidden)";

    // Decoding with the probe: one observation per layer per call, and they agree with the prefill's.
    engine->reset();
    ContractRecorder steps;
    for (int i = 0; i < n; ++i) engine->forward(span(i, 1), &steps);
    ASSERT_EQ(int(steps.layers.size()), n * c.num_layers);
    ASSERT_EQ(int(steps.logits.size()), n);
    int agree = 0;
    for (int l = 0; l < c.num_layers; ++l) {
      MatrixRF hidden(n, c.hidden_size);
      for (int i = 0; i < n; ++i) {
        const auto& o = steps.layers[size_t(i * c.num_layers + l)];
        ASSERT_EQ(o.layer, l);
        ASSERT_EQ(o.hidden.rows(), 1);
        hidden.row(i) = o.hidden.row(0);
        std::set<int> a, b;
        for (int j = 0; j < c.top_k; ++j) a.insert(o.experts(0, j)), b.insert(rec.layers[size_t(l)].experts(i, j));
        agree += a == b;
      }
      // Hidden states carry the same rounding differences as the logits (the logits are a linear map of
      // them after a norm), so the same tolerance applies.
      expect_close(hidden, rec.layers[size_t(l)].hidden, 0, "hidden state of layer " + std::to_string(l));
    }
    EXPECT_GE(double(agree) / double(n * c.num_layers), spec().min_expert_agreement) << "decode vs prefill experts";
  });
}

// Observing must not change what is computed: the same logits bit for bit, prefill, decode and tail.
TEST_P(EngineContract, ProbeDoesNotChangeTheLogits) {
  on_every_model([&] {
    ContractRecorder rec;
    engine->reset();
    expect_bitwise(engine->forward(tokens, &rec), prefill, "prefill with a probe");
    engine->reset();
    std::vector<MatrixRF> plain;
    for (int i = 0; i < n; ++i) plain.push_back(engine->forward(span(i, 1)));
    engine->reset();
    for (int i = 0; i < n; ++i)
      expect_bitwise(engine->forward(span(i, 1), &rec), plain[size_t(i)], "decode with a probe, position " + std::to_string(i));
    engine->reset();
    const MatrixRF tail = engine->forward_tail(tokens, n - 2);
    engine->reset();
    ContractRecorder tail_rec;
    expect_bitwise(engine->forward_tail(tokens, n - 2, &tail_rec), tail, "forward_tail with a probe");
    // on_logits sees at least the rows returned (an engine may compute the lm_head for all rows).
    ASSERT_EQ(tail_rec.logits.size(), 1u);
    ASSERT_GE(tail_rec.logits[0].rows(), 2);
    expect_bitwise(tail_rec.logits[0].bottomRows(2), tail, "forward_tail's on_logits");
  });
}

}  // namespace moelab::test
