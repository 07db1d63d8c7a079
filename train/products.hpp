#pragma once
// The trainer's threads and its products with the frozen weights.
//
// Threads: one cpu::ThreadPool, cpu-nf4's (work claimed in small chunks from a counter; idle workers sleep).
// A thread the OS deschedules delays only the chunk it holds. OpenMP's static loops and Eigen's threaded
// GEMM, which the trainer used before, wait at a barrier for it: beside one busy process, two threads
// trained the bundled model at 0.44x the speed of one thread.
//
// Products: Y = X·Wᵀ (a frozen linear's forward) and dX = dY·W (its gradient to the input) are nearly all
// of a step's arithmetic. In float they run on OpenBLAS's sgemm: Debian's OpenBLAS picks its kernels for
// the CPU at run time (DYNAMIC_ARCH; OPENBLAS_CORETYPE forces a set), where Eigen here is
// compiled for the x86-64 baseline and ran 2.5-4x slower on an AVX2 machine. In double (the float64
// oracle the tests check the float path against) they run on Eigen.
//
// Determinism: a product of at least kMinParallelMacs multiply-adds is cut into blocks of kColumnBlock
// output columns, one work item each; a smaller one is one call. With an NF4 weight, x·Wᵀ is cut into tiles
// of W's rows (~1 MiB of FP32 each, the work items) and dy·W sums over the same tiles in order, each tile's
// product cut into column blocks. All of it depends on the shapes alone, so the result is the same bits on
// any number of threads and under any scheduling.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>

#include "train/lora_model.hpp"

namespace moelab::cpu {
class ThreadPool;
struct Nf4Matrix;
enum class Isa;
}

namespace moelab::train {

// A frozen weight [out, in] as the products read it: dense values, or (S = float) NF4 codes that each product
// dequantizes a tile of rows at a time into a buffer of its own (cpu-nf4's SIMD kernels: float(code x
// absmax), the values bitsandbytes' dequantize_4bit gives), so no whole matrix is ever held in FP32.
template <typename S>
struct FrozenMatrix {
  const Mat<S>* dense = nullptr;
  const cpu::Nf4Matrix* nf4 = nullptr;
  FrozenMatrix() = default;
  FrozenMatrix(const Mat<S>& m) : dense(&m) {}  // NOLINT: a dense matrix passes as it is
  FrozenMatrix(Mat<S>&&) = delete;              // would point at a temporary
  explicit FrozenMatrix(const cpu::Nf4Matrix& m) : nf4(&m) {}
  int64_t rows() const;
  int64_t cols() const;
};

// The trainer's other products: the LoRA factors' (x·Aᵀ, u·Bᵀ and their gradients) and attention's per
// head. C = alpha · op(A) · op(B) + beta · C, op(X) = Xᵀ with Op::T; C is resized when beta is 0. In float on
// OpenBLAS, whose kernels are picked for this CPU at run time (Eigen here is compiled for the x86-64 baseline:
// these products, ~10% of a step on the bundled model, ran 2-3x slower on it); in double on Eigen. One call
// on the calling thread: they run inside the pool's items (experts, heads) or are too small to split.
enum class Op { N, T };
template <typename S>
void gemm(const Mat<S>& a, Op op_a, const Mat<S>& b, Op op_b, S alpha, S beta, Mat<S>& c);
// alpha · op(A) · op(B), a new matrix.
template <typename S>
Mat<S> product(const Mat<S>& a, Op op_a, const Mat<S>& b, Op op_b, S alpha = S(1)) {
  Mat<S> c;
  gemm(a, op_a, b, op_b, alpha, S(0), c);
  return c;
}

class Products {
 public:
  static constexpr int64_t kColumnBlock = 128;
  static constexpr int64_t kMinParallelMacs = int64_t(1) << 22;

  // threads including the caller; 0: the physical cores. Throws moelab::Error when OpenBLAS's kernel set
  // (forced with OPENBLAS_CORETYPE) uses instructions this CPU lacks (blas_kernels.hpp).
  explicit Products(int threads = 0);
  ~Products();
  Products(const Products&) = delete;
  Products& operator=(const Products&) = delete;

  int threads() const;
  // body(begin, end) over [0, n) in chunks of `grain` on the pool; inline when called from inside a body.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) const;

  // x [n, in], w [out, in] -> x·wᵀ [n, out].
  template <typename S>
  Mat<S> x_wt(const Mat<S>& x, const std::type_identity_t<FrozenMatrix<S>>& w) const;
  // dy [n, out], w [out, in] -> dy·w [n, in].
  template <typename S>
  Mat<S> dy_w(const Mat<S>& dy, const std::type_identity_t<FrozenMatrix<S>>& w) const;

  // The float products' kernel set: OpenBLAS's core name ("Haswell", "SkylakeX", "Prescott", ...).
  static std::string blas_kernels();

 private:
  std::unique_ptr<cpu::ThreadPool> pool_;
  cpu::Isa isa_;  // NF4 dequantization's kernels: the widest this CPU runs (bit-identical on every one)
};

}  // namespace moelab::train
