#include "optimized/cpu/moe.hpp"

#include "optimized/cpu/linear.hpp"

namespace moelab::cpu {

MatrixRF moe_block(const LinearContext& ctx, const std::vector<Nf4Expert>& experts, const MatrixRF& x, const MatrixRI& chosen,
                   const MatrixRF& gates) {
  MatrixRF out = MatrixRF::Zero(x.rows(), x.cols());
  for (int e = 0; e < int(experts.size()); ++e) {
    std::vector<std::pair<int, float>> routed;  // (token, gate)
    for (Eigen::Index t = 0; t < chosen.rows(); ++t)
      for (Eigen::Index j = 0; j < chosen.cols(); ++j)
        if (chosen(t, j) == e) routed.emplace_back(int(t), gates(t, j));
    if (routed.empty()) continue;
    MatrixRF xe(Eigen::Index(routed.size()), x.cols());
    for (size_t i = 0; i < routed.size(); ++i) xe.row(Eigen::Index(i)) = x.row(routed[i].first);
    const auto& ex = experts[size_t(e)];
    const Nf4Matrix* gate_up[] = {&ex.w1, &ex.w3};
    auto gu = nf4_linear_many(ctx, gate_up, xe);
    MatrixRF& g = gu[0];
    MatrixRF& u = gu[1];
    add_lora(ex.w1_lora, xe, g);
    add_lora(ex.w3_lora, xe, u);
    g = (g.array() / (1.0f + (-g.array()).exp())) * u.array();  // silu(w1 x) · w3 x
    MatrixRF y = nf4_linear(ctx, ex.w2, g);
    add_lora(ex.w2_lora, g, y);
    for (size_t i = 0; i < routed.size(); ++i) out.row(routed[i].first) += routed[i].second * y.row(Eigen::Index(i));
  }
  return out;
}

}  // namespace moelab::cpu
