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

#include <chrono>
#include <memory>
#include <random>
#include <vector>

#include "optimized/cpu/kernels.hpp"
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

Nf4Matrix random_nf4(int64_t rows, int64_t cols, uint32_t seed) {
  Nf4Matrix w;
  w.rows = rows;
  w.cols = cols;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols / 2));
  w.absmax.resize(size_t(rows * cols / 64));
  std::mt19937 rng(seed);
  for (auto& b : codes) b = uint8_t(rng());
  w.own(std::move(codes));
  for (auto& a : w.absmax) a = 0.01f + float(rng() % 1000) / 1e5f;
  return w;
}

// Read bandwidth: XOR-fold a 1 GiB buffer on all threads (integer XOR vectorizes without reordering
// concerns, so the loop is limited by memory, not by an add latency chain).
void BM_ReadBandwidth(benchmark::State& state) {
  const size_t n = size_t(1) << 27;  // uint64 words
  std::vector<uint64_t> buf(n);
  for (size_t i = 0; i < n; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    uint64_t fold = 0;
#pragma omp parallel for simd reduction(^ : fold) schedule(static)
    for (size_t i = 0; i < n; ++i) fold ^= buf[i];
    benchmark::DoNotOptimize(fold);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  g_read_bandwidth = double(state.iterations()) * double(n * sizeof(uint64_t)) / seconds;
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(n * sizeof(uint64_t)));
  state.counters["threads"] = omp_get_max_threads();
}

struct Shape {
  const char* name;
  int64_t rows, cols;
};
const Shape kShapes[] = {{"w1_w3", 14336, 4096}, {"w2", 4096, 14336}, {"q_o", 4096, 4096}, {"k_v", 1024, 4096}};

void set_bandwidth_counters(benchmark::State& state, int64_t bytes_per_iter) {
  state.SetBytesProcessed(int64_t(state.iterations()) * bytes_per_iter);
  // A rate counter is divided by the elapsed time: (bytes / probe bandwidth) / seconds = fraction.
  state.counters["frac_of_read_bw"] = benchmark::Counter(
      double(state.iterations()) * double(bytes_per_iter) / (g_read_bandwidth > 0 ? g_read_bandwidth : 1),
      benchmark::Counter::kIsRate);
}

void BM_Nf4Gemv(benchmark::State& state, Shape s, Isa isa) {
  if (!moelab::cpu::isa_supported(isa)) return state.SkipWithError("ISA not supported");
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
  for (auto _ : state) benchmark::DoNotOptimize(moelab::cpu::moe_block(moelab::cpu::best_isa(), layer.nf4, x, chosen, gates).data());
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

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  // The probe runs first so every other benchmark can be reported against it.
  benchmark::RegisterBenchmark("ReadBandwidth", BM_ReadBandwidth)->Unit(benchmark::kMillisecond)->UseRealTime();
  for (const auto& s : kShapes) {
    for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Scalar})
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
  benchmark::RegisterBenchmark("MoeLayer/nf4", BM_MoeLayerNf4)->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("MoeLayer/fp32_reference", BM_MoeLayerFp32Reference)
      ->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
