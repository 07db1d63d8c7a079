// The QLoRA training core (train/lora_model.hpp): the loss against the reference engine, every gradient
// against central finite differences in float64, the FP32 path against float64, gradient checkpointing
// against the plain backward, the adapter round trip, and bad input.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "core/safetensors.hpp"
#include "fixture_util.hpp"
#include "optimized/cpu/quantize.hpp"
#include "reference/model.hpp"
#include "train/lora_model.hpp"
#include "train/stages.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
using train::LoraModel;
using train::LoraParams;
using train::LoraRecipe;
using train::LossOptions;
using train::TrainSequence;
using Mat64 = train::Mat<double>;

// A deterministic sequence of `n` tokens, every position after the first a target except those in `skip`.
TrainSequence make_sequence(int n, int vocab, uint32_t salt, std::vector<int> skip = {}) {
  TrainSequence s;
  uint32_t x = 2463534242u ^ salt;
  for (int t = 0; t < n; ++t) {
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;  // xorshift32
    s.tokens.push_back(int32_t(x % uint32_t(vocab)));
    s.target.push_back(t > 0 ? 1 : 0);
  }
  for (int t : skip) s.target[size_t(t)] = 0;
  return s;
}

// Cross-entropy from the reference engine's float64 logits: the independent check of the training forward.
double reference_ce(const Checkpoint& ck, const std::vector<TrainSequence>& batch) {
  ref::Model<double> model(ck);
  double sum = 0;
  int64_t count = 0;
  for (const auto& s : batch) {
    model.reset();
    const auto logits = model.forward_native(s.tokens);
    for (size_t t = 1; t < s.tokens.size(); ++t) {
      if (!s.target[t]) continue;
      const auto row = logits.row(Eigen::Index(t - 1));
      const double mx = row.maxCoeff();
      sum += mx + std::log((row.array() - mx).exp().sum()) - row(s.tokens[t]);
      ++count;
    }
  }
  return sum / double(count);
}

TEST(TrainLoss, FreshAdapterEqualsReferenceOnFloatWeights) {
  for (const char* name : {"mixtral-4e-gqa-f32", "mixtral-top1-swa", "mistral-dense"}) {
    SCOPED_TRACE(name);
    const auto ck = Checkpoint::open(model_dir(name));
    const auto& cfg = ck->config();
    const std::vector<TrainSequence> batch = {make_sequence(12, cfg.vocab_size, 1, {3, 4}), make_sequence(7, cfg.vocab_size, 2)};
    LoraModel<double> model(*ck, {.nf4 = false});
    LoraRecipe recipe;
    recipe.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
    const auto params = LoraParams<double>::init(cfg, recipe, 7);
    const auto r = model.loss(batch, params, {});
    // Same math in float64 with different summation orders: ~1e-15 per op, 1e-12 allows the depth.
    EXPECT_NEAR(r.ce, reference_ce(*ck, batch), 1e-12 * std::abs(r.ce));
    EXPECT_EQ(r.targets, 11 - 2 + 6);
  }
}

// Every Linear moelab adapts, by peft's target names.
std::vector<std::string> all_targets(const ModelConfig& cfg) {
  if (cfg.is_moe()) return {"q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"};
  return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
}

LoraRecipe full_recipe(const ModelConfig& cfg) {
  LoraRecipe r;
  r.rank = 4;
  r.alpha = 8;
  r.target_modules = all_targets(cfg);
  return r;
}

// Factors as after some training: A from init, B nonzero (uniform ±0.1), so both factors' gradients are
// nonzero and the LoRA term moves the loss.
template <typename S>
LoraParams<S> trained_params(const ModelConfig& cfg, uint64_t seed) {
  auto p = LoraParams<S>::init(cfg, full_recipe(cfg), seed);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& m : p.params())
    for (Eigen::Index i = 0; i < m.b.size(); ++i) {
      x ^= x << 13; x ^= x >> 7; x ^= x << 17;  // xorshift64
      m.b.data()[i] = S(float((double(x >> 11) / double(1ull << 53) - 0.5) * 0.2));
    }
  return p;
}

std::vector<TrainSequence> fd_batch(const ModelConfig& cfg) {
  // Two sequences of different lengths, some positions not targets; longer than the fixture's sliding
  // window (4) so the window masks keys.
  return {make_sequence(11, cfg.vocab_size, 11, {2, 5, 6}), make_sequence(6, cfg.vocab_size, 12, {1})};
}

