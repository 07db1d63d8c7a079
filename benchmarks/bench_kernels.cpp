// Microbenchmarks of the cpu-nf4 kernels at Mixtral-8x7B shapes, side by side with FP32 (Eigen, the
// reference engine's math) and a memory-read bandwidth probe measured in the same run, so speed is
// reported as a fraction of what this machine can read, not as a bare number.
//
//   build/moelab_bench [--benchmark_filter=...]
//
// Weights larger than the last-level cache are what decode streams, so each benchmark cycles through
// enough copies of its matrix (>= 256 MiB) that every iteration reads from DRAM.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "tests/ops/op_cases.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/layer_ops.hpp"
#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/moe.hpp"
#include "reference/model.hpp"

namespace {

using moelab::MatrixRF;
using moelab::MatrixRI;
using moelab::cpu::Isa;
using moelab::cpu::Nf4Matrix;

constexpr int64_t kStreamBytes = int64_t(256) << 20;

double g_read_bandwidth = 0;  // bytes/s, measured first

// Random codes and a double-quantized absmax as bitsandbytes stores it (8-bit codes, a nested FP32
// scale per 256 blocks, an offset), with the FP32 absmax the check-mode kernels read rebuilt from it.
Nf4Matrix random_nf4(int64_t rows, int64_t cols, uint32_t seed) {
  Nf4Matrix w;
  w.rows = rows;
  w.cols = cols;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols / 2));
  const int64_t blocks = rows * cols / 64;
  std::mt19937 rng(seed);
  for (auto& b : codes) b = uint8_t(rng());
  w.own(std::move(codes));
  w.nested_code.resize(256);
  for (int i = 0; i < 256; ++i) w.nested_code[size_t(i)] = float(i - 128) / 128.0f;
  w.nested_absmax.assign(size_t((blocks + 255) / 256), 0.004f);
  w.offset = 0.01f;
  w.absmax_code.resize(size_t(blocks));
  for (auto& a : w.absmax_code) a = uint8_t(rng());
  w.absmax.resize(size_t(blocks));
  for (int64_t b = 0; b < blocks; ++b) w.absmax[size_t(b)] = w.block_absmax(b);
  return w;
}

// Read bandwidth, the limit every GEMV is measured against, so it must be the best sustained read this
// machine gives: each thread reads its share of a 1 GiB buffer as 1, 4, 8 or 16 interleaved streams
// (a GEMV over several rows reads that way; on the AMD VMs here 8 streams read ~1.5x one) with wide
// loads into eight independent accumulators (no dependency chain), and the figure is the best pass of
// the best stream count, not a mean. (The first probe, one XOR chain through `omp simd`, read less than
// llama.cpp's decode moved: 9.4 against 12.0 GB/s in one window.)
__attribute__((target("avx2"))) uint64_t fold_avx2(const uint64_t* p, size_t n, int streams) {
  __m256i acc[8];
  for (auto& a : acc) a = _mm256_setzero_si256();
  const size_t per = n / size_t(streams);
  for (size_t i = 0; i + 16 <= per; i += 16)
    for (int s = 0; s < streams; ++s) {
      const auto* q = reinterpret_cast<const __m256i*>(p + size_t(s) * per + i);
      for (int k = 0; k < 4; ++k) acc[(2 * s + k) & 7] = _mm256_xor_si256(acc[(2 * s + k) & 7], _mm256_loadu_si256(q + k));
    }
  for (int k = 1; k < 8; ++k) acc[0] = _mm256_xor_si256(acc[0], acc[k]);
  return uint64_t(_mm256_extract_epi64(acc[0], 0) ^ _mm256_extract_epi64(acc[0], 1) ^ _mm256_extract_epi64(acc[0], 2) ^
                  _mm256_extract_epi64(acc[0], 3));
}
uint64_t fold_plain(const uint64_t* p, size_t n) {
  uint64_t acc[8] = {};
  for (size_t i = 0; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] ^= p[i + k];
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
}

