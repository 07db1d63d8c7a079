#pragma once
// The training forward's stages, each with its backward beside it. Rows are tokens; a matrix may hold a
// batch's sequences one after the other (train/lora_model.cpp stacks them so every frozen weight is read once
// per batch): the row-wise stages do not care, RoPE takes each row's position, dropout each sequence's
// stream, and attention runs on one sequence's rows.
// Written apart from reference/model.cpp on purpose (the reference is under comparison elsewhere), with
// the same arithmetic in the forward where it matters (RMSNorm, RoPE angles, softmax, silu), so a fresh
// adapter's loss matches the reference engine's to rounding.
//
// Conventions: x [n, in] row per token, W [out, in] as the checkpoint stores it, y = x Wᵀ. Every
// backward takes dL/d(output) and returns dL/d(input); LoRA gradients are ADDED to grad_a / grad_b.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "train/lora_model.hpp"
#include "train/products.hpp"

namespace moelab::train::stage {

// ---- Linear with peft's unmerged LoRA: y = x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ ----

struct Dropout {
  // Rows [row0, row0 + rows) draw their mask from `stream` (rows < 0: to the last row), element i of the
  // range (row-major, counted from the range's first element) from counter i: a sequence gets the same mask
  // whether it is alone in the matrix or stacked with others, and the same stream gives the same mask
  // (checkpointing recomputes).
  struct Range {
    int64_t row0 = 0, rows = -1;
    uint64_t stream = 0;
  };
  double p = 0;               // 0: off (evaluation, or lora_dropout 0)
  std::vector<Range> ranges;  // must cover every row when p > 0
  Dropout() = default;
  Dropout(double p_, uint64_t stream) : p(p_), ranges{{0, -1, stream}} {}  // one stream for the whole matrix
};

template <typename S>
struct LinearCache {
  Mat<S> keep;  // dropout's multiplier, 0 or 1/(1-p) per input element; empty without dropout
  Mat<S> xd;    // dropout(x); empty without dropout (x itself is used)
  Mat<S> u;     // dropout(x) Aᵀ   [n, r]
};

// SplitMix64: spreads (seed, stream) into a generator seed, so neighbouring streams give unrelated masks.
inline uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// nn.Dropout's draw for element i of a stream: dropped when double(draw) < p · 2^64, i.e. with probability p.
inline uint64_t dropout_draw(uint64_t stream_base, int64_t i) { return mix(stream_base + uint64_t(i) * 0x9E3779B97F4A7C15ull); }

// The smallest draw that is kept: double(draw) >= p · 2^64. Converting is monotone, so the dropped draws are
// exactly those below it, and the mask loop compares integers (x86-64 before AVX-512 has no unsigned 64-bit
// to double conversion: the compiler's branchy sequence was most of the loop). Same masks as the definition.
inline uint64_t first_kept_draw(double p) {
  const double threshold = p * 18446744073709551616.0;
  uint64_t lo = 0, hi = ~uint64_t(0);  // double(hi) = 2^64 > threshold for p < 1
  while (lo < hi) {
    const uint64_t mid = lo + (hi - lo) / 2;
    if (double(mid) >= threshold) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

template <typename S>
Mat<S> linear_forward(const Products& mm, const Mat<S>& x, const std::type_identity_t<FrozenMatrix<S>>& w,
                      const LoraParam<S>* lora, const Dropout& drop,
                      LinearCache<S>* cache) {
  Mat<S> y = mm.x_wt(x, w);
  if (!lora) return y;
  Mat<S> u;
  if (drop.p > 0) {
    // nn.Dropout: each element zeroed with probability p, the rest scaled by 1/(1-p). Element i of a range
    // draws SplitMix64 at counter i: cheap, the same mask whenever the stream is the same, and independent of
    // which thread draws it, so the rows are split over the pool (each work item a piece of one range).
    const S kept = S(1) / S(1 - drop.p);
    const uint64_t first_kept = first_kept_draw(drop.p);
    const int64_t cols = x.cols();
    struct Piece {
      int64_t row0, row1, range_row0;
      uint64_t base;
    };
    std::vector<Piece> pieces;
    const int64_t rows_per_piece = std::max<int64_t>(1, (int64_t(1) << 13) / std::max<int64_t>(1, cols));
    int64_t covered = 0;
    for (const auto& range : drop.ranges) {
      const int64_t rows = range.rows < 0 ? x.rows() - range.row0 : range.rows;
      if (range.row0 < 0 || rows < 0 || range.row0 + rows > x.rows())
        throw std::logic_error("dropout range outside the input's rows");
      for (int64_t r = range.row0; r < range.row0 + rows; r += rows_per_piece)
        pieces.push_back({r, std::min(range.row0 + rows, r + rows_per_piece), range.row0, mix(range.stream)});
      covered += rows;
    }
    if (covered != x.rows()) throw std::logic_error("dropout ranges do not cover the input's rows");
    Mat<S> keep(x.rows(), cols), xd(x.rows(), cols);
    const auto draw = [&](int64_t p0, int64_t p1) {
      for (int64_t k = p0; k < p1; ++k) {
        const Piece& piece = pieces[size_t(k)];
        for (int64_t r = piece.row0; r < piece.row1; ++r)
          for (int64_t j = 0; j < cols; ++j) {
            const S m = dropout_draw(piece.base, (r - piece.range_row0) * cols + j) < first_kept ? S(0) : kept;
            keep(r, j) = m;
            xd(r, j) = x(r, j) * m;
          }
      }
    };
    if (x.size() >= (int64_t(1) << 15)) mm.parallel_for(int64_t(pieces.size()), 1, draw);
    else draw(0, int64_t(pieces.size()));
    u = product(xd, Op::N, lora->a, Op::T);
    if (cache) {
      cache->keep = std::move(keep);
      cache->xd = std::move(xd);
    }
  } else {
    u = product(x, Op::N, lora->a, Op::T);
  }
  gemm(u, Op::N, lora->b, Op::T, S(lora->scale), S(1), y);  // y += s · u Bᵀ
  if (cache) cache->u = std::move(u);
  return y;
}

// dx = dy W + s ((dy B) A) ⊙ keep;  dB += s dyᵀ u;  dA += s (dy B)ᵀ dropout(x).
template <typename S>
Mat<S> linear_backward(const Products& mm, const Mat<S>& dy, const Mat<S>& x, const std::type_identity_t<FrozenMatrix<S>>& w,
                       LoraParam<S>* lora,
                       const LinearCache<S>& c) {
  Mat<S> dx = mm.dy_w(dy, w);
  if (!lora) return dx;
  const S s = S(lora->scale);
  lora->has_grad = true;
  const Mat<S> g = product(dy, Op::N, lora->b, Op::N);  // [n, r]
  gemm(dy, Op::T, c.u, Op::N, s, S(1), lora->grad_b);
  gemm(g, Op::T, c.xd.size() ? c.xd : x, Op::N, s, S(1), lora->grad_a);
  if (c.keep.size()) dx += product(g, Op::N, lora->a, Op::N, s).cwiseProduct(c.keep);
  else gemm(g, Op::N, lora->a, Op::N, s, S(1), dx);
  return dx;
}

// ---- RMSNorm: y = x / sqrt(mean(x²) + eps) ⊙ weight ----

template <typename S>
Mat<S> rms_norm(const Mat<S>& x, const RowVec<S>& weight, double eps, std::vector<S>* inv_out) {
  Mat<S> out(x.rows(), x.cols());
  if (inv_out) inv_out->resize(size_t(x.rows()));
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const S mean_sq = x.row(t).squaredNorm() / S(x.cols());
    const S inv = S(1) / std::sqrt(mean_sq + S(eps));
    out.row(t) = (x.row(t) * inv).cwiseProduct(weight);
    if (inv_out) (*inv_out)[size_t(t)] = inv;
  }
  return out;
}

// With g = dy ⊙ weight and r = inv: dx = r g − x r³ (g · x) / H.
template <typename S>
Mat<S> rms_norm_backward(const Mat<S>& dy, const Mat<S>& x, const RowVec<S>& weight, const std::vector<S>& inv) {
  Mat<S> dx(x.rows(), x.cols());
  const S H = S(x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const S r = inv[size_t(t)];
    const RowVec<S> g = dy.row(t).cwiseProduct(weight);
    const S dot = g.dot(x.row(t));
    dx.row(t) = g * r - x.row(t) * (r * r * r * dot / H);
  }
  return dx;
}

// ---- Rotate-half RoPE: dimension i pairs with i + head_dim/2, row t at position pos[t] ----

template <typename S>
struct Rope {
  std::vector<S> inv_freq;  // [head_dim / 2], inv_freq[i] = 1 / theta^(2i / head_dim), in S (as transformers)
  int head_dim = 0;
  Rope(double theta, int hd) : head_dim(hd) {
    for (int i = 0; i < hd / 2; ++i) inv_freq.push_back(S(1) / std::pow(S(theta), S(2 * i) / S(hd)));
  }
  // sign +1: the forward rotation by angle; -1: its transpose (rotation by -angle), the backward.
  void apply(Mat<S>& x, int heads, int sign, const std::vector<int>& pos_of_row) const {
    const int half = head_dim / 2;
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const S pos = S(pos_of_row[size_t(t)]);
      for (int i = 0; i < half; ++i) {
        const S angle = pos * inv_freq[size_t(i)];
        const S c = std::cos(angle), s = sign > 0 ? std::sin(angle) : -std::sin(angle);
        for (int h = 0; h < heads; ++h) {
          S& a = x(t, h * head_dim + i);
          S& b = x(t, h * head_dim + i + half);
          const S a0 = a, b0 = b;
          a = a0 * c - b0 * s;
          b = b0 * c + a0 * s;
        }
      }
    }
  }
};

// ---- Causal (optionally sliding-window) softmax attention of one head ----
// Query t sees keys j in [first(t), t], first(t) = max(0, t − window + 1) with a window, else 0.

inline int first_key(int t, int window) { return window > 0 ? std::max(0, t - window + 1) : 0; }

// q [n, hd], k [n, hd], v [n, hd] → out [n, hd]; p (the attention probabilities, zero outside the mask) kept.
template <typename S>
Mat<S> attention_head(const Mat<S>& q, const Mat<S>& k, const Mat<S>& v, int window, Mat<S>& p) {
  const int n = int(q.rows());
  const S scale = S(1) / std::sqrt(S(q.cols()));
  p = product(q, Op::N, k, Op::T, scale);
  for (int t = 0; t < n; ++t) {
    const int first = first_key(t, window), len = t - first + 1;
    auto s = p.row(t).segment(first, len);
    s = (s.array() - s.maxCoeff()).exp();
    s /= s.sum();
    p.row(t).head(first).setZero();
    p.row(t).tail(n - 1 - t).setZero();
  }
  return product(p, Op::N, v, Op::N);
}

// dS = P ⊙ (dP − rowsum(dP ⊙ P)) with dP = dO Vᵀ;  dq = dS k / √hd;  dk = dSᵀ q / √hd;  dv = Pᵀ dO.
template <typename S>
void attention_head_backward(const Mat<S>& d_out, const Mat<S>& q, const Mat<S>& k, const Mat<S>& v, const Mat<S>& p,
                             Mat<S>& dq, Mat<S>& dk, Mat<S>& dv) {
  const S scale = S(1) / std::sqrt(S(q.cols()));
  Mat<S> ds = product(d_out, Op::N, v, Op::T);  // dP
  for (Eigen::Index t = 0; t < ds.rows(); ++t) {
    const S dot = ds.row(t).dot(p.row(t));
    ds.row(t) = p.row(t).cwiseProduct((ds.row(t).array() - dot).matrix());
  }
  dq = product(ds, Op::N, k, Op::N, scale);
  dk = product(ds, Op::T, q, Op::N, scale);
  dv = product(p, Op::T, d_out, Op::N);
}

// ---- SwiGLU: silu(a) = a σ(a), silu'(a) = σ(a) (1 + a (1 − σ(a))) ----

template <typename S>
S silu(S a) { return a / (S(1) + std::exp(-a)); }
// Both from one exponential (the experts' backward evaluates them for every element); the value is silu(a)'s
// bits exactly.
template <typename S>
struct SiluAndGrad {
  S value, grad;
};
template <typename S>
SiluAndGrad<S> silu_and_grad(S a) {
  const S e = std::exp(-a), sg = S(1) / (S(1) + e);
  return {a / (S(1) + e), sg * (S(1) + a * (S(1) - sg))};
}

}  // namespace moelab::train::stage
