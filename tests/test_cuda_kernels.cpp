// Device tests of the cuda-nf4 kernels (label "device"): each kernel on fresh random inputs against a
// plain host computation, outputs poisoned with NaN first so an unwritten element fails. Where no CUDA
// device is present every test is skipped with the reason (ctest then reports it skipped, not failed).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "optimized/cuda/check.hpp"
#include "optimized/cuda/device_info.hpp"
#include "core/dtype.hpp"
#include "optimized/cuda/kernels.hpp"
#include "optimized/cuda/random_fill.hpp"
#include "optimized/nf4/nf4.hpp"
#include "cuda_test_util.hpp"

namespace moelab::cuda {
namespace {

using namespace moelab::cuda::test;

TEST(CudaKernels, Nf4GemvAndDequantizeMatchHost) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(1);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 32}, {7, 96}, {33, 4096}, {1024, 14336}, {4096, 1024}}) {
    const auto w = random_vector(size_t(rows * cols), rng, 0.02f);
    const auto q = nf4::quantize_nf4(w.data(), rows * cols, 64, /*double_quant=*/true);
    const auto absmax = nf4::block_absmax(q);  // double quantization undone, as on upload
    const auto deq = nf4::dequantize(q);
    const auto x = random_vector(size_t(cols), rng);
    std::vector<double> want(size_t(rows), 0.0);  // float64 over the dequantized weights
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) want[r] += double(deq[r * cols + c]) * x[c];
    DeviceBuffer<uint8_t> d_codes(q.packed);
    DeviceBuffer<float> d_absmax(absmax), d_x(x), d_y(static_cast<size_t>(rows)), d_deq(static_cast<size_t>(rows * cols));
    nf4_gemv(d_codes.ptr, d_absmax.ptr, rows, cols, d_x.ptr, d_y.ptr, nullptr);
    // FP32 accumulation over `cols` terms: the error bound grows like sqrt(cols) * 2^-24 relative.
    EXPECT_LT(rel_l2(d_y.read(), want), 1e-5) << rows << "x" << cols;
    const int64_t r0 = rows / 3, nr = rows - r0;
    nf4_dequantize_rows(d_codes.ptr, d_absmax.ptr, r0, nr, cols, d_deq.ptr, nullptr);
    const auto got = d_deq.read();
    for (int64_t i = 0; i < nr * cols; ++i) ASSERT_EQ(got[i], deq[r0 * cols + i]) << i;  // both compute code * absmax in FP32: exact
  }
}

// The BF16 path: activations rounded to BF16 (as convert_activations does, checked bit for bit against
// core/dtype's round-to-nearest-even), the GEMV widening them exactly, the BF16 band rounding code *
// absmax. Tolerances as in the FP32 test: only the accumulation order differs from the float64 sum.
TEST(CudaKernels, Bf16ActivationsGemvAndBandMatchHost) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(4);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{3, 64}, {129, 4096}, {4096, 14336}}) {
    const auto w = random_vector(size_t(rows * cols), rng, 0.02f);
    const auto q = nf4::quantize_nf4(w.data(), rows * cols, 64, /*double_quant=*/true);
    const auto absmax = nf4::block_absmax(q);
    const auto deq = nf4::dequantize(q);
    const auto x = random_vector(size_t(cols), rng);
    DeviceBuffer<float> d_x(x), d_absmax(absmax), d_y(static_cast<size_t>(rows));
    DeviceBuffer<uint16_t> d_xb(static_cast<size_t>(cols)), d_band(static_cast<size_t>(rows * cols));
    DeviceBuffer<uint8_t> d_codes(q.packed);
    convert_activations(d_x.ptr, cols, d_xb.ptr, ActType::bf16, nullptr);
    const auto xb = d_xb.read();
    std::vector<double> want(size_t(rows), 0.0);
    for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(xb[c], f32_to_bf16(x[c])) << c;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) want[r] += double(deq[r * cols + c]) * bf16_to_f32(xb[c]);
    nf4_gemv(d_codes.ptr, d_absmax.ptr, rows, cols, d_xb.ptr, ActType::bf16, d_y.ptr, nullptr);
    EXPECT_LT(rel_l2(d_y.read(), want), 1e-5) << rows << "x" << cols;
    nf4_dequantize_rows(d_codes.ptr, d_absmax.ptr, 0, rows, cols, d_band.ptr, ActType::bf16, nullptr);
    const auto band = d_band.read();
    for (int64_t i = 0; i < rows * cols; ++i) ASSERT_EQ(band[i], f32_to_bf16(deq[i])) << i;
  }
}

