// The op table on the device (cuda-nf4's kernels): the shapes of tests/ops/op_cases.hpp that cuda-nf4
// stores (blocksize 64, plain FP32 absmax, cols a multiple of 32; any other shape prints a SKIP line
// with that reason), every token count, against the same float64 host result and the same per-op
// limits as the CPU kernel sets (tests/ops/test_op_table.cpp). Without a GPU each test is SKIPPED
// with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iomanip>
#include <random>

#include "cuda_test_util.hpp"
#include "ops/op_cases.hpp"
#include "optimized/cuda/kernels.hpp"
#include "optimized/nf4/code_values.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::cuda {
namespace {

using namespace moelab::cuda::test;
using ops::MatrixShape;
constexpr double kU = 0x1p-24;

bool cuda_stores(const MatrixShape& s) { return s.blocksize == 64 && s.cols % 32 == 0; }

struct HostNf4 {
  nf4::QuantizedTensor q;
  std::vector<float> absmax;
};

HostNf4 make(const MatrixShape& s) {
  std::mt19937 rng(uint32_t(s.rows * 131 + s.cols * 7 + s.blocksize));
  const auto w = random_vector(size_t(s.rows * s.cols), rng, 0.05f);
  HostNf4 h{nf4::quantize_nf4(w.data(), s.rows * s.cols, 64, s.double_quant), {}};
  h.absmax = nf4::block_absmax(h.q);  // double quantization undone, as on upload
  return h;
}

double weight(const HostNf4& h, const MatrixShape& s, int64_t r, int64_t c) {
  const int64_t e = r * s.cols + c;
  const uint8_t byte = h.q.packed[size_t(e >> 1)];
  const int code = (e & 1) ? byte & 15 : byte >> 4;
  return double(nf4::kCodeValues[code]) * double(h.absmax[size_t(e / 64)]);
}

bool report(const char* op, const MatrixShape& s, int n, double worst) {
  const bool pass = worst <= 1.0;
  std::cout << "[ op       ] " << std::left << std::setw(16) << op << std::setw(22) << s.name << " n=" << std::setw(3) << n
            << std::setw(12) << "cuda" << (pass ? "PASS" : "FAIL") << "  max err/limit " << std::setprecision(3) << worst
            << "\n";
  return pass;
}

void say_skip(const char* op, const MatrixShape& s) {
  std::cout << "[ op       ] " << std::left << std::setw(16) << op << std::setw(22) << s.name << "       " << std::setw(12)
            << "cuda" << "SKIP (cuda-nf4 stores blocksize 64 and cols a multiple of 32)\n";
}

// nf4_gemv_fp32 on the device: one launch per token (the kernel takes one vector), limit
// (cols + 8) u sum |w x| per element, as on the CPU.
TEST(OpTableCuda, Nf4GemvFp32) {
  SKIP_WITHOUT_GPU();
  bool all = true;
  for (const auto& s : ops::kMatrixShapes) {
    if (!cuda_stores(s)) {
      say_skip("nf4_gemv_fp32", s);
      continue;
    }
    const auto h = make(s);
    DeviceBuffer<uint8_t> codes(h.q.packed);
    DeviceBuffer<float> absmax(h.absmax);
    for (const int n : {1, 2, 8}) {
      if (s.benchmark && n > 1) continue;
      std::mt19937 rng(uint32_t(n + s.cols));
      double worst = 0;
      for (int t = 0; t < n; ++t) {
        const auto x = random_vector(size_t(s.cols), rng, t % 2 ? 0.3f : 2.0f);
        DeviceBuffer<float> dx(x), dy(static_cast<size_t>(s.rows));
        nf4_gemv(codes.ptr, absmax.ptr, s.rows, s.cols, dx.ptr, dy.ptr, nullptr);
        const auto y = dy.read();
        for (int64_t r = 0; r < s.rows; ++r) {
          double exact = 0, magnitude = 0;
          for (int64_t c = 0; c < s.cols; ++c) {
            const double p = weight(h, s, r, c) * double(x[size_t(c)]);
            exact += p;
            magnitude += std::abs(p);
          }
          const double limit = (double(s.cols) + 8) * kU * magnitude + 1e-30;
          worst = std::max(worst, std::isnan(y[size_t(r)]) ? INFINITY : std::abs(y[size_t(r)] - exact) / limit);
        }
      }
      all &= report("nf4_gemv_fp32", s, n, worst);
    }
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// nf4_dequantize on the device: exactly float(code * absmax), limit 0, rows [1, rows - 1) (at most 64).
TEST(OpTableCuda, Nf4Dequantize) {
  SKIP_WITHOUT_GPU();
  bool all = true;
  for (const auto& s : ops::kMatrixShapes) {
    if (!cuda_stores(s)) {
      say_skip("nf4_dequantize", s);
      continue;
    }
    const auto h = make(s);
    DeviceBuffer<uint8_t> codes(h.q.packed);
    DeviceBuffer<float> absmax(h.absmax);
    const int64_t r0 = s.rows > 2 ? 1 : 0, r1 = std::min<int64_t>(r0 + 64, s.rows > 2 ? s.rows - 1 : s.rows);
    DeviceBuffer<float> out(static_cast<size_t>((r1 - r0) * s.cols));
    nf4_dequantize_rows(codes.ptr, absmax.ptr, r0, r1 - r0, s.cols, out.ptr, nullptr);
    const auto got = out.read();
    double worst = 0;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < s.cols; ++c) {
        const float want = float(weight(h, s, r, c)), g = got[size_t((r - r0) * s.cols + c)];
        if (std::memcmp(&want, &g, sizeof(float)) != 0) worst = INFINITY;
      }
    all &= report("nf4_dequantize", s, int(r1 - r0), worst);
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

}  // namespace
}  // namespace moelab::cuda
