// The QLoRA training core (train/lora_model.hpp): the loss against the reference engine, every gradient
// against central finite differences in float64, the FP32 path against float64, gradient checkpointing
// against the plain backward, the adapter round trip, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "fixture_util.hpp"
#include "reference/model.hpp"
#include "train/lora_model.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
using train::LoraModel;
using train::LoraParams;
using train::LoraRecipe;
using train::LossOptions;
using train::TrainSequence;

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

}  // namespace
}  // namespace moelab::test
