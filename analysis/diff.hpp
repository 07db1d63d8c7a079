#pragma once
// Layer-by-layer comparison of two forward records (engine runs or dumps) over the same tokens:
// how far B strays from A. A is the reference side.
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "analysis/forward_record.hpp"

namespace moelab::analysis {

struct TensorDiff {
  double rel_l2 = 0;   // ||b - a|| / ||a||
  double cosine = 0;   // <a, b> / (||a|| ||b||), over the whole tensor
  double max_abs = 0;  // max |b - a|
};

struct LayerDiff {
  int layer = 0;
  TensorDiff hidden;
  std::optional<TensorDiff> router_logits;  // when both sides recorded them
  double top1_agreement = 1;  // fraction of tokens whose first-choice expert is the same
  double topk_agreement = 1;  // fraction of tokens whose top-k expert sets are equal
};

struct DiffReport {
  std::string a_name, b_name;
  int64_t tokens = 0;
  std::vector<LayerDiff> layers;
  TensorDiff logits;
  double logits_top1_agreement = 0;  // fraction of positions with the same argmax
  double mean_kl = 0;                // mean over positions of KL(softmax(a) || softmax(b)), nats

  nlohmann::json to_json() const;
  std::string table() const;  // readable terminal table
};

TensorDiff diff_tensor(const MatrixRF& a, const MatrixRF& b);
// Throws moelab::Error when the records cover different tokens or shapes.
DiffReport diff_records(const ForwardRecord& a, const ForwardRecord& b, std::string a_name, std::string b_name);

}  // namespace moelab::analysis