void BM_ReadBandwidth(benchmark::State& state) {
  const size_t n = size_t(1) << 27;  // uint64 words: 1 GiB
  std::vector<uint64_t> buf(n);
  for (size_t i = 0; i < n; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;
  const bool avx2 = __builtin_cpu_supports("avx2");
  const int threads = moelab::cpu::default_pool().threads();
  double best = 0;
  int pass = 0;
  for (auto _ : state) {
    std::atomic<uint64_t> fold{0};
    const int streams = (int[]){1, 4, 8, 16}[pass++ % 4];
    const auto t0 = std::chrono::steady_clock::now();
    moelab::cpu::default_pool().parallel_for(threads, 1, [&](int64_t t0i, int64_t t1i) {
      for (int64_t t = t0i; t < t1i; ++t) {
        const size_t begin = n / size_t(threads) * size_t(t), len = n / size_t(threads);
        fold ^= avx2 ? fold_avx2(buf.data() + begin, len, streams) : fold_plain(buf.data() + begin, len);
      }
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n * sizeof(uint64_t)) / s);
    benchmark::DoNotOptimize(fold.load());
  }
  g_read_bandwidth = best;
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(n * sizeof(uint64_t)));
  state.counters["best_GB/s"] = best / 1e9;
  // Not "threads": Google Benchmark's JSON already has a "threads" field in every run (a duplicate key).
  state.counters["probe_threads"] = threads;
}

// The shapes timed are the op table's benchmark rows (tests/ops/op_cases.hpp), the same cases the
// kernels are tested on against float64.
struct Shape {
  const char* name;
  int64_t rows, cols;
};
const std::vector<Shape> kShapes = [] {
  std::vector<Shape> shapes;
  for (const auto& s : moelab::ops::kMatrixShapes)
    if (s.benchmark) shapes.push_back({s.name, s.rows, s.cols});
  return shapes;
}();

void set_bandwidth_counters(benchmark::State& state, int64_t bytes_per_iter) {
  state.SetBytesProcessed(int64_t(state.iterations()) * bytes_per_iter);
  // Only beside a probe measured in this process (a filter may leave ReadBandwidth out): otherwise the
  // counter is absent, never bytes/s under a ratio's name. A rate counter is divided by the elapsed
  // time: (bytes / probe bandwidth) / seconds = fraction.
  if (g_read_bandwidth > 0)
    state.counters["frac_of_read_bw"] = benchmark::Counter(
        double(state.iterations()) * double(bytes_per_iter) / g_read_bandwidth, benchmark::Counter::kIsRate);
}

// What the int8 kernels stream per pass of an NF4 matrix: codes + compact absmax, 4.13 bits per weight.
int64_t int8_streamed_bytes(const Shape& s) {
  return s.rows * s.cols / 2 + s.rows * s.cols / 64 + s.rows * s.cols / 64 / 256 * 4;
}

// Enough copies of a random NF4 matrix of shape s (>= kStreamBytes in all) that every pass reads DRAM.
std::vector<Nf4Matrix> streamed_copies(const Shape& s, int64_t bytes) {
  std::vector<Nf4Matrix> w;
  for (int64_t c = 0; c < std::max<int64_t>(1, kStreamBytes / bytes); ++c) w.push_back(random_nf4(s.rows, s.cols, uint32_t(c)));
  return w;
}

// One token through an NF4 matrix in the int8 path (decode): bytes are what the kernel streams.
void BM_Nf4GemvInt8(benchmark::State& state, Shape s, Isa isa) {
  const int64_t bytes = int8_streamed_bytes(s);
  const std::vector<Nf4Matrix> w = streamed_copies(s, bytes);
  const int copies = int(w.size());
  const int n = int(state.range(0));
  MatrixRF x = MatrixRF::Random(n, s.cols);
  const moelab::cpu::LinearContext ctx{isa, moelab::cpu::Activations::Int8, &moelab::cpu::default_pool()};
  int c = 0;
  for (auto _ : state) {
    MatrixRF y = moelab::cpu::nf4_linear(ctx, w[size_t(c)], x);
    benchmark::DoNotOptimize(y.data());
    c = (c + 1) % copies;
  }
  set_bandwidth_counters(state, bytes);
  state.SetItemsProcessed(int64_t(state.iterations()) * n);
}

