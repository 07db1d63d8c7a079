// The trainer's NF4 dequantization of one Mixtral-shaped expert matrix (14336 x 4096, blocksize 64, double
// quantization, random normal weights), as the trainer runs it now: cpu-nf4's SIMD kernels
// (cpu::dequantize_rows) on the trainer's pool (train::Products), best of N (argv[1], default 5) each, on T
// pool threads (argv[2], default the physical cores, as `moelab finetune --threads 0`):
//   layer:        FrozenBase::matrix_into (train/frozen_base.cpp), layers small enough to dequantize whole:
//                 chunks of ~512 KiB of output rows on the pool, into an FP32 matrix kept across runs, as
//                 layer_into keeps its LayerBase across layers;
//   layer scalar: the same with the scalar kernels (a CPU without AVX2);
//   tiles x·Wᵀ:   the streamed products' forward (train/products.cpp, nf4_x_wt): tiles of ~1 MiB of rows,
//                 one work item each, into each thread's own buffer (in cache); the sgemm left out;
//   tiles dy·W:   the streamed products' input gradient (nf4_dy_w): the tiles in order, each split in items
//                 of ~128 KiB of rows over the pool into one shared buffer (one pool section per tile);
//   previous:     nf4::dequantize_into (a block at a time, OpenMP threads) into a kept matrix: the trainer's
//                 path before it moved to cpu-nf4's kernels (benchmarks/README.md, "Dequantization after the
//                 change"), for comparison, and the values' reference.
// The chunk and tile sizes are copies of those in frozen_base.cpp and products.cpp (private there); keep them
// in step. Exits 1 unless every path gives the same bits as `previous` (the tile paths checked tile by tile
// after the timing). Speed is only meaningful at a low load average (benchmarks/README.md).
#include <Eigen/Dense>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/nf4_matrix.hpp"
#include "optimized/cpu/quantize.hpp"
#include "optimized/cpu/thread_pool.hpp"
#include "optimized/nf4/nf4.hpp"
#include "train/products.hpp"

using namespace moelab;
using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

// frozen_base.cpp, FrozenBase::matrix_into: rows per chunk of ~512 KiB of FP32 output.
int64_t layer_chunk_rows(int64_t cols) { return std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, cols)); }
// products.cpp, nf4_tile_rows: rows per tile of ~1 MiB of FP32.
int64_t tile_rows(int64_t cols) { return std::max<int64_t>(8, (int64_t(1) << 18) / std::max<int64_t>(1, cols)); }
// products.cpp, nf4_dy_w: rows per dequantization item within a tile (~128 KiB).
int64_t dy_w_item_rows(int64_t cols) { return std::max<int64_t>(1, (int64_t(1) << 15) / cols); }

void layer(const train::Products& p, cpu::Isa isa, const cpu::Nf4Matrix& m, float* out) {
  const int64_t rows = layer_chunk_rows(m.cols), chunks = (m.rows + rows - 1) / rows;
  p.parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t r0 = c0 * rows, r1 = std::min(m.rows, c1 * rows);
    cpu::dequantize_rows(isa, m, r0, r1, out + r0 * m.cols);
  });
}

float* thread_tile(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

void tiles_x_wt(const train::Products& p, cpu::Isa isa, const cpu::Nf4Matrix& m) {
  const int64_t tile = tile_rows(m.cols), tiles = (m.rows + tile - 1) / tile;
  p.parallel_for(tiles, 1, [&](int64_t t0, int64_t t1) {
    float* w = thread_tile(size_t(std::min(tile, m.rows) * m.cols));
    for (int64_t t = t0; t < t1; ++t) {
      cpu::dequantize_rows(isa, m, t * tile, std::min(m.rows, (t + 1) * tile), w);
      asm volatile("" ::"r"(w) : "memory");  // the sgemm would read it
    }
  });
}

void tiles_dy_w(const train::Products& p, cpu::Isa isa, const cpu::Nf4Matrix& m, float* w) {
  const int64_t tile = tile_rows(m.cols), per_item = dy_w_item_rows(m.cols);
  for (int64_t r0 = 0; r0 < m.rows; r0 += tile) {
    const int64_t r1 = std::min(m.rows, r0 + tile), items = (r1 - r0 + per_item - 1) / per_item;
    p.parallel_for(items, 1, [&](int64_t i0, int64_t i1) {
      const int64_t a = r0 + i0 * per_item, b = std::min(r1, r0 + i1 * per_item);
      cpu::dequantize_rows(isa, m, a, b, w + (a - r0) * m.cols);
    });
    asm volatile("" ::"r"(w) : "memory");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  const int threads = argc > 2 ? std::max(1, std::atoi(argv[2])) : cpu::physical_cores();
  const int64_t rows = 14336, cols = 4096, n = rows * cols;
  std::vector<float> x(static_cast<size_t>(n));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  for (auto& v : x) v = nd(rng);
  // The same values quantized by both libraries (the same bitsandbytes rules, hence the same codes and absmax).
  auto q = nf4::quantize_nf4(x.data(), n, 64, true, threads);
  q.shape = {rows, cols};
  const cpu::Nf4Matrix m = cpu::quantize_matrix(x, rows, cols, 64, true);
  std::vector<float>().swap(x);

  const train::Products products(threads);
  const cpu::Isa isa = cpu::best_isa();
  M reference(rows, cols), out(rows, cols), out_scalar(rows, cols);
  const int64_t tile = tile_rows(cols);
  std::vector<float> shared_tile(size_t(std::min(tile, rows) * cols));

  using C = std::chrono::steady_clock;
  struct Variant {
    const char* name;
    std::function<void()> run;
    double best = 1e9;
  };
  std::vector<Variant> variants = {
      {"layer", [&] { layer(products, isa, m, out.data()); }},
      {"layer scalar", [&] { layer(products, cpu::Isa::Scalar, m, out_scalar.data()); }},
      {"tiles x*W^T", [&] { tiles_x_wt(products, isa, m); }},
      {"tiles dy*W", [&] { tiles_dy_w(products, isa, m, shared_tile.data()); }},
      {"previous", [&] { nf4::dequantize_into(q, reference.data(), threads); }},
  };
  for (auto& v : variants) v.run();  // faults the kept matrices and the tile buffers in
  for (int r = 0; r < reps; ++r)
    for (auto& v : variants) {
      const auto t0 = C::now();
      v.run();
      v.best = std::min(v.best, std::chrono::duration<double>(C::now() - t0).count());
    }

  bool same = std::memcmp(out.data(), reference.data(), size_t(n) * 4) == 0 &&
              std::memcmp(out_scalar.data(), reference.data(), size_t(n) * 4) == 0;
  // The tile paths' values: every tile as the kernels write it, against the reference rows.
  for (int64_t r0 = 0; r0 < rows && same; r0 += tile) {
    const int64_t r1 = std::min(rows, r0 + tile);
    cpu::dequantize_rows(isa, m, r0, r1, shared_tile.data());
    same = std::memcmp(shared_tile.data(), reference.data() + r0 * cols, size_t((r1 - r0) * cols) * 4) == 0;
  }

  std::printf("%lld x %lld NF4 (blocksize 64, double quantization), %s kernels, %d threads, best of %d:\n",
              (long long)rows, (long long)cols, cpu::isa_name(isa).c_str(), threads, reps);
  for (const auto& v : variants)
    std::printf("  %-13s %.4f s  %6.0f M weights/s\n", v.name, v.best, double(n) / v.best / 1e6);
  std::printf("bit-identical %s\n", same ? "yes" : "NO");
  return same ? 0 : 1;
}
