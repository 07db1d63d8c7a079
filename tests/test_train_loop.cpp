// The training loop's numerical parts against their sources (issue 15): AdamW and clip_grad_norm_ against
// torch, the learning-rate schedules against transformers, on tests/fixtures/train/adamw/ (written by
// scripts/make_adamw_fixture.py with torch and transformers themselves).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <nlohmann/json.hpp>

#include "core/safetensors.hpp"
#include "fixture_util.hpp"
#include "train/adamw.hpp"
#include "train/schedule.hpp"

namespace moelab::train {
namespace {

using test::fixture;

std::vector<float> read_vec(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.info(name);
  std::vector<float> v(size_t(t.numel()));
  f.read_f32(t, 0, t.numel(), v.data());
  return v;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

struct Tensors {
  std::vector<std::vector<float>> value, grad;
  std::vector<ParamView> views() {
    std::vector<ParamView> v;
    for (size_t i = 0; i < value.size(); ++i) v.push_back({"t" + std::to_string(i), value[i], grad[i]});
    return v;
  }
};

// The ulp of float32 at |x| (the spacing of floats around x).
double ulp(double x) {
  const float f = std::abs(float(x));
  return double(std::nextafter(f, std::numeric_limits<float>::infinity()) - f);
}

TEST(AdamWTorch, SixStepsMatchTorch) {
  const SafetensorsFile f(fixture("train/adamw/adamw.safetensors"));
  const auto meta = read_json(fixture("train/adamw/adamw.json"));
  const int steps = meta["steps"];
  const size_t n = meta["shapes"].size();
  Tensors t;
  for (size_t i = 0; i < n; ++i) {
    t.value.push_back(read_vec(f, "param." + std::to_string(i)));
    t.grad.emplace_back(t.value.back().size());
  }
  AdamW opt({meta["beta1"], meta["beta2"], meta["eps"], meta["weight_decay"]});
  double worst_ulps = 0;
  for (int s = 0; s < steps; ++s) {
    for (size_t i = 0; i < n; ++i) t.grad[i] = read_vec(f, fmt::format("grad.{}.{}", s, i));
    const auto views = t.views();
    opt.step(views, meta["lrs"][s].get<double>());
    for (size_t i = 0; i < n; ++i) {
      const auto want = read_vec(f, fmt::format("after.{}.{}", s, i));
      for (size_t j = 0; j < want.size(); ++j) {
        // The same float32 operations in torch's order; torch's vectorized kernels may fuse a multiply-add
        // (lerp) where we round twice, one ulp of the moment per step, which the update carries at most as
        // lr * (its relative size) — far below one ulp of the parameter. So: at most 2 ulps of the
        // parameter per step taken so far.
        const double d = std::abs(double(t.value[i][j]) - double(want[j]));
        worst_ulps = std::max(worst_ulps, d / ulp(want[j]));
        ASSERT_LE(d, 2.0 * (s + 1) * ulp(want[j])) << "step " << s << " tensor " << i << " element " << j;
      }
    }
  }
  EXPECT_EQ(opt.steps_taken(), steps);
  RecordProperty("worst_ulps", std::to_string(worst_ulps));
}

// Tensors without a gradient on some steps (an expert's LoRA factors when no token was routed to it): torch
// skips them in clip_grad_norm_ and AdamW (no decay, no moment update, their own step count unchanged), on
// tests/fixtures/train/adamw/grad_none.* (scripts/make_adamw_grad_none_fixture.py, torch itself). Before,
// moelab stepped them with a zero gradient: momentum and decay moved them on steps torch leaves them alone.
// Tolerance as in SixStepsMatchTorch: 2 ulps of the parameter per step taken.
TEST(AdamWTorch, TensorsWithoutAGradientAreSkippedAsTorch) {
  const SafetensorsFile f(fixture("train/adamw/grad_none.safetensors"));
  const auto meta = read_json(fixture("train/adamw/grad_none.json"));
  const int steps = meta["steps"];
  const size_t n = meta["shapes"].size();
  std::set<std::pair<int, size_t>> no_grad;
  for (const auto& x : meta["no_grad"]) no_grad.insert({x[0].get<int>(), x[1].get<size_t>()});
  Tensors t;
  for (size_t i = 0; i < n; ++i) {
    t.value.push_back(read_vec(f, "param." + std::to_string(i)));
    t.grad.emplace_back(t.value.back().size());
  }
  const std::unique_ptr<bool[]> has(new bool[n]());  // the flags the views point at (LoraParam::has_grad)
  std::vector<ParamView> views = t.views();
  for (size_t i = 0; i < n; ++i) views[i].has_grad = &has[i];
  AdamW opt({meta["beta1"], meta["beta2"], meta["eps"], meta["weight_decay"]});
  for (int s = 0; s < steps; ++s) {
    for (size_t i = 0; i < n; ++i) {
      has[i] = !no_grad.count({s, i});
      // A tensor without a gradient gets garbage in its buffer: it must be neither counted nor used.
      if (has[i]) {
        const auto g = read_vec(f, fmt::format("grad.{}.{}", s, i));
        std::copy(g.begin(), g.end(), t.grad[i].begin());  // into the buffer the view spans
      } else {
        std::fill(t.grad[i].begin(), t.grad[i].end(), 1e3f);
      }
    }
    const double total = clip_grad_norm(views, meta["clip_max_norm"].get<double>());
    EXPECT_NEAR(total, read_vec(f, fmt::format("clip.total.{}", s))[0], 1e-6 * total) << "step " << s;
    opt.step(views, meta["lrs"][s].get<double>());
    for (size_t i = 0; i < n; ++i) {
      const auto want = read_vec(f, fmt::format("after.{}.{}", s, i));
      for (size_t j = 0; j < want.size(); ++j)
        ASSERT_LE(std::abs(double(t.value[i][j]) - double(want[j])), 2.0 * (s + 1) * ulp(want[j]))
            << "step " << s << " tensor " << i << " element " << j;
    }
  }
  // Each tensor counted its own steps: tensor 1 had none on two steps, tensor 2 on two.
  const auto st = opt.state(views);
  EXPECT_EQ(st.steps.at("t0"), steps);
  EXPECT_EQ(st.steps.at("t1"), steps - 2);
  EXPECT_EQ(st.steps.at("t2"), steps - 2);
  EXPECT_EQ(opt.steps_taken(), steps);
}

TEST(AdamWTorch, StateRoundTripContinuesIdentically) {
  // Three steps, save the state, restore it into a new optimizer, three more: equal bit for bit to six straight.
  const SafetensorsFile f(fixture("train/adamw/adamw.safetensors"));
  const auto meta = read_json(fixture("train/adamw/adamw.json"));
  const size_t n = meta["shapes"].size();
  auto init = [&] {
    Tensors t;
    for (size_t i = 0; i < n; ++i) {
      t.value.push_back(read_vec(f, "param." + std::to_string(i)));
      t.grad.emplace_back(t.value.back().size());
    }
    return t;
  };
  auto run = [&](AdamW& opt, Tensors& t, int from, int to) {
    for (int s = from; s < to; ++s) {
      for (size_t i = 0; i < n; ++i) t.grad[i] = read_vec(f, fmt::format("grad.{}.{}", s, i));
      opt.step(t.views(), meta["lrs"][s].get<double>());
    }
  };
  const AdamWConfig cfg{meta["beta1"], meta["beta2"], meta["eps"], meta["weight_decay"]};
  Tensors straight = init();
  AdamW a(cfg);
  run(a, straight, 0, 6);
  Tensors resumed = init();
  AdamW b(cfg);
  run(b, resumed, 0, 3);
  const auto saved = b.state(resumed.views());
  AdamW c(cfg);
  c.restore(resumed.views(), saved, "test");
  run(c, resumed, 3, 6);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(straight.value[i], resumed.value[i]) << "tensor " << i;
  // A state for other tensors is refused with the tensor's name.
  Tensors other = init();
  other.value[1].pop_back();
  other.grad[1].pop_back();
  AdamW d(cfg);
  try {
    d.restore(other.views(), saved, "ckpt");
    FAIL() << "a state of the wrong size was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ckpt: optimizer state for t1"), std::string::npos) << e.what();
  }
}

TEST(ClipGradNormTorch, ClipsAsTorch) {
  const SafetensorsFile f(fixture("train/adamw/adamw.safetensors"));
  const auto meta = read_json(fixture("train/adamw/adamw.json"));
  const size_t n = meta["shapes"].size();
  for (const std::string prefix : {"clip", "noclip"}) {
    Tensors t;
    for (size_t i = 0; i < n; ++i) {
      t.grad.push_back(read_vec(f, fmt::format("{}.grad.{}", prefix, i)));
      t.value.emplace_back(t.grad.back().size());
    }
    const auto before = t.grad;
    const double total = clip_grad_norm(t.views(), meta["clip_max_norm"].get<double>());
    const double want_total = read_vec(f, prefix + ".total")[0];
    // torch reduces in float32 with its own summation order; ours in double, rounded once: the two norms
    // differ by the float32 summation error of ~100 squares, well under 1e-6 relative.
    EXPECT_NEAR(total, want_total, 1e-6 * want_total) << prefix;
    for (size_t i = 0; i < n; ++i) {
      const auto want = prefix == "clip" ? read_vec(f, fmt::format("clip.clipped.{}", i)) : before[i];
      for (size_t j = 0; j < want.size(); ++j)
        // The coefficient carries the norm's relative error (1e-6) plus one rounding of the product.
        ASSERT_NEAR(t.grad[i][j], want[j], 2e-6 * std::abs(want[j]) + 1e-12) << prefix << " " << i << " " << j;
    }
    if (prefix == "clip") {
      EXPECT_GT(want_total, 1.0) << "the fixture's clip case must exceed max_norm";
    } else {
      EXPECT_EQ(t.grad, before) << "a norm below max_norm leaves gradients as they are";
    }
  }
}

TEST(LrScheduleTransformers, FactorsEqualTransformersExactly) {
  const auto meta = read_json(fixture("train/adamw/adamw.json"));
  int checked = 0;
  for (const auto& [key, factors] : meta["schedules"].items()) {
    const auto a = key.find('/'), b = key.rfind('/');
    LrSchedule s;
    s.kind = parse_lr_schedule(key.substr(0, a));
    s.warmup_steps = std::stoll(key.substr(a + 1, b - a - 1));
    s.total_steps = std::stoll(key.substr(b + 1));
    for (size_t k = 0; k < factors.size(); ++k, ++checked)
      // The same double arithmetic in the same order and glibc's cos as Python's math.cos: exact.
      ASSERT_EQ(s.factor(int64_t(k)), factors[k].get<double>()) << key << " step " << k;
  }
  EXPECT_GT(checked, 400);
}

TEST(LrScheduleTransformers, WarmupStepsAndNames) {
  EXPECT_EQ(warmup_steps_for(5, 0.5, 100), 5);   // warmup_steps wins when > 0
  EXPECT_EQ(warmup_steps_for(0, 0.03, 100), 3);  // ceil(100 * 0.03)
  EXPECT_EQ(warmup_steps_for(0, 0.1, 15), 2);    // ceil(1.5)
  EXPECT_EQ(warmup_steps_for(0, 0.0, 15), 0);
  for (const char* name : {"linear", "cosine", "constant", "constant_with_warmup"})
    EXPECT_STREQ(lr_schedule_name(parse_lr_schedule(name)), name);
  EXPECT_THROW(parse_lr_schedule("cosine_with_restarts"), Error);
}

}  // namespace
}  // namespace moelab::train
