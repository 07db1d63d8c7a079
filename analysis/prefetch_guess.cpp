// The next-layer gate guess (analysis/prefetch_guess.hpp).
#include "analysis/prefetch_guess.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.hpp"

namespace moelab::analysis {

PrefetchGuesser::PrefetchGuesser(const ModelConfig& c, std::vector<std::vector<float>> norms,
                                 std::vector<std::vector<float>> routers)
    : layers_(c.num_layers), hidden_(c.hidden_size), experts_(c.num_experts), k_(c.top_k), eps_(c.rms_norm_eps),
      norms_(std::move(norms)), routers_(std::move(routers)) {
  if (!c.is_moe()) throw Error("prefetch guess: the model is not a mixture of experts");
  if (int(norms_.size()) != layers_ || int(routers_.size()) != layers_)
    throw Error("prefetch guess: one norm and one router per layer are needed");
  for (int l = 0; l < layers_; ++l)
    if (int64_t(norms_[size_t(l)].size()) != hidden_ || int64_t(routers_[size_t(l)].size()) != int64_t(experts_) * hidden_)
      throw Error(fmt::format("prefetch guess: layer {}: norm or router of the wrong size", l));
}

PrefetchGuesser PrefetchGuesser::from_checkpoint(const Checkpoint& ck) {
  const ModelConfig& c = ck.config();
  if (!c.is_moe()) throw Error(fmt::format("{}: --record-prefetch-guess needs a mixture-of-experts model", ck.dir()));
  std::vector<std::vector<float>> norms, routers;
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string norm = fmt::format("model.layers.{}.post_attention_layernorm.weight", l), router = c.router_name(l);
    if (ck.info(router).dtype == DType::U8)
      throw Error(fmt::format("{}: {} is stored in NF4; --record-prefetch-guess reads routers in BF16, F16 or F32 "
                              "(trace the original checkpoint)", ck.dir(), router));
    norms.push_back(ck.read_f32(norm));
    routers.push_back(ck.read_f32(router));
  }
  return PrefetchGuesser(c, std::move(norms), std::move(routers));
}

void PrefetchGuesser::guess(int layer, const MatrixRF& hidden, uint8_t* out, size_t stride) const {
  if (layer < 1 || layer >= layers_) throw Error(fmt::format("prefetch guess: layer {} outside 1..{}", layer, layers_ - 1));
  if (hidden.cols() != hidden_) throw Error("prefetch guess: hidden state of the wrong width");
  const auto& w = norms_[size_t(layer)];
  const auto& router = routers_[size_t(layer)];
  std::vector<double> x(static_cast<size_t>(hidden_)), logit(static_cast<size_t>(experts_));
  std::vector<int> order(static_cast<size_t>(experts_));
  for (Eigen::Index r = 0; r < hidden.rows(); ++r) {
    double sq = 0;
    for (int i = 0; i < hidden_; ++i) sq += double(hidden(r, i)) * double(hidden(r, i));
    const double inv = 1.0 / std::sqrt(sq / hidden_ + eps_);
    for (int i = 0; i < hidden_; ++i) x[size_t(i)] = double(hidden(r, i)) * inv * double(w[size_t(i)]);
    for (int e = 0; e < experts_; ++e) {
      const float* row = router.data() + size_t(e) * size_t(hidden_);
      double acc = 0;
      for (int i = 0; i < hidden_; ++i) acc += double(row[i]) * x[size_t(i)];
      logit[size_t(e)] = acc;
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logit[size_t(a)] > logit[size_t(b)]; });
    for (int j = 0; j < k_; ++j) out[size_t(r) * stride + size_t(j)] = uint8_t(order[size_t(j)]);
  }
}

}  // namespace moelab::analysis