// One token, the int8 kernel over the pool in work items of state.range(0) KiB of codes each: the engine
// uses 256 KiB items for decode (streaming_row_chunk) and 64 KiB ones for token tiles; this shows what
// the item size alone changes when each item is read once from DRAM.
void BM_Nf4GemvInt8Items(benchmark::State& state, Shape s, Isa isa) {
  const int64_t bytes = int8_streamed_bytes(s);
  const std::vector<Nf4Matrix> w = streamed_copies(s, bytes);
  const int copies = int(w.size());
  const MatrixRF x = MatrixRF::Random(1, s.cols);
  std::vector<int8_t> q(size_t(moelab::cpu::q8_values(w[0])));
  std::vector<float> d(size_t(moelab::cpu::q8_scales(w[0])));
  moelab::cpu::prepare_q8(isa, w[0], x.data(), q.data(), d.data());
  const int64_t item_rows = std::max<int64_t>(1, state.range(0) * 1024 / (s.cols / 2));
  const int64_t items = (s.rows + item_rows - 1) / item_rows;
  std::vector<float> y(size_t(s.rows));
  int c = 0;
  for (auto _ : state) {
    const Nf4Matrix& wc = w[size_t(c)];
    moelab::cpu::default_pool().parallel_for(items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r0 = i * item_rows, r1 = std::min(s.rows, r0 + item_rows);
        moelab::cpu::gemv_q8(isa, wc, q.data(), 0, d.data(), 0, 1, y.data() + r0, 0, r0, r1);
      }
    });
    benchmark::DoNotOptimize(y.data());
    c = (c + 1) % copies;
  }
  set_bandwidth_counters(state, bytes);
  state.counters["item_rows"] = double(item_rows);
}

// One token on one thread over rows of shape s that stay in L2 (512 KiB of codes, read again every
// iteration; L2 on a CPU with >= 1 MiB of it per core, as Zen 4/5 and recent Xeons, else L3): the kernel's
// own speed with DRAM out of the picture. Decode reads DRAM at the probe's rate only if this is well above
// the probe's share per core.
void BM_Nf4GemvInt8Cached(benchmark::State& state, Shape s, Isa isa) {
  const int64_t rows = std::max<int64_t>(1, (512 * 1024) / (s.cols / 2));
  const Nf4Matrix w = random_nf4(rows, s.cols, 7);
  const MatrixRF x = MatrixRF::Random(1, s.cols);
  std::vector<int8_t> q(size_t(moelab::cpu::q8_values(w)));
  std::vector<float> d(size_t(moelab::cpu::q8_scales(w)));
  moelab::cpu::prepare_q8(isa, w, x.data(), q.data(), d.data());
  std::vector<float> y(static_cast<size_t>(rows));
  for (auto _ : state) {
    moelab::cpu::gemv_q8(isa, w, q.data(), 0, d.data(), 0, 1, y.data(), 0, 0, rows);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int8_streamed_bytes(Shape{s.name, rows, s.cols}));
}

void BM_Nf4Gemv(benchmark::State& state, Shape s, Isa isa) {
  const int64_t bytes = s.rows * s.cols / 2 + s.rows * s.cols / 64 * 4;
  const int copies = int(std::max<int64_t>(1, kStreamBytes / bytes));
  std::vector<Nf4Matrix> w;
  for (int c = 0; c < copies; ++c) w.push_back(random_nf4(s.rows, s.cols, uint32_t(c)));
  MatrixRF x = MatrixRF::Random(1, s.cols);
  int c = 0;
  for (auto _ : state) {
    MatrixRF y = moelab::cpu::nf4_linear(isa, w[size_t(c)], x);
    benchmark::DoNotOptimize(y.data());
    c = (c + 1) % copies;
  }
  set_bandwidth_counters(state, bytes);
}

