#include "optimized/cpu/layer_ops.hpp"

// cpu-nf4's own layer ops: see layer_ops.hpp for why they are not shared with reference/model.cpp.

#include <algorithm>
#include <cmath>
#include <numeric>

#include "optimized/cpu/linear.hpp"

namespace moelab::cpu {

void rms_norm(const MatrixRF& x, const Eigen::RowVectorXf& w, float eps, MatrixRF& out) {
  out.resize(x.rows(), x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const float inv = 1.0f / std::sqrt(x.row(t).squaredNorm() / float(x.cols()) + eps);
    out.row(t) = (x.row(t) * inv).cwiseProduct(w);
  }
}

std::vector<float> rope_inv_freq(double theta, int head_dim) {
  std::vector<float> inv_freq;
  for (int i = 0; i < head_dim / 2; ++i)
    inv_freq.push_back(1.0f / std::pow(float(theta), float(2 * i) / float(head_dim)));
  return inv_freq;
}

void rope(MatrixRF& x, int heads, int head_dim, int start, std::span<const float> inv_freq) {
  const int hd = head_dim, half = hd / 2;
  for (Eigen::Index t = 0; t < x.rows(); ++t)
    for (int i = 0; i < half; ++i) {
      const float angle = float(start + t) * inv_freq[size_t(i)];
      const float c = std::cos(angle), s = std::sin(angle);
      for (int h = 0; h < heads; ++h) {
        float* a = &x(t, h * hd + i);
        float* b = a + half;
        const float a0 = *a, b0 = *b;
        *a = a0 * c - b0 * s;
        *b = b0 * c + a0 * s;
      }
    }
}

void attention(const MatrixRF& q, const MatrixRF& kc, const MatrixRF& vc, int start, int heads, int kv_heads,
               int head_dim, int window, MatrixRF& out, ThreadPool* pool) {
  const int n = int(q.rows()), hd = head_dim;
  const int group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(float(hd));
  const bool parallel = pool && int64_t(heads) * n * (start + n) * hd >= kMinParallelMacs;
  const auto one_query = [&](int64_t i) {
    const int h = int(i / n), t = int(i % n);
    const int kvh = h / group, p = start + t;
    const int first = window > 0 ? std::max(0, p - window + 1) : 0;
    const int len = p - first + 1;
    Eigen::RowVectorXf s = (q.block(t, h * hd, 1, hd) * kc.block(first, kvh * hd, len, hd).transpose()) * scale;
    s = (s.array() - s.maxCoeff()).exp();
    s /= s.sum();
    out.block(t, h * hd, 1, hd) = s * vc.block(first, kvh * hd, len, hd);
  };
  const int64_t queries = int64_t(heads) * n;
  if (parallel)
    pool->parallel_for(queries, std::max<int64_t>(1, queries / (8 * pool->threads())), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) one_query(i);
    });
  else
    for (int64_t i = 0; i < queries; ++i) one_query(i);
}

void route_top_k(const MatrixRF& logits, int k, MatrixRI& experts, MatrixRF& gates) {
  const int n = int(logits.rows()), num_experts = int(logits.cols());
  experts.resize(n, k);
  gates.resize(n, k);
  std::vector<int> order(static_cast<size_t>(num_experts));
  for (int t = 0; t < n; ++t) {
    Eigen::RowVectorXf p = (logits.row(t).array() - logits.row(t).maxCoeff()).exp();
    p /= p.sum();
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    float kept = 0;
    for (int j = 0; j < k; ++j) kept += p[order[size_t(j)]];
    for (int j = 0; j < k; ++j) {
      experts(t, j) = order[size_t(j)];
      gates(t, j) = p[order[size_t(j)]] / kept;
    }
  }
}

}  // namespace moelab::cpu
