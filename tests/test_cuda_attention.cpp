// Device tests of the cuda-nf4 attention (label "device"): the split-KV decode and the tiled prefill on
// random inputs against a float64 host attention, beyond the 12,288 keys of the first kernel, with and
// without a sliding window, at Mixtral's GQA shape and at the fixtures' small ones; outputs poisoned with
// NaN first, and the cache rows past start + n (unwritten in the engine) poisoned with NaN too, so a
// kernel that uses a key past the last query's position fails.
//
// Tolerance 1e-5 relative L2 against float64: FP32 dot products over head_dim terms, accurate expf, and
// FP32 accumulations whose rounding errors add up like a random walk, about 4e-8 x sqrt(keys one
// accumulator takes) relative: < 5e-6 for the 13,064 keys one prefill warp walks here, < 2e-6 for a
// decode warp's share of 40,000 keys. The two paths against each other: the same bound (each within
// ~3e-6 of float64 on those cases, at most 5,000 keys).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "optimized/cuda/attention.hpp"

namespace moelab::cuda {
namespace {

using namespace moelab::cuda::test;

struct Case {
  int n, start, heads, kv_heads, head_dim, window;
};

constexpr int kSm = 132;           // an H200's multiprocessors: sizes the split-KV plan
constexpr int kPoisonedRows = 40;  // cache rows past start + n, NaN (more than a prefill key tile)

// transformers' eager attention in float64: softmax over the keys j with p - window < j <= p (all j <= p
// without a window) of q.k / sqrt(head_dim), weights times v; KV head h / (heads / kv_heads).
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

// Random inputs of a case, on the device and on the host.
struct Inputs {
  std::vector<float> q, k, v;  // k, v: start + n rows, then kPoisonedRows NaN rows (device only)
  DeviceBuffer<float> dq, dk, dv;
  Inputs(const Case& c, std::mt19937& rng)
      : q(random_vector(size_t(c.n) * c.heads * c.head_dim, rng)),
        k(random_vector(size_t(c.start + c.n) * c.kv_heads * c.head_dim, rng)),
        v(random_vector(size_t(c.start + c.n) * c.kv_heads * c.head_dim, rng)),
        dq(q), dk(poisoned(k, c)), dv(poisoned(v, c)) {}
  static std::vector<float> poisoned(std::vector<float> rows, const Case& c) {
    rows.resize(rows.size() + size_t(kPoisonedRows) * c.kv_heads * c.head_dim, std::nanf(""));
    return rows;
  }
};

std::vector<float> run_decode(const Case& c, const Inputs& in) {
  DeviceBuffer<float> out(size_t(c.n) * c.heads * c.head_dim);
  const KvSplitPlan plan = plan_kv_splits(c.n, c.start, c.window, c.heads, kSm);
  const int64_t floats = attention_workspace_floats(plan, c.n, c.heads, c.head_dim);
  DeviceBuffer<float> work{size_t(floats)};  // NaN: a split that left its slot unwritten fails
  attention_decode_split_kv(in.dq.ptr, in.dk.ptr, in.dv.ptr, c.n, c.start, c.heads, c.kv_heads, c.head_dim, c.window,
                            out.ptr, work.ptr, floats, kSm, nullptr);
  return out.read();
}

std::vector<float> run_prefill(const Case& c, const Inputs& in) {
  DeviceBuffer<float> out(size_t(c.n) * c.heads * c.head_dim);
  attention_prefill_tiled(in.dq.ptr, in.dk.ptr, in.dv.ptr, c.n, c.start, c.heads, c.kv_heads, c.head_dim, c.window,
                          out.ptr, nullptr);
  return out.read();
}

testing::Message describe(const Case& c) {
  return testing::Message() << "n " << c.n << " start " << c.start << " heads " << c.heads << "/" << c.kv_heads
                            << " head_dim " << c.head_dim << " window " << c.window;
}

TEST(CudaAttention, SplitKvDecodeMatchesFloat64) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  // 1, 100, 5,000 and 40,000 keys (past the first kernel's 12,288), with windows of 4,096, 37 and the
  // swa fixture's 4 at head_dim 8, several queries (n <= kMaxDecodeQueries, the dispatcher's decode
  // range), head_dim 256 and ones that do not fill a warp's lanes (16, 40).
  for (const Case& c : {Case{1, 0, 4, 2, 16, 0}, Case{1, 99, 32, 8, 128, 0}, Case{1, 4999, 32, 8, 128, 0},
                        Case{1, 39999, 32, 8, 128, 0}, Case{1, 39999, 8, 2, 64, 4096}, Case{1, 500, 4, 2, 16, 37},
                        Case{1, 30, 4, 2, 8, 4}, Case{3, 2000, 8, 8, 64, 0}, Case{4, 70, 4, 1, 256, 5},
                        Case{2, 777, 6, 3, 40, 100}}) {
    SCOPED_TRACE(describe(c));
    const Inputs in(c, rng);
    EXPECT_LT(rel_l2(run_decode(c, in), host_attention(in.q, in.k, in.v, c)), 1e-5);
  }
}

TEST(CudaAttention, TiledPrefillMatchesFloat64) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(22);
  // n in {1, 7, 64, 300} from position 0 and later, windows none / 4,096 / 37 / 4, GQA 32/8 at
  // head_dim 128 and small shapes; 13,064 keys for one query tile.
  for (const Case& c : {Case{1, 0, 4, 2, 16, 0}, Case{7, 0, 4, 2, 16, 0}, Case{7, 40, 4, 2, 16, 37},
                        Case{64, 0, 32, 8, 128, 0}, Case{64, 13000, 4, 4, 64, 0}, Case{300, 0, 4, 2, 32, 0},
                        Case{300, 250, 8, 2, 128, 0}, Case{300, 0, 4, 2, 16, 37}, Case{300, 100, 6, 3, 40, 37},
                        Case{100, 5000, 8, 2, 64, 4096}, Case{9, 3, 4, 4, 256, 4}, Case{50, 0, 4, 2, 8, 4}}) {
    SCOPED_TRACE(describe(c));
    const Inputs in(c, rng);
    EXPECT_LT(rel_l2(run_prefill(c, in), host_attention(in.q, in.k, in.v, c)), 1e-5);
  }
}