// n tokens through one NF4 matrix (a small decode batch, or an expert's few tokens): weight bytes per
// second, so n = 1 equals Nf4Gemv and a kernel that decodes each block once for all tokens shows as n x.
void BM_Nf4GemvTokens(benchmark::State& state, Shape s) {
  const int n = int(state.range(0));
  const int64_t bytes = s.rows * s.cols / 2 + s.rows * s.cols / 64 * 4;
  const int copies = int(std::max<int64_t>(1, kStreamBytes / bytes));
  std::vector<Nf4Matrix> w;
  for (int c = 0; c < copies; ++c) w.push_back(random_nf4(s.rows, s.cols, uint32_t(c)));
  MatrixRF x = MatrixRF::Random(n, s.cols);
  int c = 0;
  for (auto _ : state) {
    MatrixRF y = moelab::cpu::nf4_linear(moelab::cpu::best_isa(), w[size_t(c)], x);
    benchmark::DoNotOptimize(y.data());
    c = (c + 1) % copies;
  }
  set_bandwidth_counters(state, bytes);
  state.SetItemsProcessed(int64_t(state.iterations()) * n);
}

void BM_Fp32Gemv(benchmark::State& state, Shape s) {
  const int64_t bytes = s.rows * s.cols * 4;
  const int copies = int(std::max<int64_t>(1, kStreamBytes / bytes));
  std::vector<MatrixRF> w;
  for (int c = 0; c < copies; ++c) w.push_back(MatrixRF::Random(s.rows, s.cols));
  MatrixRF x = MatrixRF::Random(1, s.cols);
  int c = 0;
  for (auto _ : state) {
    MatrixRF y = x * w[size_t(c)].transpose();  // the reference engine's decode matmul
    benchmark::DoNotOptimize(y.data());
    c = (c + 1) % copies;
  }
  set_bandwidth_counters(state, bytes);
}

void BM_Nf4Dequantize(benchmark::State& state) {
  const auto w = random_nf4(4096, 4096, 1);
  std::vector<float> out(size_t(64 * 4096));
  int64_t r = 0;
  for (auto _ : state) {
    moelab::cpu::dequantize_rows(moelab::cpu::best_isa(), w, r, r + 64, out.data());
    benchmark::DoNotOptimize(out.data());
    r = (r + 64) % 4096;
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * 64 * 4096);
}

// One Mixtral MoE layer (8 experts of 14336 x 4096, top-2) for n tokens with random routing:
// NF4 on all threads against the reference engine's FP32 expert code on the same routing.
struct MoeLayer {
  std::vector<moelab::cpu::Nf4Expert> nf4;
  moelab::ref::LayerWeights<float> fp32;
};
MoeLayer& moe_layer() {
  static std::unique_ptr<MoeLayer> layer = [] {
    auto l = std::make_unique<MoeLayer>();
    for (int e = 0; e < 8; ++e) {
      l->nf4.push_back({random_nf4(14336, 4096, 10u + e), random_nf4(14336, 4096, 20u + e), random_nf4(4096, 14336, 30u + e)});
      l->fp32.experts.push_back({moelab::ref::Mat<float>::Random(14336, 4096) * 0.01f,
                                 moelab::ref::Mat<float>::Random(14336, 4096) * 0.01f,
                                 moelab::ref::Mat<float>::Random(4096, 14336) * 0.01f});
    }
    return l;
  }();
  return *layer;
}

void random_routing(int n, MatrixRI& chosen, MatrixRF& gates) {
  std::mt19937 rng(static_cast<uint32_t>(n));
  chosen.resize(n, 2);
  gates.resize(n, 2);
  for (int t = 0; t < n; ++t) {
    chosen(t, 0) = int(rng() % 8);
    do chosen(t, 1) = int(rng() % 8);
    while (chosen(t, 1) == chosen(t, 0));
    gates(t, 0) = 0.6f;
    gates(t, 1) = 0.4f;
  }
}

