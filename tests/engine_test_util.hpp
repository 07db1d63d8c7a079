#pragma once
// What the NF4 engine tests (cpu-nf4, cuda-nf4) share: a fixture model with its NF4-dequantized twin
// (the reference on it computes what an exact NF4 engine computes: DESIGN.md's first step), and one way
// to assert a layer-by-layer diff against stated limits.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "analysis/diff.hpp"
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

}  // namespace moelab::test
