#pragma once
// The decoder-layer op cases of tests/ops/op_cases.hpp (RMSNorm, RoPE, attention, router top-k): their
// inputs, a float64 result written here independently of any engine, and each op's limit derived from
// its FP32 arithmetic. One header for every backend's table (tests/ops/test_op_table.cpp on the CPU,
// tests/ops/test_op_table_cuda.cpp on the device), so each backend runs the same inputs against the
// same result and limit. A check returns the worst |got - float64| / limit over the case's outputs (a
// NaN or infinite output, an unwritten one included, is +inf); the case passes at <= 1.
//
// u = 2^-24, FP32's unit roundoff. "ulp-accurate" functions: glibc's sqrtf/expf/sinf/cosf/powf (< 1 ulp),
// Eigen's vectorized exp (about 1 ulp), CUDA's expf/sinf/cosf/rsqrtf (<= 2 ulp, CUDA C Programming
// Guide, table of single-precision function errors); 2 ulp is at most 4u relative, and on a value of
// magnitude <= 1 at most 2u absolute. The limits below take those worst cases, so one limit serves
// every backend.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "ops/op_cases.hpp"

namespace moelab::ops {

inline constexpr double kLayerU = 0x1p-24;

inline double error_ratio(float got, double want, double limit) {
  if (!std::isfinite(got)) return INFINITY;
  return std::abs(double(got) - want) / limit;
}

inline std::vector<float> normal_floats(size_t n, std::mt19937& rng, float sd = 1.0f) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm: out = w x / sqrt(sum x^2 / dim + eps), per row.
//
// Limit (dim / 2 + 8) u |out64| per element: the sum of `dim` squares in FP32 (any order; each square
// and each addition rounded) is within dim u relative; / dim and + eps add u each, and the square root
// halves the argument's relative error: (dim + 2) u / 2. Then the inverse square root (sqrt and a
// division, 1.5 u; CUDA's rsqrtf, 2 ulp = 4 u) and the two products (x * inv, * w; 2 u):
// dim / 2 + 1 + 4 + 2 <= dim / 2 + 8 (one u of slack for second-order terms).
struct NormInputs {
  std::vector<float> x, w;  // x: [n, dim]
  float eps = 1e-5f;
};

inline NormInputs norm_inputs(const NormCase& c) {
  std::mt19937 rng(uint32_t(c.n * 7919 + c.dim));
  NormInputs in{normal_floats(size_t(c.n) * size_t(c.dim), rng), normal_floats(size_t(c.dim), rng, 0.5f)};
  constexpr float kRowScale[] = {1.0f, 1e-3f, 100.0f, 0.0f};  // the last: an all-zero row
  for (int t = 0; t < c.n; ++t)
    for (int i = 0; i < c.dim; ++i) in.x[size_t(t) * size_t(c.dim) + size_t(i)] *= kRowScale[t % 4];
  return in;
}

inline double check_rms_norm(const NormCase& c, const NormInputs& in, const float* got) {
  double worst = 0;
  for (int t = 0; t < c.n; ++t) {
    const float* x = in.x.data() + size_t(t) * size_t(c.dim);
    double ss = 0;
    for (int i = 0; i < c.dim; ++i) ss += double(x[i]) * double(x[i]);
    const double inv = 1.0 / std::sqrt(ss / c.dim + double(in.eps));
    for (int i = 0; i < c.dim; ++i) {
      const double want = double(in.w[size_t(i)]) * double(x[i]) * inv;
      const double limit = (c.dim / 2.0 + 8) * kLayerU * std::abs(want) + 1e-37;
      worst = std::max(worst, error_ratio(got[size_t(t) * size_t(c.dim) + size_t(i)], want, limit));
    }
  }
  return worst;
}

// ---------------------------------------------------------------------------------------------------
// RoPE's inverse frequencies, 1 / theta^(2i / head_dim) computed in FP32: the exponent 2i / head_dim is
// rounded once (u relative, so theta^-e is off by ln(theta) e u relative), powf and the division add
// 2u and u. Limit (ln(theta) e + 4) u |inv64| (one u of slack).
inline double check_rope_inv_freq(const RopeCase& c, const std::vector<float>& inv_freq) {
  if (inv_freq.size() != size_t(c.head_dim / 2)) return INFINITY;
  double worst = 0;
  for (int i = 0; i < c.head_dim / 2; ++i) {
    const double e = 2.0 * i / c.head_dim, want = std::pow(c.theta, -e);
    worst = std::max(worst, error_ratio(inv_freq[size_t(i)], want, (std::log(c.theta) * e + 4) * kLayerU * want));
  }
  return worst;
}

// Rotate-half RoPE on x [n, heads * head_dim], in place; the inputs are x and the op's FP32 inv_freq
// (checked above), and float64 rotates by the exact angle theta = position * inv_freq[i].
//
// Limit (|a| + |b|) u (|theta| + 6) for the pair (a, b) -> (a cos - b sin, b cos + a sin): the op
// rounds the angle once (position is exact in FP32 below 2^24), |d theta| <= u |theta|, and cos/sin are
// within 2u absolute, so each is off by at most u |theta| + 2u; the two products and the sum round
// three times, u (|a| + |b|) each at most: (|a| + |b|)(u |theta| + 2u) + 2u (|a| + |b|), plus 2u of
// slack. Near position 32768 the angle's own rounding dominates (u |theta| ~ 2e-3).
inline std::vector<float> rope_inputs(const RopeCase& c) {
  std::mt19937 rng(uint32_t(c.n * 131 + c.start * 7 + c.heads * 3 + c.head_dim));
  return normal_floats(size_t(c.n) * size_t(c.heads) * size_t(c.head_dim), rng);
}

inline double check_rope(const RopeCase& c, const std::vector<float>& x, const std::vector<float>& inv_freq,
                         const float* got) {
  const int half = c.head_dim / 2;
  double worst = 0;
  for (int t = 0; t < c.n; ++t)
    for (int h = 0; h < c.heads; ++h)
      for (int i = 0; i < half; ++i) {
        const size_t ia = (size_t(t) * size_t(c.heads) + size_t(h)) * size_t(c.head_dim) + size_t(i),
                     ib = ia + size_t(half);
        const double theta = double(c.start + t) * double(inv_freq[size_t(i)]);
        const double a = x[ia], b = x[ib], co = std::cos(theta), si = std::sin(theta);
        const double limit = (std::abs(a) + std::abs(b)) * kLayerU * (std::abs(theta) + 6) + 1e-37;
        worst = std::max({worst, error_ratio(got[ia], a * co - b * si, limit), error_ratio(got[ib], b * co + a * si, limit)});
      }
  return worst;
}

// ---------------------------------------------------------------------------------------------------
// Attention: query t (position p = start + t), head h, KV head h / (heads / kv_heads), keys j in
// [first, p] (first = max(0, p - window + 1) with a window, else 0; len keys): s_j = q.k_j / sqrt(hd),
// out = sum_j softmax(s)_j v_j.
//
// The cache has start + n written rows; the rows past them, and the rows before the first key any query
// sees (a window), are NaN, so an op that reads a key outside its range fails.
//
// Limit, per output element d, (P + (len + 2) u) sum_j p_j |v_jd|, where P bounds the relative error of
// each softmax weight p_j:
//  - a score: a dot product of hd terms (hd u of S_j = sum |q k_j| / sqrt(hd)), the FP32 scale
//    1/sqrt(hd) (within 4u: sqrt and division, or rsqrtf) and its product: |ds_j| <= (hd + 6) u S_j;
//  - s_j - max: both scores' errors and the subtraction's rounding, D = 2 max_j (hd + 6) u S_j + u R
//    (R = max_j (max - s_j));
//  - exp: relative D + 4u; the sum of len terms (len u) and the division (u):
//    P = 2 (D + 4u) + (len + 1) u;
//  - an online softmax (the device kernels) also rescales each running sum and accumulator by
//    exp(m_old - m_new) whenever the max grows, at most once per key and once per merge of splits:
//    each rescale within 5u + u |m_old - m_new| (the growth sums to at most R), on the numerator and the
//    denominator: P += 2 (5 (len + 1) u + u R);
// and the weighted sum of len values adds (len + 2) u sum p |v| (a dot product, plus slack).
struct AttentionInputs {
  std::vector<float> q, k, v;  // q [n, heads * hd]; k, v [cache_rows, kv_heads * hd]
  int cache_rows = 0;
};

inline constexpr int kAttentionPoisonedRows = 40;  // cache rows past start + n, NaN (more than a key tile)

inline int first_visible_key(int position, int window) { return window > 0 ? std::max(0, position - window + 1) : 0; }

inline AttentionInputs attention_inputs(const AttentionCase& c) {
  std::mt19937 rng(uint32_t(c.n * 31 + c.start * 17 + c.heads * 5 + c.head_dim + c.window * 3));
  AttentionInputs in;
  const size_t kv = size_t(c.kv_heads) * size_t(c.head_dim);
  in.cache_rows = c.start + c.n + kAttentionPoisonedRows;
  in.q = normal_floats(size_t(c.n) * size_t(c.heads) * size_t(c.head_dim), rng);
  in.k = normal_floats(size_t(in.cache_rows) * kv, rng);
  in.v = normal_floats(size_t(in.cache_rows) * kv, rng);
  const size_t unseen_before = size_t(first_visible_key(c.start, c.window)) * kv;
  for (auto* m : {&in.k, &in.v}) {
    std::fill(m->begin(), m->begin() + std::ptrdiff_t(unseen_before), std::nanf(""));
    std::fill(m->begin() + std::ptrdiff_t(size_t(c.start + c.n) * kv), m->end(), std::nanf(""));
  }
  return in;
}

inline double check_attention(const AttentionCase& c, const AttentionInputs& in, const float* got, bool online_softmax) {
  const int hd = c.head_dim, group = c.heads / c.kv_heads;
  const size_t kv_stride = size_t(c.kv_heads) * size_t(hd), q_stride = size_t(c.heads) * size_t(hd);
  const double u = kLayerU, inv_sqrt = 1.0 / std::sqrt(double(hd));
  double worst = 0;
  std::vector<double> s, mag, out(static_cast<size_t>(hd)), weighted_abs(static_cast<size_t>(hd));
  for (int t = 0; t < c.n; ++t)
    for (int h = 0; h < c.heads; ++h) {
      const int p = c.start + t, kvh = h / group, first = first_visible_key(p, c.window), len = p - first + 1;
      const float* q = in.q.data() + size_t(t) * q_stride + size_t(h) * size_t(hd);
      s.assign(size_t(len), 0.0);
      mag.assign(size_t(len), 0.0);
      double mx = -INFINITY, max_mag = 0;
      for (int j = 0; j < len; ++j) {
        const float* k = in.k.data() + size_t(first + j) * kv_stride + size_t(kvh) * size_t(hd);
        double dot = 0, abs_dot = 0;
        for (int d = 0; d < hd; ++d) {
          dot += double(q[d]) * double(k[d]);
          abs_dot += std::abs(double(q[d]) * double(k[d]));
        }
        s[size_t(j)] = dot * inv_sqrt;
        mag[size_t(j)] = abs_dot * inv_sqrt;
        mx = std::max(mx, s[size_t(j)]);
        max_mag = std::max(max_mag, mag[size_t(j)]);
      }
      double sum = 0, range = 0;
      for (int j = 0; j < len; ++j) {
        range = std::max(range, mx - s[size_t(j)]);
        sum += (s[size_t(j)] = std::exp(s[size_t(j)] - mx));
      }
      const double d_score = 2 * (hd + 6) * u * max_mag + u * range;
      double weight_err = 2 * (d_score + 4 * u) + (len + 1) * u;
      if (online_softmax) weight_err += 2 * (5.0 * (len + 1) * u + u * range);
      std::fill(out.begin(), out.end(), 0.0);
      std::fill(weighted_abs.begin(), weighted_abs.end(), 0.0);
      for (int j = 0; j < len; ++j) {
        const double pj = s[size_t(j)] / sum;
        const float* v = in.v.data() + size_t(first + j) * kv_stride + size_t(kvh) * size_t(hd);
        for (int d = 0; d < hd; ++d) {
          out[size_t(d)] += pj * double(v[d]);
          weighted_abs[size_t(d)] += pj * std::abs(double(v[d]));
        }
      }
      const float* g = got + size_t(t) * q_stride + size_t(h) * size_t(hd);
      for (int d = 0; d < hd; ++d)
        worst = std::max(worst, error_ratio(g[d], out[size_t(d)],
                                            (weight_err + (len + 2) * u) * weighted_abs[size_t(d)] + 1e-37));
    }
  return worst;
}

// ---------------------------------------------------------------------------------------------------
// Router: per token, p = softmax(logits) over all experts, the top_k most probable in rank order, gates
// p_c / sum of the chosen p.
//
// Every FP32 probability is within eps = 2u R + (experts + 9) u relative of float64's on the same
// logits (R = max - min logit): l - max rounds (u R), exp (4u), the sum of `experts` terms (experts u,
// plus the largest term's own error), the division (u).
// Ties, and how they are handled: the op may rank c before o only if fl(p_c) >= fl(p_o), which float64
// allows when p64_c (1 + eps) >= p64_o (1 - eps). So the chosen set and its order must satisfy that for
// every chosen c ranked before any expert o (chosen later or not chosen); where float64's probabilities
// differ by more than the FP32 error the choice is forced, and where they lie within it (near ties)
// either choice passes. Exactly equal FP32 logits give bit-identical FP32 probabilities, and the op's
// rule for those is stated (layer_ops.hpp, the device's router_topk): the lower index first; that is
// checked exactly.
// Gates: the chosen probabilities (eps each), their sum (eps + top_k u) and the division (u):
// limit (2 eps + (top_k + 2) u) g64, g64 = p64_c / sum of p64 over the op's own chosen set.
inline std::vector<float> router_logits(const RouterCase& c) {
  std::mt19937 rng(uint32_t(c.n * 101 + c.experts * 13 + c.top_k));
  std::vector<float> l = normal_floats(size_t(c.n) * size_t(c.experts), rng, 2.0f);
  for (int t = 0; t < c.n; ++t) {
    float* r = l.data() + size_t(t) * size_t(c.experts);
    std::vector<int> order(static_cast<size_t>(c.experts));
    for (int e = 0; e < c.experts; ++e) order[size_t(e)] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return r[a] > r[b]; });
    const bool boundary = c.top_k < c.experts;
    switch (t % 6) {
      case 0: break;  // random
      case 1:  // an exact tie at the top, between a higher and a lower index
        r[(t + 3) % c.experts] = r[t % c.experts] = r[order[0]] + 1.0f;
        break;
      case 2:  // an exact tie across the top-k boundary
        if (boundary) r[order[size_t(c.top_k)]] = r[order[size_t(c.top_k - 1)]];
        break;
      case 3:  // all equal
        std::fill(r, r + c.experts, 0.5f);
        break;
      case 4:  // a near tie across the boundary: one ulp apart
        if (boundary) r[order[size_t(c.top_k)]] = std::nextafter(r[order[size_t(c.top_k - 1)]], -INFINITY);
        break;
      case 5:  // one dominant logit: the others' probabilities near underflow
        r[t % c.experts] += 30.0f;
        break;
    }
  }
  return l;
}

