// Runtime choice of the NF4 kernel set: the widest the CPU supports, or one named by the user.
#include <fmt/format.h>

#include <vector>

#include "core/error.hpp"
#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu {

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512: return __builtin_cpu_supports("avx512f");
  }
  return false;
}

Isa best_isa() {
  static const Isa best = isa_supported(Isa::Avx512) ? Isa::Avx512 : isa_supported(Isa::Avx2) ? Isa::Avx2 : Isa::Scalar;
  return best;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  Isa isa;
  if (name == "auto") return best_isa();
  if (name == "scalar") isa = Isa::Scalar;
  else if (name == "avx2") isa = Isa::Avx2;
  else if (name == "avx512") isa = Isa::Avx512;
  else throw Error(fmt::format("unknown kernel set '{}' (scalar, avx2, avx512, auto)", name));
  if (!isa_supported(isa)) throw Error(fmt::format("this CPU does not support {}", name));
  return isa;
}

void prepare_x(Isa isa, const Nf4Matrix& w, const float* x, float* xs) {
  switch (isa) {
    case Isa::Avx512: return avx512::prepare_x(w, x, xs);
    case Isa::Avx2: return avx2::prepare_x(w, x, xs);
    case Isa::Scalar: return scalar::prepare_x(w, x, xs);
  }
}

void gemv_prepared(Isa isa, const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1) {
  switch (isa) {
    case Isa::Avx512: return avx512::gemv_prepared(w, xs, y, r0, r1);
    case Isa::Avx2: return avx2::gemv_prepared(w, xs, y, r0, r1);
    case Isa::Scalar: return scalar::gemv_prepared(w, xs, y, r0, r1);
  }
}

void gemv_prepared_batch(Isa isa, const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y,
                         int64_t y_stride, int64_t r0, int64_t r1) {
  if (isa == Isa::Avx512) return avx512::gemv_prepared_batch(w, xs, xs_stride, n, y, y_stride, r0, r1);
  for (int t = 0; t < n; ++t) gemv_prepared(isa, w, xs + t * xs_stride, y + t * y_stride, r0, r1);
}

void gemv_rows(Isa isa, const Nf4Matrix& w, const float* x, float* y, int64_t r0, int64_t r1) {
  std::vector<float> xs(static_cast<size_t>(w.cols));
  prepare_x(isa, w, x, xs.data());
  gemv_prepared(isa, w, xs.data(), y, r0, r1);
}

void dequantize_rows(Isa isa, const Nf4Matrix& w, int64_t r0, int64_t r1, float* out) {
  switch (isa) {
    case Isa::Avx512: return avx512::dequantize_rows(w, r0, r1, out);
    case Isa::Avx2: return avx2::dequantize_rows(w, r0, r1, out);
    case Isa::Scalar: return scalar::dequantize_rows(w, r0, r1, out);
  }
}

}  // namespace moelab::cpu