struct FdCase {
  const char* model;
  double aux_coef;
  double dropout;
};

// Central differences in float64 against loss_and_grad's gradient, for sampled entries of every factor of
// every adapted weight.
//
// Step and tolerance: h = 1e-5 on entries of size ~0.1. The central difference's truncation error is
// h^2 |f'''| / 6 ~ 2e-11 |f'''|, its rounding error ~ eps |f| / h = 2.2e-16 * 6.3 / 1e-5 ~ 1.4e-10 (the loss is
// ~ln 512 = 6.2), so for |f'''| up to ~10 the difference is good to ~3e-10 absolute. We allow
// 1e-8 + 1e-6 |g|: 30x that absolute error, and a relative term far below what a wrong stage gives (a sign or
// a factor error is an O(1) relative error on the affected gradients).
// Routing is piecewise: a step that flipped a top-k choice would jump the loss. Each difference is checked
// to be smooth: |f(+h) + f(-h) - 2 f(0)| = h^2 |f''| (~1e-10 |f''|) must stay below 1e-8, which a flip
// (a jump of ~|gate| * |expert output| >> 1e-8) cannot.
void check_gradients_fd(const FdCase& c) {
  SCOPED_TRACE(::testing::Message() << c.model << " aux " << c.aux_coef << " dropout " << c.dropout);
  const auto ck = Checkpoint::open(model_dir(c.model));
  const auto& cfg = ck->config();
  // NF4 base, as training runs; one thread: hundreds of tiny evaluations, where threads would only wait.
  LoraModel<double> model(*ck, {}, 1);
  const auto batch = fd_batch(cfg);
  LossOptions opt;
  opt.router_aux_coef = c.aux_coef;
  opt.lora_dropout = c.dropout;
  opt.dropout_seed = 99;
  auto params = trained_params<double>(cfg, 5);
  params.zero_grad();
  const auto r = model.loss_and_grad(batch, params, opt);
  ASSERT_TRUE(std::isfinite(r.loss));
  if (c.aux_coef != 0) {
    EXPECT_GT(r.aux, 0);
  }
  // The loss with the same dropout masks (loss() turns dropout off, so evaluate through loss_and_grad).
  auto probe = params;
  const auto f = [&]() {
    probe.zero_grad();
    return model.loss_and_grad(batch, probe, opt).loss;
  };
  const double f0 = f();
  ASSERT_EQ(f0, r.loss);
  const double h = 1e-5;
  int checked = 0;
  double worst = 0;
  std::set<std::string> kinds_seen;
  for (size_t m = 0; m < params.params().size(); ++m) {
    const auto& name = params.params()[m].weight_name;
    for (int which = 0; which < 2; ++which) {  // 0: A, 1: B
      const auto& g = which == 0 ? params.params()[m].grad_a : params.params()[m].grad_b;
      const Eigen::Index n = g.size();
      // Three entries per factor: first, middle, last (all entries would be slower, not more telling).
      for (Eigen::Index i : {Eigen::Index(0), n / 2, n - 1}) {
        double& v = (which == 0 ? probe.params()[m].a : probe.params()[m].b).data()[i];
        const double saved = v;
        v = saved + h;
        const double fp = f();
        v = saved - h;
        const double fm = f();
        v = saved;
        const double fd = (fp - fm) / (2 * h);
        const double an = g.data()[i];
        ASSERT_LT(std::abs(fp + fm - 2 * f0), 1e-8) << name << (which ? " B" : " A") << "[" << i << "]: not smooth here";
        EXPECT_NEAR(fd, an, 1e-8 + 1e-6 * std::abs(an)) << name << (which ? " B" : " A") << "[" << i << "]";
        worst = std::max(worst, std::abs(fd - an));
        ++checked;
      }
    }
    const std::string module = name.substr(0, name.size() - 7);  // without ".weight"
    kinds_seen.insert(module.substr(module.rfind('.') + 1));
  }
  const size_t kinds = cfg.is_moe() ? 8 : 7;
  EXPECT_EQ(kinds_seen.size(), kinds);
  std::printf("  %s aux %g dropout %g: %d entries, largest |fd - grad| %.2e\n", c.model, c.aux_coef, c.dropout, checked, worst);
}

