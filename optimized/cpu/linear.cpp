#include "optimized/cpu/linear.hpp"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <span>
#include <vector>

#include "core/error.hpp"
#include "optimized/cpu/row_chunks.hpp"

namespace moelab::cpu {
namespace {

// Rows per parallel work item: ~64 KiB of packed codes, small enough that a descheduled thread holds
// back little and a chunk stays in L2 while a tile of tokens reads it.
int64_t row_chunk(const Nf4Matrix& w) { return std::max<int64_t>(4, (128 * 1024) / std::max<int64_t>(1, w.cols)); }

// Rows per work item of the int8 path: read-once stretches for decode (streaming_row_chunk), row_chunk's
// 64 KiB when a larger token tile reuses each item from L2. (Rows wider than 48 Ki columns get token
// tiles of 4, token_tile, so prefill there also takes the read-once stretches.)
int64_t q8_row_chunk(const Nf4Matrix& w, int64_t tokens, const ThreadPool* pool) {
  return tokens > kGemvMaxTokens ? row_chunk(w) : streaming_row_chunk(w.rows, w.cols / 2, pool, row_chunk(w));
}

// Tokens per tile of the int8 path: their activations (q8_values: cols + cols / 4 bytes each) stay in L2
// while a row chunk is swept; each chunk of codes is read once per tile.
int64_t token_tile(const Nf4Matrix& w) { return std::clamp<int64_t>((192 * 1024) / std::max<int64_t>(1, w.cols), 4, 64); }

void run(ThreadPool* pool, bool parallel, int64_t items, const std::function<void(int64_t, int64_t)>& body) {
  if (pool && parallel) pool->parallel_for(items, 1, body);
  else body(0, items);
}

// Matrices that read the same activations in the same int8 layout (q/k/v; an expert's w1/w3): x is
// quantized once, and all their row chunks are one parallel section, one synchronization.
// (The layout depends on cols and, through q8_simd_kernel, on the blocksize.)
bool same_q8_layout(std::span<const Nf4Matrix* const> ws) {
  for (const auto* w : ws)
    if (w->cols != ws[0]->cols || w->blocksize != ws[0]->blocksize) return false;
  return true;
}

std::vector<MatrixRF> int8_linear_many(const LinearContext& ctx, std::span<const Nf4Matrix* const> ws, const MatrixRF& x) {
  const Nf4Matrix& w0 = *ws[0];
  const int64_t n = x.rows();
  const int64_t nq = q8_values(w0), nd = q8_scales(w0);
  std::vector<int8_t> q(size_t(n * nq));
  std::vector<float> d(size_t(n * nd));
  int64_t macs = 0;
  for (const auto* w : ws) macs += n * w->rows * w->cols;
  const bool parallel = macs >= kMinParallelMacs;
  run(ctx.pool, parallel && n >= 16, n, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) prepare_q8(ctx.isa, w0, x.row(t).data(), q.data() + t * nq, d.data() + t * nd);
  });
  // Work item i: matrix m = the first whose range holds i, then (token tile, row chunk) within it.
  const int64_t tile = token_tile(w0), tiles = (n + tile - 1) / tile;
  std::vector<MatrixRF> ys;
  std::vector<int64_t> first_item{0};
  std::vector<int64_t> chunk_rows;
  for (const auto* w : ws) {
    ys.emplace_back(n, w->rows);
    chunk_rows.push_back(q8_row_chunk(*w, std::min(n, tile), ctx.pool));
    first_item.push_back(first_item.back() + (w->rows + chunk_rows.back() - 1) / chunk_rows.back() * tiles);
  }
  run(ctx.pool, parallel, first_item.back(), [&](int64_t i0, int64_t i1) {
    size_t m = 0;
    for (int64_t i = i0; i < i1; ++i) {
      while (i >= first_item[m + 1]) ++m;
      const Nf4Matrix& w = *ws[m];
      const int64_t chunk = chunk_rows[m], chunks = (w.rows + chunk - 1) / chunk, j = i - first_item[m];
      const int64_t t0 = (j / chunks) * tile, t1 = std::min(n, t0 + tile);
      const int64_t r0 = (j % chunks) * chunk, r1 = std::min(w.rows, r0 + chunk);
      gemv_q8(ctx.isa, w, q.data() + t0 * nq, nq, d.data() + t0 * nd, nd, int(t1 - t0), ys[m].data() + t0 * w.rows + r0,
              w.rows, r0, r1);
    }
  });
  return ys;
}

