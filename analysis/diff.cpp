#include "analysis/diff.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "core/error.hpp"

namespace moelab::analysis {

TensorDiff diff_tensor(const MatrixRF& a, const MatrixRF& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols())
    throw Error(fmt::format("diff: shapes differ ([{}, {}] vs [{}, {}])", a.rows(), a.cols(), b.rows(), b.cols()));
  const auto ad = a.cast<double>(), bd = b.cast<double>();
  TensorDiff d;
  const double na = ad.norm(), nb = bd.norm();
  d.rel_l2 = na > 0 ? (bd - ad).norm() / na : (bd - ad).norm();
  d.cosine = na > 0 && nb > 0 ? ad.cwiseProduct(bd).sum() / (na * nb) : (na == nb ? 1.0 : 0.0);
  d.max_abs = a.size() ? (bd - ad).cwiseAbs().maxCoeff() : 0.0;
  return d;
}

namespace {

// KL(p || q) for p = softmax(a), q = softmax(b), computed with log-sum-exp in double.
double kl_of_logits(const Eigen::Ref<const Eigen::RowVectorXd>& a, const Eigen::Ref<const Eigen::RowVectorXd>& b) {
  const double ma = a.maxCoeff(), mb = b.maxCoeff();
  const double lse_a = ma + std::log((a.array() - ma).exp().sum());
  const double lse_b = mb + std::log((b.array() - mb).exp().sum());
  const Eigen::ArrayXd logp = a.array() - lse_a, logq = b.array() - lse_b;
  return (logp.exp() * (logp - logq)).sum();
}

std::pair<double, double> routing_agreement(const MatrixRI& a, const MatrixRI& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols())
    throw Error(fmt::format("diff: expert choices differ in shape ([{}, {}] vs [{}, {}])", a.rows(), a.cols(), b.rows(),
                            b.cols()));
  int64_t top1 = 0, sets = 0;
  for (Eigen::Index t = 0; t < a.rows(); ++t) {
    top1 += a(t, 0) == b(t, 0);
    std::set<int> sa(a.row(t).data(), a.row(t).data() + a.cols()), sb(b.row(t).data(), b.row(t).data() + b.cols());
    sets += sa == sb;
  }
  const double n = double(std::max<Eigen::Index>(a.rows(), 1));
  return {double(top1) / n, double(sets) / n};
}

nlohmann::json tensor_json(const TensorDiff& d) {
  return {{"rel_l2", d.rel_l2}, {"cosine", d.cosine}, {"max_abs", d.max_abs}};
}

}  // namespace

DiffReport diff_records(const ForwardRecord& a, const ForwardRecord& b, std::string a_name, std::string b_name) {
  if (a.tokens != b.tokens) throw Error(fmt::format("diff: {} and {} ran different tokens", a_name, b_name));
  if (a.layers.size() != b.layers.size())
    throw Error(fmt::format("diff: {} has {} layers, {} has {}", a_name, a.layers.size(), b_name, b.layers.size()));
  DiffReport r;
  r.a_name = std::move(a_name);
  r.b_name = std::move(b_name);
  r.tokens = int64_t(a.tokens.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const auto &la = a.layers[l], &lb = b.layers[l];
    LayerDiff d;
    d.layer = int(l);
    d.hidden = diff_tensor(la.hidden, lb.hidden);
    if (la.router_logits && lb.router_logits) d.router_logits = diff_tensor(*la.router_logits, *lb.router_logits);
    std::tie(d.top1_agreement, d.topk_agreement) = routing_agreement(la.experts, lb.experts);
    r.layers.push_back(d);
  }
  r.logits = diff_tensor(a.logits, b.logits);
  int64_t same = 0;
  double kl = 0;
  const Eigen::MatrixXd la = a.logits.cast<double>(), lb = b.logits.cast<double>();
  for (Eigen::Index t = 0; t < la.rows(); ++t) {
    Eigen::Index ia, ib;
    la.row(t).maxCoeff(&ia);
    lb.row(t).maxCoeff(&ib);
    same += ia == ib;
    kl += kl_of_logits(la.row(t), lb.row(t));
  }
  const double n = double(std::max<Eigen::Index>(la.rows(), 1));
  r.logits_top1_agreement = double(same) / n;
  r.mean_kl = kl / n;
  return r;
}

nlohmann::json DiffReport::to_json() const {
  nlohmann::json layers_json = nlohmann::json::array();
  for (const auto& d : layers) {
    nlohmann::json j = {{"layer", d.layer},
                        {"hidden", tensor_json(d.hidden)},
                        {"router_top1_agreement", d.top1_agreement},
                        {"router_topk_agreement", d.topk_agreement}};
    j["router_logits"] = d.router_logits ? tensor_json(*d.router_logits) : nlohmann::json(nullptr);
    layers_json.push_back(j);
  }
  return {{"format", "moelab-diff-v1"},
          {"a", a_name},
          {"b", b_name},
          {"tokens", tokens},
          {"layers", layers_json},
          {"logits", {{"rel_l2", logits.rel_l2},
                      {"cosine", logits.cosine},
                      {"max_abs", logits.max_abs},
                      {"top1_agreement", logits_top1_agreement},
                      {"mean_kl", mean_kl}}}};
}

std::string DiffReport::table() const {
  std::string s = fmt::format("diff: b = {} against a = {}, {} tokens\n", b_name, a_name, tokens);
  s += fmt::format("{:>6} {:>10} {:>10} {:>10} {:>11} {:>7} {:>7}\n", "layer", "rel_l2", "cosine", "max_abs",
                   "router_l2", "top1", "topk");
  for (const auto& d : layers)
    s += fmt::format("{:>6} {:>10.3e} {:>10.7f} {:>10.3e} {:>11} {:>6.1f}% {:>6.1f}%\n", d.layer, d.hidden.rel_l2,
                     d.hidden.cosine, d.hidden.max_abs,
                     d.router_logits ? fmt::format("{:.3e}", d.router_logits->rel_l2) : std::string("-"),
                     100 * d.top1_agreement, 100 * d.topk_agreement);
  s += fmt::format("{:>6} {:>10.3e} {:>10.7f} {:>10.3e}   top-1 agreement {:.1f}%, mean KL {:.3e} nats\n", "logits",
                   logits.rel_l2, logits.cosine, logits.max_abs, 100 * logits_top1_agreement, mean_kl);
  return s;
}

}  // namespace moelab::analysis