TEST(TrainGrad, FiniteDifferencesTop2Gqa) { check_gradients_fd({"mixtral-4e-gqa-f32", 0.0, 0.0}); }
TEST(TrainGrad, FiniteDifferencesTop2GqaAux) { check_gradients_fd({"mixtral-4e-gqa-f32", 0.02, 0.0}); }
TEST(TrainGrad, FiniteDifferencesTop2GqaDropout) { check_gradients_fd({"mixtral-4e-gqa-f32", 0.02, 0.1}); }
TEST(TrainGrad, FiniteDifferencesTop1SlidingWindow) { check_gradients_fd({"mixtral-top1-swa", 0.0, 0.0}); }
TEST(TrainGrad, FiniteDifferencesTop1SlidingWindowAux) { check_gradients_fd({"mixtral-top1-swa", 0.5, 0.0}); }
TEST(TrainGrad, FiniteDifferencesDense) { check_gradients_fd({"mistral-dense", 0.0, 0.1}); }


// A temporary folder removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / fmt::format("moelab-train-{}-{}", tag, ::getpid());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

// The NF4 base: the loss equals the reference engine's on the checkpoint's NF4 round trip
// (write_dequantized_checkpoint, the same bitsandbytes rules by the cpu engine's writer), with and without
// the router's auxiliary loss, which is recomputed here from the reference's router logits as transformers'
// load_balancing_loss_func does (softmax, top-k one-hot mean times mean probability, times experts).
// Tolerance: ce in float64 on both sides, 1e-12 relative as above; aux from the probe's FP32 router logits
// (rounded to float32: ~6e-8 relative per logit), so 1e-6 relative.
TEST(TrainLoss, Nf4BaseEqualsReferenceOnDequantizedWeights) {
  const auto ck = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
  const auto& cfg = ck->config();
  TempDir tmp("nf4ref");
  cpu::write_dequantized_checkpoint(*ck, tmp.path.string(), 64, true);
  const auto deq = Checkpoint::open(tmp.path.string());
  const std::vector<TrainSequence> batch = {make_sequence(13, cfg.vocab_size, 3, {7}), make_sequence(9, cfg.vocab_size, 4)};
  LoraModel<double> model(*ck);
  LossOptions opt;
  opt.router_aux_coef = 0.02;
  const auto params = LoraParams<double>::init(cfg, full_recipe(cfg), 3);
  const auto r = model.loss(batch, params, opt);
  EXPECT_NEAR(r.ce, reference_ce(*deq, batch), 1e-12 * r.ce);

  struct Logits : Probe {
    std::vector<MatrixRF> layers;
    void on_layer(const LayerObservation& o) override { layers.push_back(*o.router_logits); }
  } probe;
  ref::Model<double> ref(*deq);
  for (const auto& s : batch) {
    ref.reset();
    ref.forward(s.tokens, &probe);
  }
  const int E = cfg.num_experts;
  std::vector<double> frac(size_t(E), 0), prob(size_t(E), 0);
  double N = 0;
  for (const auto& m : probe.layers)
    for (Eigen::Index t = 0; t < m.rows(); ++t) {
      Eigen::RowVectorXd p = m.row(t).cast<double>();
      p = (p.array() - p.maxCoeff()).exp();
      p /= p.sum();
      std::vector<int> order(static_cast<size_t>(E));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
      for (int j = 0; j < cfg.top_k; ++j) frac[size_t(order[size_t(j)])] += 1;
      for (int e = 0; e < E; ++e) prob[size_t(e)] += p[e];
      N += 1;
    }
  double aux = 0;
  for (int e = 0; e < E; ++e) aux += frac[size_t(e)] / N * prob[size_t(e)] / N;
  aux *= E;
  EXPECT_NEAR(r.aux, aux, 1e-6 * aux);
  EXPECT_NEAR(r.loss, r.ce + 0.02 * r.aux, 1e-15 * r.loss);
}