// Synthetic weights: reproducible from the seed alone, different for another seed, and distributed as
// asked (uniform codes: each of the 16 nibble values within 5 sigma of 1/16; normal: mean and std).
TEST(CudaKernels, RandomFillsAreReproducibleAndDistributedAsAsked) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 1 << 20;
  DeviceBuffer<uint8_t> a(static_cast<size_t>(n)), b(static_cast<size_t>(n)), c(static_cast<size_t>(n));
  fill_random_bytes(a.ptr, n, 7, nullptr);
  fill_random_bytes(b.ptr, n, 7, nullptr);
  fill_random_bytes(c.ptr, n, 8, nullptr);
  const auto ha = a.read(), hb = b.read(), hc = c.read();
  EXPECT_EQ(ha, hb);
  EXPECT_NE(ha, hc);
  std::vector<int64_t> nibbles(16, 0);
  for (uint8_t v : ha) ++nibbles[v >> 4], ++nibbles[v & 15];
  const double expect = 2.0 * n / 16, sigma = std::sqrt(expect * 15.0 / 16.0);
  for (int k = 0; k < 16; ++k) EXPECT_LT(std::abs(nibbles[k] - expect), 5 * sigma) << "nibble " << k;

  DeviceBuffer<float> g(static_cast<size_t>(n)), u(static_cast<size_t>(n));
  fill_random_normal(g.ptr, n, 0.5f, 3, nullptr);
  fill_random_uniform(u.ptr, n, -2.0f, 3.0f, 4, nullptr);
  double s1 = 0, s2 = 0;
  for (float v : g.read()) s1 += v, s2 += double(v) * v;
  EXPECT_NEAR(s1 / n, 0.0, 5 * 0.5 / std::sqrt(double(n)));
  EXPECT_NEAR(std::sqrt(s2 / n), 0.5, 0.005);
  const auto hu = u.read();
  EXPECT_GE(*std::min_element(hu.begin(), hu.end()), -2.0f);
  EXPECT_LT(*std::max_element(hu.begin(), hu.end()), 3.0f);
  EXPECT_NEAR(std::accumulate(hu.begin(), hu.end(), 0.0) / n, 0.5, 0.01);
}

TEST(CudaKernels, RmsNormSwigluRouterMatchHost) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(2);
  const int n = 5, dim = 4096, experts = 8, top_k = 2;
  const auto x = random_vector(size_t(n) * dim, rng), w = random_vector(dim, rng);
  DeviceBuffer<float> d_x(x), d_w(w), d_out(static_cast<size_t>(n) * dim);
  rms_norm(d_x.ptr, d_w.ptr, n, dim, 1e-5f, d_out.ptr, nullptr);
  std::vector<double> want(size_t(n) * dim);
  for (int t = 0; t < n; ++t) {
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double(x[t * dim + i]) * x[t * dim + i];
    const double inv = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int i = 0; i < dim; ++i) want[t * dim + i] = w[i] * (x[t * dim + i] * inv);
  }
  EXPECT_LT(rel_l2(d_out.read(), want), 1e-6);

  const auto gu = random_vector(size_t(n) * 2 * dim, rng, 3.0f);
  DeviceBuffer<float> d_gu(gu), d_h(static_cast<size_t>(n) * dim);
  swiglu(d_gu.ptr, n, dim, d_h.ptr, nullptr);
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < dim; ++i) {
      const double g = gu[t * 2 * dim + i], u = gu[t * 2 * dim + dim + i];
      want[t * dim + i] = g / (1.0 + std::exp(-g)) * u;
    }
  EXPECT_LT(rel_l2(d_h.read(), want), 1e-6);

  const int tokens = 300;
  const auto logits = random_vector(size_t(tokens) * experts, rng, 2.0f);
  DeviceBuffer<float> d_l(logits), d_g(static_cast<size_t>(tokens) * top_k);
  DeviceBuffer<int32_t> d_e(static_cast<size_t>(tokens) * top_k);
  router_topk(d_l.ptr, tokens, experts, top_k, d_e.ptr, d_g.ptr, nullptr);
  const auto ge = d_e.read();
  const auto gg = d_g.read();
  for (int t = 0; t < tokens; ++t) {
    std::vector<int> order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return logits[t * experts + a] > logits[t * experts + b]; });
    // softmax is monotone, so the top-k of the logits is the top-k of the probabilities; the renormalized
    // gates of the two are p_a / (p_a + p_b) = 1 / (1 + exp(l_b - l_a)).
    EXPECT_EQ(ge[t * 2], order[0]);
    EXPECT_EQ(ge[t * 2 + 1], order[1]);
    const double d = logits[t * experts + order[1]] - logits[t * experts + order[0]];
    EXPECT_NEAR(gg[t * 2], 1.0 / (1.0 + std::exp(d)), 1e-6);
    EXPECT_NEAR(gg[t * 2] + gg[t * 2 + 1], 1.0, 1e-6);
  }
}

TEST(CudaKernels, BadLaunchIsAClearError) {
  SKIP_WITHOUT_GPU();
  EXPECT_THROW(nf4_gemv(nullptr, nullptr, 4, 48, nullptr, nullptr, nullptr), Error);
  EXPECT_THROW(router_topk(nullptr, 1, 65, 2, nullptr, nullptr, nullptr), Error);
}

}  // namespace
}  // namespace moelab::cuda
