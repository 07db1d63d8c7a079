// The op table on the CPU kernel sets: every op x every shape of tests/ops/op_cases.hpp x every token
// count, on every ISA (a kernel set this CPU lacks is one SKIPPED test naming the missing flags),
// against a float64 host result. Outputs start as NaN, so a row a kernel forgot cannot pass. Each case
// prints one line: op, shape, tokens, kernel set, PASS/FAIL and the largest error as a fraction of
// its limit. Limits are derived per op from its arithmetic (stated beside each op below).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iomanip>
#include <map>
#include <random>

#include "core/dtype.hpp"
#include "isa_test_util.hpp"
#include "ops/op_cases.hpp"
#include "optimized/cpu/bf16_matrix.hpp"
#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/moe.hpp"
#include "optimized/cpu/q8_matrix.hpp"
#include "optimized/cpu/quantize.hpp"
#include "optimized/nf4/code_values.hpp"

namespace moelab::test {
namespace {

using cpu::Isa;
using cpu::Nf4Matrix;
using ops::MatrixShape;
constexpr double kU = 0x1p-24;  // FP32 unit roundoff

Nf4Matrix make_matrix(const MatrixShape& s, uint32_t seed = 0) {
  std::mt19937 rng(uint32_t(s.rows * 131 + s.cols * 7 + s.blocksize) + 1000 * seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> v(static_cast<size_t>(s.rows * s.cols));
  for (auto& e : v) e = normal(rng);
  return cpu::quantize_matrix(v, s.rows, s.cols, s.blocksize, s.double_quant);
}

int code_at(const Nf4Matrix& w, int64_t e) {
  return (e & 1) ? w.packed[size_t(e >> 1)] & 15 : w.packed[size_t(e >> 1)] >> 4;
}
// The dequantized weight as a real number: code x absmax, exact in float64.
double weight(const Nf4Matrix& w, int64_t r, int64_t c) {
  const int64_t e = r * w.cols + c;
  return double(nf4::kCodeValues[code_at(w, e)]) * double(w.absmax[size_t(e / w.blocksize)]);
}

MatrixRF activations(int n, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  MatrixRF x(n, cols);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng) * ((i / cols) % 2 ? 0.3f : 2.0f);
  return x;
}

std::string kernel_set(Isa isa) { return cpu::isa_name(isa); }

// One line per case; returns whether it passed.
bool report(const std::string& op, const MatrixShape& s, int n, Isa isa, double worst) {
  const bool pass = worst <= 1.0;  // NaN fails too
  std::cout << "[ op       ] " << std::left << std::setw(16) << op << std::setw(22) << s.name << " n=" << std::setw(3) << n
            << std::setw(12) << kernel_set(isa) << (pass ? "PASS" : "FAIL") << "  max err/limit " << std::setprecision(3)
            << worst << "\n";
  return pass;
}

std::vector<int> token_counts(const MatrixShape& s) {
  if (s.benchmark) return {1};
  return {std::begin(ops::kTokenCounts), std::end(ops::kTokenCounts)};
}

class OpTable : public ::testing::TestWithParam<Isa> {};

// nf4_gemv_fp32: Y = X W^T with FP32 activations (the check mode), as the engines call it: up to 4
// tokens the GEMV kernels, more the dequantize + GEMM prefill path. Any summation order of `cols`
// products, each weight code x absmax rounded once to FP32 (or the block's sum scaled once):
// |y - y64| <= (cols + 8) u sum_c |w_c x_c|.
TEST_P(OpTable, Nf4GemvFp32) {
  const Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  cpu::ThreadPool pool(2);
  bool all = true;
  for (const auto& s : ops::kMatrixShapes) {
    const auto w = make_matrix(s);
    for (const int n : token_counts(s)) {
      const MatrixRF x = activations(n, s.cols, uint32_t(n + s.cols));
      const MatrixRF y = cpu::nf4_linear(cpu::LinearContext{isa, cpu::Activations::Fp32, &pool}, w, x);
      double worst = 0;
      for (int t = 0; t < n; ++t)
        for (int64_t r = 0; r < s.rows; ++r) {
          double exact = 0, magnitude = 0;
          for (int64_t c = 0; c < s.cols; ++c) {
            const double p = weight(w, r, c) * double(x(t, c));
            exact += p;
            magnitude += std::abs(p);
          }
          const double limit = (double(s.cols) + 8) * kU * magnitude + 1e-30;
          worst = std::max(worst, std::isnan(y(t, r)) ? INFINITY : std::abs(y(t, r) - exact) / limit);
        }
      all &= report("nf4_gemv_fp32", s, n, isa, worst);
    }
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// nf4_dequantize: each weight is code x absmax rounded once to FP32, so every kernel set must give
// exactly float(code * absmax) (limit 0: any difference fails). Rows [1, rows - 1) when there are
// more than two, a range that starts and ends off any row-block boundary; at most 64 rows.
TEST_P(OpTable, Nf4Dequantize) {
  const Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  bool all = true;
  for (const auto& s : ops::kMatrixShapes) {
    const auto w = make_matrix(s);
    const int64_t r0 = s.rows > 2 ? 1 : 0, r1 = std::min<int64_t>(r0 + 64, s.rows > 2 ? s.rows - 1 : s.rows);
    std::vector<float> out(static_cast<size_t>((r1 - r0) * s.cols), std::nanf(""));
    cpu::dequantize_rows(isa, w, r0, r1, out.data());
    double worst = 0;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < s.cols; ++c) {
        const float want = float(weight(w, r, c)), got = out[size_t((r - r0) * s.cols + c)];
        if (std::memcmp(&want, &got, sizeof(float)) != 0) worst = INFINITY;
      }
    all &= report("nf4_dequantize", s, int(r1 - r0), isa, worst);
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// nf4_gemv_int8: the int8 path as the engines call it (activations quantized per 32, integer dot
// products). Against the float64 value of the same integer model (quantize_q8's q and d, kNf4Int8),
// the FP32 sum of per-segment terms: |y - model| <= (cols + 4) u sum |terms|. And against the exact
// product on the dequantized weights within the rounding the path makes, derived per element:
// sum_c |w - w^| |x| + |w^| |x - x^| (w^ = absmax kNf4Int8 / 127, x^ = 127 d q), plus the FP32 part.
TEST_P(OpTable, Nf4GemvInt8) {
  const Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  cpu::ThreadPool pool(2);
  bool all = true;
  for (const auto& s : ops::kMatrixShapes) {
    const auto w = make_matrix(s);
    const int64_t groups = (s.cols + cpu::kQ8Group - 1) / cpu::kQ8Group;
    for (const int n : token_counts(s)) {
      const MatrixRF x = activations(n, s.cols, uint32_t(3 * n + s.cols));
      const MatrixRF y = cpu::nf4_linear(cpu::LinearContext{isa, cpu::Activations::Int8, &pool}, w, x);
      double worst = 0;
      std::vector<int8_t> q(static_cast<size_t>(s.cols));
      std::vector<float> d(static_cast<size_t>(groups));
      for (int t = 0; t < n; ++t) {
        cpu::quantize_q8(x.row(t).data(), s.cols, q.data(), d.data());
        for (int64_t r = 0; r < s.rows; ++r) {
          double model = 0, magnitude = 0, exact = 0, rounding = 0;
          for (int64_t c = 0; c < s.cols; ++c) {
            const int64_t e = r * s.cols + c;
            const double a = w.absmax[size_t(e / s.blocksize)];
            const int code = code_at(w, e);
            const double term = a * double(d[size_t(c / 32)]) * cpu::kNf4Int8[code] * q[size_t(c)];
            model += term;
            magnitude += std::abs(term);
            const double wv = weight(w, r, c), w_hat = a * cpu::kNf4Int8[code] / 127.0;
            const double xv = x(t, c), x_hat = 127.0 * double(d[size_t(c / 32)]) * q[size_t(c)];
            exact += wv * xv;
            rounding += std::abs(wv - w_hat) * std::abs(xv) + std::abs(w_hat) * std::abs(xv - x_hat);
          }
          const double fp32 = (double(s.cols) + 4) * kU * magnitude + 1e-30;
          const double got = y(t, r);
          worst = std::max({worst, std::isnan(got) ? INFINITY : std::abs(got - model) / fp32,
                            std::abs(got - exact) / (rounding + fp32 + 1e-6 * std::abs(exact) + 1e-30)});
        }
      }
      all &= report("nf4_gemv_int8", s, n, isa, worst);
    }
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// The lm_head formats (--lm-head q8 | bf16) on the table's shapes as dense matrices: q8 against the
// float64 value of its integer model ((cols + 4) u sum |terms|); bf16 against float64 on the BF16 values
// ((cols + 4) u sum |w x|).
TEST_P(OpTable, LmHeadQ8AndBf16) {
  const Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  cpu::ThreadPool pool(2);
  bool all = true;
  for (const auto& s : ops::kMatrixShapes) {
    if (s.benchmark) continue;  // the lm_head is 32000 x 4096: its kernels are the same on any row count
    MatrixRF dense(s.rows, s.cols);
    {
      std::mt19937 rng(uint32_t(s.cols));
      std::normal_distribution<float> normal(0.0f, 0.02f);
      for (Eigen::Index i = 0; i < dense.size(); ++i) dense.data()[i] = normal(rng);
    }
    const auto q8 = cpu::quantize_rows_q8(dense);
    const auto bf = cpu::round_rows_bf16(dense);
    for (const int n : token_counts(s)) {
      const MatrixRF x = activations(n, s.cols, uint32_t(5 * n + s.cols));
      const MatrixRF yq = cpu::q8_linear(isa, q8, x, &pool), yb = cpu::bf16_linear(isa, bf, x, &pool);
      const int64_t groups = (s.cols + 31) / 32;
      std::vector<int8_t> q(static_cast<size_t>(s.cols));
      std::vector<float> d(static_cast<size_t>(groups));
      double worst_q = 0, worst_b = 0;
      for (int t = 0; t < n; ++t) {
        cpu::quantize_q8(x.row(t).data(), s.cols, q.data(), d.data());
        for (int64_t r = 0; r < s.rows; ++r) {
          double mq = 0, aq = 0, mb = 0, ab = 0;
          for (int64_t c = 0; c < s.cols; ++c) {
            const double tq = 127.0 * q8.scale[size_t(r)] * double(d[size_t(c / 32)]) *
                              q8.values[size_t(r * s.cols + c)] * q[size_t(c)];
            mq += tq;
            aq += std::abs(tq);
            const double tb = double(bf16_to_f32(bf.values[size_t(r * s.cols + c)])) * double(x(t, c));
            mb += tb;
            ab += std::abs(tb);
          }
          worst_q = std::max(worst_q, std::isnan(yq(t, r)) ? INFINITY : std::abs(yq(t, r) - mq) / ((double(s.cols) + 4) * kU * aq + 1e-30));
          worst_b = std::max(worst_b, std::isnan(yb(t, r)) ? INFINITY : std::abs(yb(t, r) - mb) / ((double(s.cols) + 4) * kU * ab + 1e-30));
        }
      }
      all &= report("lm_head_q8", s, n, isa, worst_q);
      all &= report("lm_head_bf16", s, n, isa, worst_b);
    }
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// moe_swiglu: the MoE block (each routed token through its experts' w1, w3, silu(w1 x) * w3 x, w2, and
// the gate-weighted sum), FP32 activations, against float64 on the dequantized weights. Bound carried
// through each step per element: w1 x and w3 x within E = (hidden + 8) u sum |w x| (as nf4_gemv_fp32);
// silu has slope at most 1.1, so h = silu(g) u is off by 1.1 Eg (|u| + Eu) + |silu(g)| Eu plus 8 u |h|
// for silu's exp and division and the product; w2 h by sum |w2| Eh + (ffn + 8) u sum |w2 h|; the gate
// sum adds 4 u sum |gate y|.
TEST_P(OpTable, MoeSwiglu) {
  const Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  cpu::ThreadPool pool(2);
  bool all = true;
  struct MoeShape {
    const char* name;
    int64_t hidden, ffn;
    int blocksize;
  };
  for (const MoeShape& m : {MoeShape{"moe_h96_f160_bs32", 96, 160, 32}, MoeShape{"moe_h256_f448_bs64", 256, 448, 64}}) {
    std::vector<cpu::Nf4Expert> experts;
    for (int e = 0; e < 4; ++e) {
      const MatrixShape up{"w1", m.ffn, m.hidden, m.blocksize, true, false}, down{"w2", m.hidden, m.ffn, m.blocksize, true, false};
      const MatrixShape gate_up{"w3", m.ffn, m.hidden, m.blocksize, false, false};
      experts.push_back({make_matrix(up, 3 * e + 1), make_matrix(gate_up, 3 * e + 2), make_matrix(down, 3 * e + 3)});
    }
    for (const int n : {1, 3, 8, 16}) {
      const MatrixRF x = activations(n, m.hidden, uint32_t(7 * n + m.hidden));
      MatrixRI chosen(n, 2);
      MatrixRF gates(n, 2);
      for (int t = 0; t < n; ++t) {
        chosen(t, 0) = t % 4;
        chosen(t, 1) = (t + 1 + t / 4) % 4;
        gates(t, 0) = 0.6f + 0.01f * float(t);
        gates(t, 1) = 1.0f - gates(t, 0);
      }
      const MatrixRF y = cpu::moe_block(cpu::LinearContext{isa, cpu::Activations::Fp32, &pool}, experts, x, chosen, gates);
      double worst = 0;
      for (int t = 0; t < n; ++t) {
        std::vector<double> out(static_cast<size_t>(m.hidden), 0.0), bound(static_cast<size_t>(m.hidden), 0.0);
        for (int j = 0; j < 2; ++j) {
          const auto& ex = experts[size_t(chosen(t, j))];
          std::vector<double> h(static_cast<size_t>(m.ffn)), eh(static_cast<size_t>(m.ffn));
          for (int64_t f = 0; f < m.ffn; ++f) {
            double g = 0, ag = 0, u = 0, au = 0;
            for (int64_t c = 0; c < m.hidden; ++c) {
              g += weight(ex.w1, f, c) * x(t, c);
              ag += std::abs(weight(ex.w1, f, c) * x(t, c));
              u += weight(ex.w3, f, c) * x(t, c);
              au += std::abs(weight(ex.w3, f, c) * x(t, c));
            }
            const double eg = (double(m.hidden) + 8) * kU * ag, eu = (double(m.hidden) + 8) * kU * au;
            const double silu = g / (1 + std::exp(-g));
            h[size_t(f)] = silu * u;
            eh[size_t(f)] = 1.1 * eg * (std::abs(u) + eu) + std::abs(silu) * eu + 8 * kU * std::abs(silu * u);
          }
          for (int64_t c = 0; c < m.hidden; ++c) {
            double yc = 0, ay = 0, prop = 0;
            for (int64_t f = 0; f < m.ffn; ++f) {
              yc += weight(ex.w2, c, f) * h[size_t(f)];
              ay += std::abs(weight(ex.w2, c, f) * h[size_t(f)]);
              prop += std::abs(weight(ex.w2, c, f)) * eh[size_t(f)];
            }
            const double gate = gates(t, j);
            out[size_t(c)] += gate * yc;
            bound[size_t(c)] += gate * (prop + (double(m.ffn) + 8) * kU * ay) + 4 * kU * std::abs(gate * yc);
          }
        }
        for (int64_t c = 0; c < m.hidden; ++c)
          worst = std::max(worst, std::isnan(y(t, c)) ? INFINITY : std::abs(y(t, c) - out[size_t(c)]) / (bound[size_t(c)] + 1e-30));
      }
      all &= report("moe_swiglu", MatrixShape{m.name, m.hidden, m.ffn, m.blocksize, true, false}, n, isa, worst);
    }
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

INSTANTIATE_TEST_SUITE_P(AllIsas, OpTable, ::testing::ValuesIn(cpu::kAllIsas),
                         [](const auto& info) { return isa_test_name(info.param); });

}  // namespace
}  // namespace moelab::test