// The float32 path against float64 on the same factors and NF4 weights (float32 values, exact in both), with
// the float layers dequantized whole and streamed through the products a tile at a time (what Mixtral-sized
// layers get; forced here on the small fixtures).
// Tolerance: float32 carries ~6e-8 relative per rounding; through 2-3 layers, softmaxes and ~100-term dot
// products the measured errors are at most 7e-8 relative on the loss and 3.1e-6 relative L2 on a gradient
// tensor (fixtures, this batch); we allow 1e-6 and 1e-4 (>= 14x and 30x), while a wrong stage is O(1) off.
TEST(TrainGrad, Float32MatchesFloat64) {
  using Nf4Layers = train::BaseOptions::Nf4Layers;
  for (const char* name : {"mixtral-4e-gqa-f32", "mixtral-top1-swa", "mistral-dense"})
   for (const Nf4Layers layers : {Nf4Layers::Dequantized, Nf4Layers::Streamed}) {
    SCOPED_TRACE(::testing::Message() << name << (layers == Nf4Layers::Streamed ? ", streamed" : ", dequantized"));
    const auto ck = Checkpoint::open(model_dir(name));
    const auto& cfg = ck->config();
    const auto batch = fd_batch(cfg);
    LossOptions opt;
    opt.router_aux_coef = 0.02;
    opt.lora_dropout = 0.1;
    opt.dropout_seed = 4;
    auto p64 = trained_params<double>(cfg, 8);
    auto p32 = trained_params<float>(cfg, 8);
    LoraModel<double> m64(*ck);
    LoraModel<float> m32(*ck, {.nf4_layers = layers});
    const auto r64 = m64.loss_and_grad(batch, p64, opt);
    const auto r32 = m32.loss_and_grad(batch, p32, opt);
    EXPECT_NEAR(r32.loss, r64.loss, 1e-6 * r64.loss);
    EXPECT_NEAR(r32.aux, r64.aux, 1e-6 * r64.aux);
    double worst = 0;
    for (size_t i = 0; i < p64.params().size(); ++i) {
      const auto& a = p64.params()[i];
      const auto& b = p32.params()[i];
      ASSERT_EQ(a.weight_name, b.weight_name);
      for (const auto& [g64, g32] : {std::pair{&a.grad_a, &b.grad_a}, std::pair{&a.grad_b, &b.grad_b}}) {
        const double norm = g64->norm();
        if (norm == 0) {  // a top-1 router without the aux loss: no gradient at all
          EXPECT_EQ(g32->norm(), 0);
          continue;
        }
        const double rel = (g32->template cast<double>() - *g64).norm() / norm;
        worst = std::max(worst, rel);
        EXPECT_LT(rel, 1e-4) << a.weight_name;
      }
    }
    std::printf("  %s, %s: loss %.3e relative, largest gradient %.2e relative L2\n", name,
                layers == Nf4Layers::Streamed ? "streamed" : "dequantized", std::abs(r32.loss - r64.loss) / r64.loss,
                worst);
  }
}

// An expert no token reaches gets no gradient: has_grad stays false (torch: its grad is None, and AdamW skips
// it; tests/test_train_loop.cpp) and its gradients stay zero; only experts' factors can be left out, and each
// layer's reached expert has them. Two tokens, top-1 routing: at most two of each layer's experts are reached.
TEST(TrainGrad, UnroutedExpertsHaveNoGradient) {
  const auto ck = Checkpoint::open(model_dir("mixtral-top1-swa"));
  const auto& cfg = ck->config();
  ASSERT_EQ(cfg.top_k, 1);
  ASSERT_GE(cfg.num_experts, 3);
  LoraModel<float> model(*ck);
  auto params = trained_params<float>(cfg, 3);
  const std::vector<TrainSequence> batch = {make_sequence(2, cfg.vocab_size, 5)};
  model.loss_and_grad(batch, params, {});
  int without = 0;
  std::vector<int> reached_w2(size_t(cfg.num_layers), 0);
  for (const auto& p : params.params()) {
    if (!p.has_grad) {
      ++without;
      EXPECT_TRUE(p.grad_a.isZero(0) && p.grad_b.isZero(0)) << p.weight_name;
      EXPECT_NE(p.weight_name.find(".experts."), std::string::npos) << p.weight_name;
    }
    for (int l = 0; l < cfg.num_layers; ++l)
      for (int e = 0; e < cfg.num_experts; ++e)
        if (p.has_grad && p.weight_name == cfg.w2_name(l, e)) ++reached_w2[size_t(l)];
  }
  EXPECT_GE(without, 3 * (cfg.num_experts - 2) * cfg.num_layers);  // w1, w2, w3 of each unreached expert
  for (int l = 0; l < cfg.num_layers; ++l) {
    EXPECT_GE(reached_w2[size_t(l)], 1) << "layer " << l;
    EXPECT_LE(reached_w2[size_t(l)], 2) << "layer " << l;
  }
  params.zero_grad();
  for (const auto& p : params.params()) EXPECT_FALSE(p.has_grad) << p.weight_name;
}

