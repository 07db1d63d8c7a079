// The op table on the device (cuda-nf4's kernels): the shapes of tests/ops/op_cases.hpp that cuda-nf4
// stores (blocksize 64, plain FP32 absmax, cols a multiple of 32; any other shape prints a SKIP line
// with that reason), every token count, against the same float64 host result and the same per-op
// limits as the CPU kernel sets (tests/ops/test_op_table.cpp); and the decoder-layer op cases (RMSNorm,
// RoPE, attention on both device paths, router top-k) on the inputs, float64 results and limits of
// tests/ops/layer_op_checks.hpp, the CPU table's. Without a GPU each test is SKIPPED with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iomanip>
#include <random>

#include "cuda_test_util.hpp"
#include "ops/layer_op_checks.hpp"
#include "ops/op_cases.hpp"
#include "optimized/cuda/attention.hpp"
#include "optimized/cuda/kernels.hpp"
#include "optimized/cuda/layer_kernels.hpp"
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

// ---------------------------------------------------------------------------------------------------
// Decoder-layer ops. Device buffers start as NaN (DeviceBuffer), so an element a kernel skips fails.

bool report_layer(const char* op, const char* name, int n, const char* backend, double worst) {
  const bool pass = worst <= 1.0;
  std::cout << "[ op       ] " << std::left << std::setw(18) << op << std::setw(28) << name << " n=" << std::setw(3) << n
            << std::setw(13) << backend << (pass ? "PASS" : "FAIL") << "  max err/limit " << std::setprecision(3) << worst
            << "\n";
  return pass;
}

