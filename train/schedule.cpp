// The lr_lambda functions of transformers/optimization.py, the same arithmetic in the same order (Python
// floats are doubles), so the factors equal transformers' bit for bit (tests/test_train_loop.cpp).
#include "train/schedule.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.hpp"

namespace moelab::train {

LrScheduleKind parse_lr_schedule(const std::string& name) {
  if (name == "linear") return LrScheduleKind::Linear;
  if (name == "cosine") return LrScheduleKind::Cosine;
  if (name == "constant") return LrScheduleKind::Constant;
  if (name == "constant_with_warmup") return LrScheduleKind::ConstantWithWarmup;
  throw Error(fmt::format("unknown learning-rate schedule '{}' (linear, cosine, constant, constant_with_warmup)", name));
}

const char* lr_schedule_name(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::Linear: return "linear";
    case LrScheduleKind::Cosine: return "cosine";
    case LrScheduleKind::Constant: return "constant";
    case LrScheduleKind::ConstantWithWarmup: return "constant_with_warmup";
  }
  return "?";
}

double LrSchedule::factor(int64_t step) const {
  const int64_t w = warmup_steps, n = total_steps;
  switch (kind) {
    case LrScheduleKind::Constant:
      return 1.0;
    case LrScheduleKind::ConstantWithWarmup:
      // float(current_step) / float(max(1.0, num_warmup_steps))
      if (step < w) return double(step) / std::max(1.0, double(w));
      return 1.0;
    case LrScheduleKind::Linear:
      if (step < w) return double(step) / double(std::max<int64_t>(1, w));
      return std::max(0.0, double(n - step) / double(std::max<int64_t>(1, n - w)));
    case LrScheduleKind::Cosine: {
      if (step < w) return double(step) / double(std::max<int64_t>(1, w));
      const double progress = double(step - w) / double(std::max<int64_t>(1, n - w));
      const double num_cycles = 0.5;
      // math.pi * float(num_cycles) * 2.0 * progress, left to right as Python evaluates it
      return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * num_cycles * 2.0 * progress)));
    }
  }
  return 1.0;
}

int64_t warmup_steps_for(int64_t warmup_steps, double warmup_ratio, int64_t total_steps) {
  if (warmup_steps > 0) return warmup_steps;
  return int64_t(std::ceil(double(total_steps) * warmup_ratio));
}

}  // namespace moelab::train