MatrixRF fp32_mode_linear(const LinearContext& ctx, const Nf4Matrix& w, const MatrixRF& x) {
  const int64_t n = x.rows();
  const bool parallel = n * w.rows * w.cols >= kMinParallelMacs;
  if (n <= kGemvMaxTokens) {
    const int64_t chunk = row_chunk(w), chunks = (w.rows + chunk - 1) / chunk;
    MatrixRF xs(n, w.cols);  // activations in the kernel's layout, prepared once for all threads
    for (int64_t t = 0; t < n; ++t) prepare_x(ctx.isa, w, x.row(t).data(), xs.row(t).data());
    MatrixRF yt(n, w.rows);
    run(ctx.pool, parallel, chunks, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * chunk, r1 = std::min(w.rows, r0 + chunk);
        gemv_prepared_batch(ctx.isa, w, xs.data(), xs.cols(), int(n), yt.data() + r0, yt.cols(), r0, r1);
      }
    });
    return yt;
  }
  // ~256 KiB of dequantized FP32 rows per tile.
  const int64_t tile = std::max<int64_t>(4, (64 * 1024) / std::max<int64_t>(1, w.cols));
  const int64_t tiles = (w.rows + tile - 1) / tile;
  MatrixRF y(n, w.rows);
  run(ctx.pool, parallel, tiles, [&](int64_t i0, int64_t i1) {
    OneOpenMpThread one;
    MatrixRF wt(tile, w.cols);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * tile, rows = std::min(tile, w.rows - r0);
      dequantize_rows(ctx.isa, w, r0, r0 + rows, wt.data());
      y.middleCols(r0, rows).noalias() = x * wt.topRows(rows).transpose();
    }
  });
  return y;
}

}  // namespace

Activations parse_activations(const std::string& name) {
  if (name == "int8") return Activations::Int8;
  if (name == "fp32") return Activations::Fp32;
  throw Error(fmt::format("cpu-nf4: unknown activation type '{}' (int8, fp32)", name));
}

std::string activations_name(Activations a) { return a == Activations::Int8 ? "int8" : "fp32"; }

MatrixRF nf4_linear(const LinearContext& ctx, const Nf4Matrix& w, const MatrixRF& x) {
  const Nf4Matrix* one[] = {&w};
  return ctx.activations == Activations::Int8 ? std::move(int8_linear_many(ctx, one, x)[0]) : fp32_mode_linear(ctx, w, x);
}

std::vector<MatrixRF> nf4_linear_many(const LinearContext& ctx, std::span<const Nf4Matrix* const> ws, const MatrixRF& x) {
  if (ws.empty()) return {};
  if (ctx.activations == Activations::Int8 && same_q8_layout(ws)) return int8_linear_many(ctx, ws, x);
  std::vector<MatrixRF> ys;  // the check mode, or layouts that differ: one matrix at a time
  for (const auto* w : ws) ys.push_back(nf4_linear(ctx, *w, x));
  return ys;
}

MatrixRF nf4_linear(Isa isa, const Nf4Matrix& w, const MatrixRF& x) {
  return nf4_linear(LinearContext{isa, Activations::Fp32, &default_pool()}, w, x);
}

MatrixRF fp32_linear(const MatrixRF& x, const MatrixRF& w, ThreadPool* pool) {
  const int64_t n = x.rows();
  MatrixRF y(n, w.rows());
  if (n * w.rows() * w.cols() < kMinParallelMacs) {
    y.noalias() = x * w.transpose();
    return y;
  }
  // Few tokens: Eigen runs a matrix-vector product on one thread, and Mixtral's lm_head (524 MB in FP32)
  // would take a fifth of a decode step that way. Many tokens: row blocks of a GEMM, one per chunk.
  const Eigen::Index chunk = n <= kGemvMaxTokens ? 1024 : 4096;
  const int64_t chunks = (w.rows() + chunk - 1) / chunk;
  run(pool ? pool : &default_pool(), true, chunks, [&](int64_t c0, int64_t c1) {
    OneOpenMpThread one;
    for (int64_t c = c0; c < c1; ++c) {
      const Eigen::Index r0 = c * chunk, rows = std::min<Eigen::Index>(chunk, w.rows() - r0);
      y.middleCols(r0, rows).noalias() = x * w.middleRows(r0, rows).transpose();
    }
  });
  return y;
}

void add_lora(const LoraFactors* lora, const MatrixRF& x, MatrixRF& y) {
  if (!lora) return;
  const MatrixRF ax = x * lora->a.transpose();  // [n, r]
  y.noalias() += (ax * lora->b.transpose()) * float(lora->scale);
}

ThreadPool& default_pool() {
  static ThreadPool pool(physical_cores());
  return pool;
}

}  // namespace moelab::cpu