void BM_MoeLayerNf4(benchmark::State& state) {
  auto& layer = moe_layer();
  const int n = int(state.range(0));
  MatrixRI chosen;
  MatrixRF gates;
  random_routing(n, chosen, gates);
  const MatrixRF x = MatrixRF::Random(n, 4096);
  for (auto _ : state) benchmark::DoNotOptimize(moelab::cpu::moe_block(moelab::cpu::LinearContext{moelab::cpu::best_isa(), moelab::cpu::Activations::Int8, &moelab::cpu::default_pool()}, layer.nf4, x, chosen, gates).data());
  state.SetItemsProcessed(int64_t(state.iterations()) * n);
}

void BM_MoeLayerFp32Reference(benchmark::State& state) {
  auto& layer = moe_layer();
  const int n = int(state.range(0));
  moelab::ref::RouterOutput<float> r;
  random_routing(n, r.experts, r.gates);
  const moelab::ref::Mat<float> x = moelab::ref::Mat<float>::Random(n, 4096);
  for (auto _ : state) benchmark::DoNotOptimize(moelab::ref::Model<float>::moe(layer.fp32, x, r).data());
  state.SetItemsProcessed(int64_t(state.iterations()) * n);
}

// The decoder-layer ops (optimized/cpu/layer_ops.hpp) on the op table's benchmark rows (Mixtral shapes):
// the same cases tests/ops/test_op_table.cpp runs against float64.
MatrixRF random_rows(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  MatrixRF m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

void BM_RmsNorm(benchmark::State& state, moelab::ops::NormCase c) {
  const MatrixRF x = random_rows(c.n, c.dim, 1);
  const Eigen::RowVectorXf w = random_rows(1, c.dim, 2).row(0);
  MatrixRF out(c.n, c.dim);
  for (auto _ : state) {
    moelab::cpu::rms_norm(x, w, 1e-5f, out);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * c.n);
}

void BM_Rope(benchmark::State& state, moelab::ops::RopeCase c) {
  MatrixRF x = random_rows(c.n, int64_t(c.heads) * c.head_dim, 3);
  const auto inv_freq = moelab::cpu::rope_inv_freq(c.theta, c.head_dim);
  for (auto _ : state) {
    moelab::cpu::rope(x, c.heads, c.head_dim, c.start, inv_freq);  // rotating again each time: same work
    benchmark::DoNotOptimize(x.data());
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * c.n);
}

// Bytes: the keys and values each query head group reads (decode is bound by reading the KV cache).
void BM_Attention(benchmark::State& state, moelab::ops::AttentionCase c) {
  const int64_t kv = int64_t(c.kv_heads) * c.head_dim, rows = c.start + c.n;
  const MatrixRF q = random_rows(c.n, int64_t(c.heads) * c.head_dim, 4), k = random_rows(rows, kv, 5), v = random_rows(rows, kv, 6);
  MatrixRF out(c.n, int64_t(c.heads) * c.head_dim);
  for (auto _ : state) {
    moelab::cpu::attention(q, k, v, c.start, c.heads, c.kv_heads, c.head_dim, c.window, out, &moelab::cpu::default_pool());
    benchmark::DoNotOptimize(out.data());
  }
  set_bandwidth_counters(state, 2 * rows * kv * int64_t(sizeof(float)));
  state.SetItemsProcessed(int64_t(state.iterations()) * c.n);
}

void BM_RouterTopK(benchmark::State& state, moelab::ops::RouterCase c) {
  const MatrixRF logits = random_rows(c.n, c.experts, 7);
  MatrixRI experts;
  MatrixRF gates;
  for (auto _ : state) {
    moelab::cpu::route_top_k(logits, c.top_k, experts, gates);
    benchmark::DoNotOptimize(gates.data());
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * c.n);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  // The probe runs first so every other benchmark can be reported against it.
  benchmark::RegisterBenchmark("ReadBandwidth", BM_ReadBandwidth)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
  // Kernel sets this CPU lacks are not registered, and said so (Google Benchmark 1.7 has no skip state).
  for (Isa isa : moelab::cpu::kAllIsas)
    if (!moelab::cpu::isa_supported(isa))
      std::fprintf(stderr, "SKIP %s benchmarks: this CPU lacks %s\n", moelab::cpu::isa_name(isa).c_str(),
                   moelab::cpu::isa_features(isa).c_str());
  for (const auto& s : kShapes)
    for (Isa isa : moelab::cpu::kAllIsas)
      if (moelab::cpu::isa_supported(isa))
        benchmark::RegisterBenchmark((std::string("Nf4GemvInt8/") + s.name + "/" + moelab::cpu::isa_name(isa)).c_str(),
                                     BM_Nf4GemvInt8, s, isa)
            ->Arg(1)->Arg(4)->Arg(64)->Unit(benchmark::kMicrosecond)->UseRealTime();
  for (const auto& s : kShapes)
    for (Isa isa : {Isa::Avx512Vnni, Isa::Avx2})
      if (moelab::cpu::isa_supported(isa))
        benchmark::RegisterBenchmark((std::string("Nf4GemvInt8Items/") + s.name + "/" + moelab::cpu::isa_name(isa)).c_str(),
                                     BM_Nf4GemvInt8Items, s, isa)
            ->Arg(64)->Arg(256)->Unit(benchmark::kMicrosecond)->UseRealTime();
  for (const auto& s : kShapes)
    for (Isa isa : moelab::cpu::kAllIsas)
      if (moelab::cpu::isa_supported(isa) && isa != Isa::Scalar)
        benchmark::RegisterBenchmark((std::string("Nf4GemvInt8Cached/") + s.name + "/" + moelab::cpu::isa_name(isa)).c_str(),
                                     BM_Nf4GemvInt8Cached, s, isa)
            ->Unit(benchmark::kMicrosecond);
  for (const auto& s : kShapes) {
    for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Scalar})
      if (moelab::cpu::isa_supported(isa))
        benchmark::RegisterBenchmark((std::string("Nf4Gemv/") + s.name + "/" + moelab::cpu::isa_name(isa)).c_str(),
                                     BM_Nf4Gemv, s, isa)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
    benchmark::RegisterBenchmark((std::string("Fp32Gemv/") + s.name).c_str(), BM_Fp32Gemv, s)
        ->Unit(benchmark::kMicrosecond)
        ->UseRealTime();
  }
  for (const auto& s : kShapes)
    if (std::string(s.name) == "w1_w3" || std::string(s.name) == "w2")
      benchmark::RegisterBenchmark((std::string("Nf4GemvTokens/") + s.name).c_str(), BM_Nf4GemvTokens, s)
          ->Arg(1)->Arg(2)->Arg(4)->Unit(benchmark::kMicrosecond)->UseRealTime();
  benchmark::RegisterBenchmark("Nf4Dequantize/64x4096", BM_Nf4Dequantize)->UseRealTime();
  for (const auto& c : moelab::ops::kNormCases)
    if (c.benchmark)
      benchmark::RegisterBenchmark((std::string("RmsNorm/") + c.name).c_str(), BM_RmsNorm, c)->Unit(benchmark::kMicrosecond)->UseRealTime();
  for (const auto& c : moelab::ops::kRopeCases)
    if (c.benchmark)
      benchmark::RegisterBenchmark((std::string("Rope/") + c.name).c_str(), BM_Rope, c)->Unit(benchmark::kMicrosecond)->UseRealTime();
  for (const auto& c : moelab::ops::kAttentionCases)
    if (c.benchmark)
      benchmark::RegisterBenchmark((std::string("Attention/") + c.name).c_str(), BM_Attention, c)
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
  for (const auto& c : moelab::ops::kRouterCases)
    if (c.benchmark)
      benchmark::RegisterBenchmark((std::string("RouterTopK/") + c.name).c_str(), BM_RouterTopK, c)
          ->Unit(benchmark::kMicrosecond)->UseRealTime();
  benchmark::RegisterBenchmark("MoeLayer/nf4", BM_MoeLayerNf4)->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("MoeLayer/fp32_reference", BM_MoeLayerFp32Reference)
      ->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