// Gradient checkpointing recomputes each layer in the backward with the same code, masks and routing:
// the loss and every gradient are equal bit for bit.
TEST(TrainGrad, CheckpointingIsBitIdentical) {
  for (const char* name : {"mixtral-4e-gqa-f32", "mixtral-top1-swa", "mistral-dense"}) {
    SCOPED_TRACE(name);
    const auto ck = Checkpoint::open(model_dir(name));
    const auto& cfg = ck->config();
    const auto batch = fd_batch(cfg);
    LoraModel<float> model(*ck);
    LossOptions opt;
    opt.router_aux_coef = 0.02;
    opt.lora_dropout = 0.1;
    opt.dropout_seed = 21;
    auto plain = trained_params<float>(cfg, 9);
    auto ckpt = plain;
    const auto r1 = model.loss_and_grad(batch, plain, opt);
    opt.gradient_checkpointing = true;
    const auto r2 = model.loss_and_grad(batch, ckpt, opt);
    EXPECT_EQ(r1.loss, r2.loss);
    EXPECT_EQ(r1.aux, r2.aux);
    for (size_t i = 0; i < plain.params().size(); ++i) {
      EXPECT_TRUE(plain.params()[i].grad_a == ckpt.params()[i].grad_a) << plain.params()[i].weight_name;
      EXPECT_TRUE(plain.params()[i].grad_b == ckpt.params()[i].grad_b) << plain.params()[i].weight_name;
    }
  }
}

// Gradients accumulate (+=), and a normalizer spreads one batch's mean over micro-batches: two halves
// with the whole batch's target count give the whole batch's gradient (to float64 rounding).
TEST(TrainGrad, AccumulationOverMicroBatches) {
  const auto ck = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
  const auto& cfg = ck->config();
  const auto batch = fd_batch(cfg);
  LoraModel<double> model(*ck);
  auto whole = trained_params<double>(cfg, 2);
  auto parts = whole;
  const auto r = model.loss_and_grad(batch, whole, {});
  const auto r1 = model.loss_and_grad(std::span(batch).first(1), parts, {}, r.targets);
  const auto r2 = model.loss_and_grad(std::span(batch).last(1), parts, {}, r.targets);
  EXPECT_EQ(r1.targets + r2.targets, r.targets);
  EXPECT_NEAR(r1.ce + r2.ce, r.ce, 1e-13 * r.ce);
  for (size_t i = 0; i < whole.params().size(); ++i) {
    const auto& a = whole.params()[i];
    const auto& b = parts.params()[i];
    EXPECT_LE((a.grad_a - b.grad_a).norm(), 1e-12 * (a.grad_a.norm() + 1e-30)) << a.weight_name;
    EXPECT_LE((a.grad_b - b.grad_b).norm(), 1e-12 * (a.grad_b.norm() + 1e-30)) << a.weight_name;
  }
  parts.zero_grad();
  for (const auto& p : parts.params()) EXPECT_EQ(p.grad_a.norm() + p.grad_b.norm(), 0);
}

// save() writes what peft writes and core/lora.cpp reads back: the factors equal bit for bit, the scale
// and targets as given, no temporary files left behind.
TEST(TrainParams, SaveLoadRoundTrip) {
  for (const char* name : {"mixtral-4e-gqa-f32", "mistral-dense"}) {
    SCOPED_TRACE(name);
    const auto ck = Checkpoint::open(model_dir(name));
    const auto& cfg = ck->config();
    auto recipe = full_recipe(cfg);
    recipe.use_rslora = true;
    auto params = LoraParams<float>::init(cfg, recipe, 1);
    params = trained_params<float>(cfg, 1);  // nonzero B
    for (auto& p : params.params()) p.scale = float(recipe.scale());
    TempDir tmp("save");
    params.save(tmp.path.string(), recipe, model_dir(name));
    const auto adapter = LoraAdapter::load(tmp.path.string(), cfg);
    EXPECT_TRUE(adapter->use_rslora());
    const auto back = LoraParams<float>::from_adapter(*adapter);
    ASSERT_EQ(back.params().size(), params.params().size());
    for (size_t i = 0; i < params.params().size(); ++i) {
      const auto& a = params.params()[i];
      const auto& b = back.params()[i];
      EXPECT_EQ(a.weight_name, b.weight_name);
      EXPECT_EQ(a.scale, b.scale);
      EXPECT_TRUE(a.a == b.a) << a.weight_name;
      EXPECT_TRUE(a.b == b.b) << a.weight_name;
    }
    EXPECT_EQ(params.parameter_count(), adapter->parameter_count());
    int files = 0;
    for (const auto& e : fs::directory_iterator(tmp.path)) {
      (void)e;
      ++files;
    }
    EXPECT_EQ(files, 2);
  }
}

