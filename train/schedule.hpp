#pragma once
// Learning-rate schedules as transformers' get_scheduler builds them (transformers/optimization.py): a
// multiplier of the base learning rate for each optimizer step, linear warmup from 0 first. Step k (0-based)
// of the optimizer runs at base_lr * factor(k), as torch's LambdaLR gives it before its k-th scheduler.step().
#include <cstdint>
#include <string>

namespace moelab::train {

enum class LrScheduleKind {
  Linear,               // get_linear_schedule_with_warmup: warmup, then linear decay to 0 at the last step
  Cosine,               // get_cosine_schedule_with_warmup, num_cycles 0.5: warmup, then half a cosine to 0
  Constant,             // get_constant_schedule: 1 throughout (transformers ignores warmup for it)
  ConstantWithWarmup,   // get_constant_schedule_with_warmup: warmup, then 1
};

// transformers' names: "linear", "cosine", "constant", "constant_with_warmup"; anything else throws
// moelab::Error listing them.
LrScheduleKind parse_lr_schedule(const std::string& name);
const char* lr_schedule_name(LrScheduleKind kind);

struct LrSchedule {
  LrScheduleKind kind = LrScheduleKind::Linear;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  // The multiplier for optimizer step `step` (0-based), exactly transformers' lr_lambda in double.
  double factor(int64_t step) const;
};

// transformers' TrainingArguments.get_warmup_steps: warmup_steps when > 0, else ceil(total * warmup_ratio).
int64_t warmup_steps_for(int64_t warmup_steps, double warmup_ratio, int64_t total_steps);

}  // namespace moelab::train