// rms_norm: limit (dim / 2 + 8) u |out64|, which covers rsqrtf's 2 ulp (layer_op_checks.hpp).
TEST(OpTableCuda, RmsNorm) {
  SKIP_WITHOUT_GPU();
  bool all = true;
  for (const auto& c : ops::kNormCases) {
    const auto in = ops::norm_inputs(c);
    DeviceBuffer<float> x(in.x), w(in.w), out(in.x.size());
    rms_norm(x.ptr, w.ptr, c.n, c.dim, in.eps, out.ptr, nullptr);
    all &= report_layer("rms_norm", c.name, c.n, "cuda", ops::check_rms_norm(c, in, out.read().data()));
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// rope: the device kernel in place, on float64's inverse frequencies rounded to FP32 (the op's input;
// the CPU table checks cpu-nf4's own), limit (|a| + |b|) u (|theta| + 6).
TEST(OpTableCuda, Rope) {
  SKIP_WITHOUT_GPU();
  bool all = true;
  for (const auto& c : ops::kRopeCases) {
    std::vector<float> inv_freq;
    for (int i = 0; i < c.head_dim / 2; ++i) inv_freq.push_back(float(std::pow(c.theta, -2.0 * i / c.head_dim)));
    const auto x0 = ops::rope_inputs(c);
    DeviceBuffer<float> x(x0), f(inv_freq);
    cuda::rope(x.ptr, c.n, c.heads, c.head_dim, c.start, f.ptr, nullptr);
    all &= report_layer("rope", c.name, c.n, "cuda", ops::check_rope(c, x0, inv_freq, x.read().data()));
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// attention: every case on both device paths (split-KV decode and tiled prefill, each callable for any
// n) and through the dispatcher, with the online-softmax limit of layer_op_checks.hpp; the cache rows no
// query may see are NaN; the split-KV workspace starts as NaN.
TEST(OpTableCuda, Attention) {
  SKIP_WITHOUT_GPU();
  int sm = 0;
  MOELAB_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0));
  bool all = true;
  for (const auto& c : ops::kAttentionCases) {
    const auto in = ops::attention_inputs(c);
    const char* op = c.n == 1 ? "attention_decode" : "attention_prefill";
    const size_t out_floats = size_t(c.n) * size_t(c.heads) * size_t(c.head_dim);
    DeviceBuffer<float> q(in.q), k(in.k), v(in.v);
    {
      DeviceBuffer<float> out(out_floats);
      const int64_t floats = attention_workspace_floats(c.n, c.start, c.window, c.heads, c.head_dim, sm);
      DeviceBuffer<float> work(size_t(std::max<int64_t>(floats, 1)));
      attention(q.ptr, k.ptr, v.ptr, c.n, c.start, c.heads, c.kv_heads, c.head_dim, c.window, out.ptr, work.ptr, floats,
                sm, nullptr);
      all &= report_layer(op, c.name, c.n, "cuda", ops::check_attention(c, in, out.read().data(), true));
    }
    {
      DeviceBuffer<float> out(out_floats);
      const KvSplitPlan plan = plan_kv_splits(c.n, c.start, c.window, c.heads, sm);
      const int64_t floats = attention_workspace_floats(plan, c.n, c.heads, c.head_dim);
      DeviceBuffer<float> work(size_t(std::max<int64_t>(floats, 1)));
      attention_decode_split_kv(q.ptr, k.ptr, v.ptr, c.n, c.start, c.heads, c.kv_heads, c.head_dim, c.window, out.ptr,
                                work.ptr, floats, sm, nullptr);
      all &= report_layer(op, c.name, c.n, "cuda-splitkv", ops::check_attention(c, in, out.read().data(), true));
    }
    {
      DeviceBuffer<float> out(out_floats);
      attention_prefill_tiled(q.ptr, k.ptr, v.ptr, c.n, c.start, c.heads, c.kv_heads, c.head_dim, c.window, out.ptr,
                              nullptr);
      all &= report_layer(op, c.name, c.n, "cuda-tiled", ops::check_attention(c, in, out.read().data(), true));
    }
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// router_top_k: router_topk on the device, the chosen set, order and tie rule and the gates checked as on
// the CPU (layer_op_checks.hpp). Outputs start as -1 and NaN.
TEST(OpTableCuda, RouterTopK) {
  SKIP_WITHOUT_GPU();
  bool all = true;
  for (const auto& c : ops::kRouterCases) {
    const auto logits = ops::router_logits(c);
    DeviceBuffer<float> l(logits), gates(size_t(c.n) * size_t(c.top_k));
    DeviceBuffer<int32_t> experts(size_t(c.n) * size_t(c.top_k));
    router_topk(l.ptr, c.n, c.experts, c.top_k, experts.ptr, gates.ptr, nullptr);
    all &= report_layer("router_top_k", c.name, c.n, "cuda",
                        ops::check_router(c, logits, experts.read().data(), gates.read().data()));
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

// swiglu (the device's separate kernel; on the CPU it is inside moe_block, the MoeSwiglu op case):
// h = silu(g) u on the RMSNorm cases' shapes, g and u normal with sd 3. Limit 8 u |h64|: expf within
// 2 ulp (4u relative), so 1 + exp(-g) within 5u; the division and the product u each; one u of slack.
TEST(OpTableCuda, Swiglu) {
  SKIP_WITHOUT_GPU();
  bool all = true;
  for (const auto& c : ops::kNormCases) {
    std::mt19937 rng(uint32_t(c.n * 3 + c.dim));
    const auto gu = random_vector(size_t(c.n) * 2 * size_t(c.dim), rng, 3.0f);
    DeviceBuffer<float> d_gu(gu), h(size_t(c.n) * size_t(c.dim));
    swiglu(d_gu.ptr, c.n, c.dim, h.ptr, nullptr);
    const auto got = h.read();
    double worst = 0;
    for (int t = 0; t < c.n; ++t)
      for (int i = 0; i < c.dim; ++i) {
        const double g = gu[size_t(t) * 2 * size_t(c.dim) + size_t(i)], u = gu[size_t(t) * 2 * size_t(c.dim) + size_t(c.dim + i)];
        const double want = g / (1 + std::exp(-g)) * u;
        worst = std::max(worst, ops::error_ratio(got[size_t(t) * size_t(c.dim) + size_t(i)], want, 8 * kU * std::abs(want) + 1e-37));
      }
    all &= report_layer("swiglu", c.name, c.n, "cuda", worst);
  }
  EXPECT_TRUE(all) << "a case above FAILed";
}

}  // namespace
}  // namespace moelab::cuda
