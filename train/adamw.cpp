// AdamW and gradient clipping as torch computes them in float32 (see adamw.hpp). The order of operations
// follows torch/optim/adam.py's _single_tensor_adam for a float learning rate (not capturable):
//   param *= 1 - lr*wd;  m.lerp_(g, 1-b1);  v = v*b2 + (1-b2)*g*g;
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps;  param += -(lr / (1 - b1^t)) * m / denom
// where the scalars are Python floats (double) that the float32 kernels round to float32 once.
#include "train/adamw.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace moelab::train {

std::vector<ParamView> param_views(LoraParams<float>& params) {
  std::vector<ParamView> views;
  for (auto& p : params.params()) {
    views.push_back({p.weight_name + ".lora_A", {p.a.data(), size_t(p.a.size())}, {p.grad_a.data(), size_t(p.grad_a.size())},
                     &p.has_grad});
    views.push_back({p.weight_name + ".lora_B", {p.b.data(), size_t(p.b.size())}, {p.grad_b.data(), size_t(p.grad_b.size())},
                     &p.has_grad});
  }
  return views;
}

namespace {

// torch's lerp (ATen/native/Lerp.h): the form that keeps precision depends on whether the weight is below 1/2.
inline float torch_lerp(float self, float end, float weight) {
  return std::abs(weight) < 0.5f ? self + weight * (end - self) : end - (end - self) * (1.0f - weight);
}

}  // namespace

void AdamW::step(std::span<const ParamView> params, double lr) {
  if (step_.empty()) {
    for (const auto& p : params) {
      exp_avg_.emplace_back(p.value.size(), 0.0f);
      exp_avg_sq_.emplace_back(p.value.size(), 0.0f);
      step_.push_back(0);
    }
  }
  if (params.size() != step_.size())
    throw Error(fmt::format("AdamW: {} tensors given, the optimizer state holds {}", params.size(), step_.size()));
  const float beta2 = float(cfg_.beta2);
  const float one_minus_beta1 = float(1.0 - cfg_.beta1), one_minus_beta2 = float(1.0 - cfg_.beta2);
  const float eps = float(cfg_.eps);
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamView& p = params[i];
    auto& m = exp_avg_[i];
    auto& v = exp_avg_sq_[i];
    if (p.value.size() != m.size() || p.grad.size() != m.size())
      throw Error(fmt::format("AdamW: {} has {} values and {} gradients, the optimizer state {}", p.name,
                              p.value.size(), p.grad.size(), m.size()));
    if (!p.active()) continue;  // torch: grad is None
    const int64_t t = ++step_[i];
    if (cfg_.weight_decay != 0) {
      const float decay = float(1.0 - lr * cfg_.weight_decay);
      for (float& x : p.value) x *= decay;
    }
    // Python: bias_correction1 = 1 - beta1**step, step_size = lr / bias_correction1 (all in double).
    const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t));
    const double bc2 = 1.0 - std::pow(cfg_.beta2, double(t));
    const float bc2_sqrt = float(std::pow(bc2, 0.5));
    const float neg_step_size = float(-(lr / bc1));
    for (size_t j = 0; j < m.size(); ++j) {
      const float g = p.grad[j];
      m[j] = torch_lerp(m[j], g, one_minus_beta1);
      v[j] = v[j] * beta2;
      v[j] = v[j] + one_minus_beta2 * g * g;
      const float denom = std::sqrt(v[j]) / bc2_sqrt + eps;
      p.value[j] = p.value[j] + neg_step_size * (m[j] / denom);
    }
  }
}

int64_t AdamW::steps_taken() const {
  int64_t most = 0;
  for (const int64_t t : step_) most = std::max(most, t);
  return most;
}

AdamW::State AdamW::state(std::span<const ParamView> params) const {
  State s;
  for (size_t i = 0; i < step_.size() && i < params.size(); ++i) {
    s.tensors["exp_avg." + params[i].name] = exp_avg_[i];
    s.tensors["exp_avg_sq." + params[i].name] = exp_avg_sq_[i];
    s.steps[params[i].name] = step_[i];
  }
  return s;
}

void AdamW::restore(std::span<const ParamView> params, const State& s, const std::string& where) {
  exp_avg_.clear();
  exp_avg_sq_.clear();
  step_.clear();
  if (s.steps.empty()) return;  // saved before the first step
  for (const auto& p : params) {
    const auto m = s.tensors.find("exp_avg." + p.name);
    const auto v = s.tensors.find("exp_avg_sq." + p.name);
    const auto t = s.steps.find(p.name);
    if (m == s.tensors.end() || v == s.tensors.end() || t == s.steps.end())
      throw Error(fmt::format("{}: no optimizer state for {} (a checkpoint of another adapter?)", where, p.name));
    if (m->second.size() != p.value.size() || v->second.size() != p.value.size())
      throw Error(fmt::format("{}: optimizer state for {} has {} values, the adapter {}", where, p.name,
                              m->second.size(), p.value.size()));
    // A second moment is a running mean of squares: a negative one would make sqrt(v) NaN in the next update.
    // (The reader has already refused non-finite values.) Step counts run from 0 (no gradient yet) to the step.
    for (size_t j = 0; j < v->second.size(); ++j)
      if (!(v->second[j] >= 0.0f))
        throw Error(fmt::format("{}: exp_avg_sq.{} element {} is {}; a second moment is never negative", where, p.name,
                                j, v->second[j]));
    // 0 is a tensor that has had no gradient yet (an expert no token reached): its moments are still zero.
    if (t->second < 0)
      throw Error(fmt::format("{}: optimizer step count {} for {}; a step count is never negative", where, t->second,
                              p.name));
    if (t->second == 0)
      for (size_t j = 0; j < v->second.size(); ++j)
        if (v->second[j] != 0.0f || m->second[j] != 0.0f)
          throw Error(fmt::format("{}: {} has taken no step but its moments are not zero (element {})", where,
                                  p.name, j));
    exp_avg_.push_back(m->second);
    exp_avg_sq_.push_back(v->second);
    step_.push_back(t->second);
  }
  if (s.steps.size() != params.size())
    throw Error(fmt::format("{}: optimizer state for {} tensors, the adapter has {}", where, s.steps.size(), params.size()));
}

double clip_grad_norm(std::span<const ParamView> params, double max_norm) {
  // torch: per-tensor vector_norm (float32 result), then the norm of the stacked norms. Accumulated in double
  // here; the result is rounded to float32 as torch's tensor is.
  double total_sq = 0;
  for (const auto& p : params) {
    if (!p.active()) continue;  // torch leaves out parameters whose grad is None
    double sq = 0;
    for (float g : p.grad) sq += double(g) * double(g);
    const float norm = float(std::sqrt(sq));
    total_sq += double(norm) * double(norm);
  }
  const float total = float(std::sqrt(total_sq));
  if (max_norm > 0) {
    // clip_coef = max_norm / (total_norm + 1e-6), clamped to 1, multiplied in even when it is 1.
    float coef = float(max_norm) / (total + 1e-6f);
    if (coef > 1.0f) coef = 1.0f;
    if (coef != 1.0f)
      for (const auto& p : params)
        if (p.active())
          for (float& g : p.grad) g *= coef;
  }
  return total;
}

}  // namespace moelab::train
