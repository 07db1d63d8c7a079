// Device tests of the cuda-nf4 attention (label "device"): the split-KV decode and the tiled prefill on
// random inputs against a float64 host attention, beyond the 12,288 keys of the first kernel, with and
// without a sliding window, at Mixtral's GQA shape and at small ones; outputs poisoned with NaN first.
// Tolerance 1e-5 relative L2: FP32 dot products over head_dim terms and an FP32 online softmax whose
// rescalings round at 2^-24 each, against float64 (the fast __expf adds ~2^-21 relative per weight).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "optimized/cuda/attention.hpp"

namespace moelab::cuda {
namespace {

using namespace moelab::cuda::test;

struct Case {
  int n, start, heads, kv_heads, head_dim, window;
};

std::vector<double> host_attention(const std::vector<float>& q, const std::vector<float>& k,
                                   const std::vector<float>& v, const Case& c) {
  std::vector<double> out(size_t(c.n) * c.heads * c.head_dim, 0.0);
  const int group = c.heads / c.kv_heads, stride = c.kv_heads * c.head_dim;
  for (int t = 0; t < c.n; ++t)
    for (int h = 0; h < c.heads; ++h) {
      const int p = c.start + t, kvh = h / group;
      const int first = c.window > 0 ? std::max(0, p - c.window + 1) : 0;
      std::vector<double> s;
      double mx = -1e300;
      for (int j = first; j <= p; ++j) {
        double dot = 0;
        for (int d = 0; d < c.head_dim; ++d)
          dot += double(q[(size_t(t) * c.heads + h) * c.head_dim + d]) * k[size_t(j) * stride + kvh * c.head_dim + d];
        s.push_back(dot / std::sqrt(double(c.head_dim)));
        mx = std::max(mx, s.back());
      }
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (int j = first; j <= p; ++j)
        for (int d = 0; d < c.head_dim; ++d)
          out[(size_t(t) * c.heads + h) * c.head_dim + d] +=
              s[size_t(j - first)] / sum * v[size_t(j) * stride + kvh * c.head_dim + d];
    }
  return out;
}

void run_case(const Case& c, bool decode_path, std::mt19937& rng) {
  SCOPED_TRACE(testing::Message() << "n " << c.n << " start " << c.start << " heads " << c.heads << "/" << c.kv_heads
                                  << " head_dim " << c.head_dim << " window " << c.window
                                  << (decode_path ? " split-KV" : " tiled"));
  const int keys = c.start + c.n;
  const auto q = random_vector(size_t(c.n) * c.heads * c.head_dim, rng);
  const auto k = random_vector(size_t(keys) * c.kv_heads * c.head_dim, rng);
  const auto v = random_vector(size_t(keys) * c.kv_heads * c.head_dim, rng);
  DeviceBuffer<float> dq(q), dk(k), dv(v), dout(size_t(c.n) * c.heads * c.head_dim);
  if (decode_path) {
    const int sm = 132;
    const int64_t floats = attention_workspace_floats(c.n, c.start, c.window, c.heads, c.head_dim, sm);
    DeviceBuffer<float> work(size_t(std::max<int64_t>(floats, 1)));
    attention_decode_split_kv(dq.ptr, dk.ptr, dv.ptr, c.n, c.start, c.heads, c.kv_heads, c.head_dim, c.window,
                              dout.ptr, work.ptr, floats, sm, nullptr);
    EXPECT_LT(rel_l2(dout.read(), host_attention(q, k, v, c)), 1e-5);
  } else {
    attention_prefill_tiled(dq.ptr, dk.ptr, dv.ptr, c.n, c.start, c.heads, c.kv_heads, c.head_dim, c.window, dout.ptr,
                            nullptr);
    EXPECT_LT(rel_l2(dout.read(), host_attention(q, k, v, c)), 1e-5);
  }
}

TEST(CudaAttention, SplitKvDecodeMatchesFloat64) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  for (const Case& c : {Case{1, 0, 4, 2, 16, 0}, Case{1, 99, 32, 8, 128, 0}, Case{1, 4999, 32, 8, 128, 0},
                        Case{1, 39999, 32, 8, 128, 0}, Case{1, 39999, 32, 8, 128, 4096}, Case{1, 500, 4, 2, 16, 37},
                        Case{3, 2000, 8, 8, 64, 0}, Case{4, 70, 4, 1, 256, 5}})
    run_case(c, /*decode_path=*/true, rng);
}

TEST(CudaAttention, TiledPrefillMatchesFloat64) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(22);
  for (const Case& c : {Case{1, 0, 4, 2, 16, 0}, Case{7, 0, 4, 2, 16, 0}, Case{64, 0, 32, 8, 128, 0},
                        Case{300, 0, 4, 2, 32, 0}, Case{300, 250, 8, 2, 128, 0}, Case{64, 13000, 8, 8, 128, 0},
                        Case{300, 0, 4, 2, 16, 37}, Case{100, 5000, 8, 2, 64, 4096}, Case{9, 3, 4, 4, 256, 4}})
    run_case(c, /*decode_path=*/false, rng);
}

TEST(CudaAttention, BadShapesAreClearErrors) {
  SKIP_WITHOUT_GPU();
  EXPECT_THROW(attention_prefill_tiled(nullptr, nullptr, nullptr, 4, 0, 6, 4, 16, 0, nullptr, nullptr), Error);
  EXPECT_THROW(attention_prefill_tiled(nullptr, nullptr, nullptr, 4, 0, 4, 2, 512, 0, nullptr, nullptr), Error);
  EXPECT_THROW(attention_decode_split_kv(nullptr, nullptr, nullptr, 1, 5000, 32, 8, 128, 0, nullptr, nullptr, 1, 132,
                                         nullptr),
               Error);
}

}  // namespace
}  // namespace moelab::cuda