// Targets as peft matches them: "gate" is the router alone (not gate_proj), "w1" every expert's w1.
TEST(TrainParams, TargetsMatchAsPeft) {
  const auto ck = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
  const auto& cfg = ck->config();
  LoraRecipe r;
  r.target_modules = {"gate", "w1"};
  const auto p = LoraParams<float>::init(cfg, r, 0);
  EXPECT_EQ(int(p.params().size()), cfg.num_layers * (1 + cfg.num_experts));
  EXPECT_NE(p.find(cfg.router_name(0)), nullptr);
  EXPECT_NE(p.find(cfg.w1_name(1, 3)), nullptr);
  EXPECT_EQ(p.find(cfg.w3_name(1, 3)), nullptr);
  for (const auto& m : p.params()) {
    EXPECT_EQ(m.b.norm(), 0);  // B starts at zero: a fresh adapter leaves the model unchanged
    EXPECT_LE(m.a.cwiseAbs().maxCoeff(), 1 / std::sqrt(double(m.a.cols())));
  }
  r.target_modules = {"gate_proj"};
  EXPECT_THROW(LoraParams<float>::init(cfg, r, 0), Error);
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(TrainLoss, BadInputIsAnError) {
  const auto ck = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
  const auto& cfg = ck->config();
  LoraModel<float> model(*ck);
  auto params = LoraParams<float>::init(cfg, {}, 0);
  const auto run = [&](std::vector<TrainSequence> batch) { return error_of([&] { model.loss_and_grad(batch, params, {}); }); };
  auto bad = make_sequence(8, cfg.vocab_size, 1);
  bad.tokens[5] = cfg.vocab_size;
  EXPECT_NE(run({bad}).find("token 5: id 512 outside the vocabulary of 512"), std::string::npos) << run({bad});
  bad = make_sequence(8, cfg.vocab_size, 1);
  bad.tokens[2] = -1;
  EXPECT_NE(run({bad}).find("id -1 outside the vocabulary"), std::string::npos);
  bad = make_sequence(8, cfg.vocab_size, 1);
  bad.target.pop_back();
  EXPECT_NE(run({bad}).find("7 target flags for 8 tokens"), std::string::npos) << run({bad});
  EXPECT_NE(run({}).find("batch is empty"), std::string::npos);
  EXPECT_NE(run({TrainSequence{}}).find("has no tokens"), std::string::npos);
  bad = make_sequence(8, cfg.vocab_size, 1);
  std::fill(bad.target.begin(), bad.target.end(), 0);
  EXPECT_NE(run({bad}).find("no target tokens"), std::string::npos);
  bad = make_sequence(cfg.max_position_embeddings + 1, cfg.vocab_size, 1);
  EXPECT_NE(run({bad}).find("more than max_position_embeddings"), std::string::npos);
  // Factors that fit no weight of this model.
  auto wrong = LoraParams<float>::init(cfg, {}, 0);
  wrong.params()[0].a.resize(8, 3);
  const auto good = make_sequence(8, cfg.vocab_size, 1);
  EXPECT_NE(error_of([&] { model.loss_and_grad(std::span(&good, 1), wrong, {}); }).find("LoRA factors for"), std::string::npos);
  LossOptions opt;
  opt.lora_dropout = 1;
  EXPECT_NE(error_of([&] { model.loss_and_grad(std::span(&good, 1), params, opt); }).find("dropout 1 is outside"), std::string::npos);
}

// The bundled model (hidden 128, 4 layers, 8 experts, vocab 4096), one 256-token sequence in FP32: the
// forward + backward runs, and its time is printed (measured, not asserted: the machine's load decides it).
// The loss of a fresh adapter is the base model's, which on random tokens is near ln(4096) = 8.3 or above.
TEST(TrainSpeed, BundledModelForwardBackward) {
  const auto ck = Checkpoint::open(MOELAB_BUNDLED_MODEL);
  const auto& cfg = ck->config();
  LoraModel<float> model(*ck);
  auto params = LoraParams<float>::init(cfg, full_recipe(cfg), 1);
  const std::vector<TrainSequence> batch = {make_sequence(256, cfg.vocab_size, 77)};
  LossOptions opt;
  opt.router_aux_coef = 0.02;
  opt.lora_dropout = 0.05;
  LoraModel<float> one_thread(*ck, {}, 1);
  for (int variant = 0; variant < 3; ++variant) {
    // 0, 1: the physical cores (without and with checkpointing); 2: one thread.
    const bool checkpointing = variant == 1;
    opt.gradient_checkpointing = checkpointing;
    LoraModel<float>& m = variant == 2 ? one_thread : model;
    params.zero_grad();
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = m.loss_and_grad(batch, params, opt);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_TRUE(std::isfinite(r.loss));
    EXPECT_GT(r.ce, 5.0);
    EXPECT_EQ(r.targets, 255);
    double g = 0;
    for (const auto& p : params.params()) g += double(p.grad_b.squaredNorm());
    EXPECT_GT(g, 0);  // B = 0: only B's gradient is nonzero at the first step
    std::printf("  bundled model, 256 tokens, all modules r=4%s: forward + backward %.3f s (%d threads, BLAS %s)\n",
                checkpointing ? ", gradient checkpointing" : "", s, m.threads(), train::Products::blas_kernels().c_str());
  }
}

// LoRA dropout as nn.Dropout: a fraction p of the LoRA branch's inputs zeroed, the rest scaled by
// 1/(1-p); the same stream gives the same mask, another stream another one. 64 x 256 draws: the zero
// fraction's standard deviation is sqrt(p(1-p)/16384) = 0.0023 at p = 0.1; 5 sigma allowed.
TEST(TrainGrad, DropoutMaskIsNnDropout) {
  const double p = 0.1;
  Mat64 x = Mat64::Ones(64, 256), w = Mat64::Zero(8, 256);
  train::LoraParam<double> lora;
  lora.a = Mat64::Ones(2, 256);
  lora.b = Mat64::Ones(8, 2);
  lora.scale = 1;
  train::stage::LinearCache<double> c1, c2, c3;
  const train::Products mm(1);
  train::stage::linear_forward<double>(mm, x, w, &lora, {p, 5}, &c1);
  train::stage::linear_forward<double>(mm, x, w, &lora, {p, 5}, &c2);
  train::stage::linear_forward<double>(mm, x, w, &lora, {p, 6}, &c3);
  const double zeros = double((c1.keep.array() == 0).count()) / double(c1.keep.size());
  EXPECT_NEAR(zeros, p, 5 * std::sqrt(p * (1 - p) / double(c1.keep.size())));
  EXPECT_TRUE(((c1.keep.array() == 0) || (c1.keep.array() == 1 / (1 - p))).all());
  EXPECT_TRUE(c1.keep == c2.keep);
  EXPECT_FALSE(c1.keep == c3.keep);
  EXPECT_TRUE(c1.xd == x.cwiseProduct(c1.keep));
}

// The mask loop compares integer draws against first_kept_draw(p) and splits the rows over the pool; the
// mask must be the definition's, double(draw) < p · 2^64 per element, on any thread count. 300 x 128 floats
// take the parallel path; p from tiny to 0.9.
TEST(TrainGrad, DropoutMaskIsItsDefinitionOnAnyThreadCount) {
  std::mt19937_64 gen(3);
  std::normal_distribution<float> normal;
  train::Mat<float> x(300, 128), w = train::Mat<float>::Zero(8, 128);
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  train::LoraParam<float> lora;
  lora.a = train::Mat<float>::Ones(2, 128);
  lora.b = train::Mat<float>::Ones(8, 2);
  lora.scale = 1;
  const train::Products one(1), three(3);
  for (const double p : {1e-12, 0.05, 0.1, 0.5, 0.9}) {
    SCOPED_TRACE(::testing::Message() << "p " << p);
    const uint64_t v0 = train::stage::first_kept_draw(p);
    const double threshold = p * 18446744073709551616.0;
    EXPECT_GE(double(v0), threshold);                 // v0 is kept ...
    if (v0 > 0) EXPECT_LT(double(v0 - 1), threshold);  // ... and the draw below it is dropped
    train::stage::Dropout d;
    d.p = p;
    d.ranges = {{0, 100, 11}, {100, -1, 12}};
    train::stage::LinearCache<float> c1, c3;
    train::stage::linear_forward<float>(one, x, w, &lora, d, &c1);
    train::stage::linear_forward<float>(three, x, w, &lora, d, &c3);
    EXPECT_TRUE(c1.keep == c3.keep);
    EXPECT_TRUE(c1.xd == c3.xd);
    int64_t wrong = 0;
    for (int64_t r = 0; r < x.rows(); ++r) {
      const uint64_t base = train::stage::mix(r < 100 ? 11 : 12);
      const int64_t r0 = r < 100 ? 0 : 100;
      for (int64_t j = 0; j < x.cols(); ++j) {
        const uint64_t draw = train::stage::mix(base + uint64_t((r - r0) * x.cols() + j) * 0x9E3779B97F4A7C15ull);
        const float expected = double(draw) < threshold ? 0.0f : 1.0f / float(1 - p);
        wrong += c1.keep(r, j) != expected || c1.xd(r, j) != x(r, j) * expected;
      }
    }
    EXPECT_EQ(wrong, 0);
  }
}

// A batch's sequences are stacked into one matrix (train/lora_model.cpp); each one's rows take their mask
// from its own stream, counted from its first row: the same mask as the sequence alone, so stacking does
// not change what training computes. Ranges that miss a row are an error, not an unmasked row.
TEST(TrainGrad, DropoutRangesGiveEachSequenceItsOwnMask) {
  const double p = 0.25;
  const Mat64 x = Mat64::Ones(10, 32), w = Mat64::Zero(4, 32);
  train::LoraParam<double> lora;
  lora.a = Mat64::Ones(2, 32);
  lora.b = Mat64::Ones(4, 2);
  lora.scale = 1;
  const train::Products mm(1);
  train::stage::LinearCache<double> stacked, first, second;
  train::stage::Dropout d;
  d.p = p;
  d.ranges = {{0, 6, 7}, {6, 4, 8}};
  train::stage::linear_forward<double>(mm, x, w, &lora, d, &stacked);
  train::stage::linear_forward<double>(mm, Mat64(x.topRows(6)), w, &lora, {p, 7}, &first);
  train::stage::linear_forward<double>(mm, Mat64(x.bottomRows(4)), w, &lora, {p, 8}, &second);
  EXPECT_TRUE(stacked.keep.topRows(6) == first.keep);
  EXPECT_TRUE(stacked.keep.bottomRows(4) == second.keep);
  EXPECT_FALSE(stacked.keep.topRows(4) == second.keep);  // another stream, another mask
  d.ranges = {{0, 6, 7}};
  EXPECT_THROW(train::stage::linear_forward<double>(mm, x, w, &lora, d, &stacked), std::logic_error);
}

// A pre-quantized checkpoint (transformers + bitsandbytes' own 4-bit file) is read with its NF4 codes:
// a fresh adapter's loss equals the cross-entropy of the logits transformers computed with that model
// (tests/fixtures/models/mixtral-4e-bnb-nf4/expected.safetensors, FP32). Tolerance: cpu-nf4 reading the
// same file matches those logits to 9e-7 relative L2 (test_cpu_engine.cpp), float32 rounding on
// transformers' side; the cross-entropy inherits about that, so 1e-5 relative. A weight left unquantized
// or decoded with another block or scale moves it by NF4's own error (0.57 relative L2 on the logits).
TEST(TrainLoss, PrequantizedCheckpointEqualsTransformersNf4) {
  const auto ck = Checkpoint::open(model_dir("mixtral-4e-bnb-nf4"));
  ASSERT_TRUE(ck->config().quantization.nf4);
  const SafetensorsFile expected(model_dir("mixtral-4e-bnb-nf4") + "/expected.safetensors");
  TrainSequence s;
  s.tokens = read_i32(expected, "tokens");
  s.target.assign(s.tokens.size(), 1);
  const MatrixRF logits = read_matrix_f32(expected, "logits");
  double want = 0;
  for (size_t t = 1; t < s.tokens.size(); ++t) {
    const Eigen::RowVectorXd row = logits.row(Eigen::Index(t - 1)).cast<double>();
    const double mx = row.maxCoeff();
    want += mx + std::log((row.array() - mx).exp().sum()) - row(s.tokens[t]);
  }
  want /= double(s.tokens.size() - 1);
  LoraModel<double> model(*ck);
  const auto params = LoraParams<double>::init(ck->config(), full_recipe(ck->config()), 1);
  const auto r = model.loss(std::span(&s, 1), params, {});
  EXPECT_NEAR(r.ce, want, 1e-5 * want);
  std::printf("  pre-quantized: ce %.9f, from transformers' logits %.9f\n", r.ce, want);
  EXPECT_THROW(LoraModel<double>(*ck, {.nf4 = false}), Error);
}

}  // namespace
}  // namespace moelab::test