// The two paths on the same inputs, and the dispatcher (which picks one by n) equal to the path it picks.
TEST(CudaAttention, DecodeAndPrefillPathsAgree) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(23);
  for (const Case& c : {Case{1, 4999, 32, 8, 128, 0}, Case{1, 4999, 32, 8, 128, 37}, Case{3, 2000, 8, 8, 64, 0},
                        Case{4, 70, 4, 1, 256, 5}, Case{7, 300, 4, 2, 16, 0}, Case{64, 1000, 4, 2, 32, 37}}) {
    SCOPED_TRACE(describe(c));
    const Inputs in(c, rng);
    const std::vector<float> decode = run_decode(c, in), prefill = run_prefill(c, in);
    EXPECT_LT(rel_l2(decode, std::vector<double>(prefill.begin(), prefill.end())), 1e-5);

    DeviceBuffer<float> out(size_t(c.n) * c.heads * c.head_dim);
    const int64_t floats = attention_workspace_floats(c.n, c.start, c.window, c.heads, c.head_dim, kSm);
    EXPECT_EQ(floats == 0, c.n > kMaxDecodeQueries);
    DeviceBuffer<float> work(size_t(std::max<int64_t>(floats, 1)));
    attention(in.dq.ptr, in.dk.ptr, in.dv.ptr, c.n, c.start, c.heads, c.kv_heads, c.head_dim, c.window, out.ptr,
              work.ptr, floats, kSm, nullptr);
    const std::vector<float> picked = out.read(), expected = c.n <= kMaxDecodeQueries ? decode : prefill;
    EXPECT_EQ(rel_l2(picked, std::vector<double>(expected.begin(), expected.end())), 0.0);
  }
}

// Checked before any CUDA call, so these run without a GPU too.
TEST(CudaAttention, BadArgumentsAreClearErrors) {
  float* none = nullptr;
  EXPECT_THROW(attention_prefill_tiled(none, none, none, 4, 0, 6, 4, 16, 0, none, nullptr), Error);   // 6 % 4
  EXPECT_THROW(attention_prefill_tiled(none, none, none, 4, 0, 4, 2, 512, 0, none, nullptr), Error);  // head_dim
  EXPECT_THROW(attention_prefill_tiled(none, none, none, 0, 0, 4, 2, 16, 0, none, nullptr), Error);   // n
  EXPECT_THROW(attention_prefill_tiled(none, none, none, 4, 0, 4, 2, 16, -1, none, nullptr), Error);  // window
  const int64_t need = attention_workspace_floats(1, 5000, 0, 32, 128, kSm);
  EXPECT_GT(need, 0);
  try {
    attention_decode_split_kv(none, none, none, 1, 5000, 32, 8, 128, 0, none, reinterpret_cast<float*>(64), need - 1,
                              kSm, nullptr);
    ADD_FAILURE() << "a short workspace was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("workspace"), std::string::npos) << e.what();
  }
  EXPECT_THROW(attention(none, none, none, 1, 5000, 32, 8, 128, 0, none, none, need, kSm, nullptr), Error);  // null
}

}  // namespace
}  // namespace moelab::cuda
