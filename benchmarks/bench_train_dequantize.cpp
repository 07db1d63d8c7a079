// Issue 15: the trainer's dequantization of one Mixtral-shaped expert matrix (14336 x 4096, blocksize 64,
// double quantization, random normal weights), three ways, best of N (argv[1], default 5) each:
//   old:   what FrozenBase::matrix did before dequantize_into: nf4::dequantize (one element at a time, one
//          thread) into a fresh vector, then an Eigen cast-copy into a fresh matrix;
//   fresh: nf4::dequantize_into a freshly allocated matrix (pays the page faults);
//   reused: nf4::dequantize_into a matrix kept from the previous run, as the trainer's layer buffer is.
// Threads: OMP_NUM_THREADS. Exits 1 unless old and new are bit-identical. Speed is only meaningful at a
// low load average (benchmarks/README.md).
#include <Eigen/Dense>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include <omp.h>
#include "optimized/nf4/nf4.hpp"
using namespace moelab;
using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
int main(int argc, char** argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 5;
  const int64_t rows = 14336, cols = 4096, n = rows * cols;
  std::vector<float> x(static_cast<size_t>(n));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  for (auto& v : x) v = nd(rng);
  auto q = nf4::quantize_nf4(x.data(), n, 64, true, 2);
  q.shape = {rows, cols};
  std::vector<float>().swap(x);
  using C = std::chrono::steady_clock;
  auto s = [](C::time_point a, C::time_point b) { return std::chrono::duration<double>(b - a).count(); };
  double best_old = 1e9, best_new = 1e9, best_new_fresh = 1e9;
  M keep_old, reused;
  for (int r = 0; r < reps; ++r) {
    auto t0 = C::now();
    {
      const auto v = nf4::dequantize(q);
      M m = Eigen::Map<const M>(v.data(), rows, cols).template cast<float>();
      if (r == reps - 1) keep_old = std::move(m);
    }
    auto t1 = C::now();
    {
      M m(rows, cols);
      nf4::dequantize_into(q, m.data());
      asm volatile("" ::"r"(m.data()) : "memory");
    }
    auto t2 = C::now();
    reused.resize(rows, cols);
    nf4::dequantize_into(q, reused.data());
    auto t3 = C::now();
    best_old = std::min(best_old, s(t0, t1));
    best_new_fresh = std::min(best_new_fresh, s(t1, t2));
    if (r > 0) best_new = std::min(best_new, s(t2, t3));  // r = 0 faults the reused buffer in
  }
  const bool same = std::memcmp(keep_old.data(), reused.data(), size_t(n) * 4) == 0;
  std::printf("threads %d  old (dequantize + cast-copy, fresh) %.3f s  new into fresh matrix %.3f s  new into reused matrix %.3f s  bit-identical %s\n",
              omp_get_max_threads(), best_old, best_new_fresh, best_new, same ? "yes" : "NO");
  return same ? 0 : 1;
}