inline double check_router(const RouterCase& c, const std::vector<float>& logits, const int32_t* experts,
                           const float* gates) {
  const double u = kLayerU;
  double worst = 0;
  for (int t = 0; t < c.n; ++t) {
    const float* l = logits.data() + size_t(t) * size_t(c.experts);
    const float mx = *std::max_element(l, l + c.experts), mn = *std::min_element(l, l + c.experts);
    std::vector<double> p(static_cast<size_t>(c.experts));
    double sum = 0;
    for (int e = 0; e < c.experts; ++e) sum += (p[size_t(e)] = std::exp(double(l[e]) - double(mx)));
    for (auto& v : p) v /= sum;
    const double eps = 2 * u * (double(mx) - double(mn)) + (c.experts + 9) * u;
    // The op's ranking: valid experts, no repeats; then every expert ranked before another (chosen later
    // or not chosen) is not below it beyond the FP32 error, and wins exact logit ties only by index.
    const int32_t* chosen = experts + size_t(t) * size_t(c.top_k);
    std::vector<int> rank(static_cast<size_t>(c.experts), c.top_k);  // top_k: not chosen
    for (int j = 0; j < c.top_k; ++j) {
      if (chosen[j] < 0 || chosen[j] >= c.experts || rank[size_t(chosen[j])] != c.top_k) return INFINITY;
      rank[size_t(chosen[j])] = j;
    }
    for (int a = 0; a < c.experts; ++a)
      for (int b = 0; b < c.experts; ++b) {
        if (rank[size_t(a)] >= rank[size_t(b)]) continue;  // a ranked before b
        if (p[size_t(a)] * (1 + eps) < p[size_t(b)] * (1 - eps)) return INFINITY;
        if (l[a] == l[b] && a > b) return INFINITY;  // an exact tie goes to the lower index
      }
    double kept = 0;
    for (int j = 0; j < c.top_k; ++j) kept += p[size_t(chosen[j])];
    for (int j = 0; j < c.top_k; ++j) {
      const double want = p[size_t(chosen[j])] / kept;
      worst = std::max(worst, error_ratio(gates[size_t(t) * size_t(c.top_k) + size_t(j)], want,
                                          (2 * eps + (c.top_k + 2) * u) * want + 1e-37));
    }
  }
  return worst;
}

}  // namespace moelab::ops
