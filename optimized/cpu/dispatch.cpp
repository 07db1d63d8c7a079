// Runtime choice of the NF4 kernel set: the widest the CPU supports, or one named by the user.
#include <cpuid.h>
#include <fmt/format.h>

#include <vector>

#include "core/error.hpp"
#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu {

namespace {
// AVX-VNNI (the VEX-encoded vpdpbusd): CPUID.(EAX=7,ECX=1):EAX bit 4, read directly because clang 14's
// __builtin_cpu_supports does not know "avxvnni" (a compile error there; GCC 12 knows it). The OS's
// support of the YMM state it needs is what the avx2 check below already requires.
bool cpu_has_avxvnni() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a >> 4) & 1u;
}
}  // namespace

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx2Vnni: return isa_supported(Isa::Avx2) && cpu_has_avxvnni();
    case Isa::Avx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    case Isa::Avx512Vnni: return isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512vnni");
  }
  return false;
}

Isa best_isa() {
  static const Isa best = [] {
    for (Isa isa : {Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2Vnni, Isa::Avx2})
      if (isa_supported(isa)) return isa;
    return Isa::Scalar;
  }();
  return best;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx2Vnni: return "avx2-vnni";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Vnni: return "avx512-vnni";
  }
  return "?";
}

std::string isa_features(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "none";
    case Isa::Avx2: return "avx2 fma";
    case Isa::Avx2Vnni: return "avx2 fma avxvnni";
    case Isa::Avx512: return "avx512f avx512bw";
    case Isa::Avx512Vnni: return "avx512f avx512bw avx512vnni";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (Isa isa : kAllIsas)
    if (isa_name(isa) == name) {
      if (!isa_supported(isa)) throw Error(fmt::format("this CPU does not support {} (needs {})", name, isa_features(isa)));
      return isa;
    }
  throw Error(fmt::format("unknown kernel set '{}' (scalar, avx2, avx2-vnni, avx512, avx512-vnni, auto)", name));
}

namespace {
// The FP32 kernels come in three widths; the VNNI sets differ only in the int8 dot product.
enum class Fp32Set { Scalar, Avx2, Avx512 };
Fp32Set fp32_set(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return Fp32Set::Scalar;
    case Isa::Avx2:
    case Isa::Avx2Vnni: return Fp32Set::Avx2;
    case Isa::Avx512:
    case Isa::Avx512Vnni: return Fp32Set::Avx512;
  }
  return Fp32Set::Scalar;
}
int vector_bytes(Isa isa) { return fp32_set(isa) == Fp32Set::Avx512 ? 64 : fp32_set(isa) == Fp32Set::Avx2 ? 32 : 0; }
}  // namespace

void prepare_x(Isa isa, const Nf4Matrix& w, const float* x, float* xs) {
  switch (fp32_set(isa)) {
    case Fp32Set::Avx512: return avx512::prepare_x(w, x, xs);
    case Fp32Set::Avx2: return avx2::prepare_x(w, x, xs);
    case Fp32Set::Scalar: return scalar::prepare_x(w, x, xs);
  }
}

void gemv_prepared(Isa isa, const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1) {
  switch (fp32_set(isa)) {
    case Fp32Set::Avx512: return avx512::gemv_prepared(w, xs, y, r0, r1);
    case Fp32Set::Avx2: return avx2::gemv_prepared(w, xs, y, r0, r1);
    case Fp32Set::Scalar: return scalar::gemv_prepared(w, xs, y, r0, r1);
  }
}

void gemv_prepared_batch(Isa isa, const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y,
                         int64_t y_stride, int64_t r0, int64_t r1) {
  switch (fp32_set(isa)) {
    case Fp32Set::Avx512: return avx512::gemv_prepared_batch(w, xs, xs_stride, n, y, y_stride, r0, r1);
    case Fp32Set::Avx2: return avx2::gemv_prepared_batch(w, xs, xs_stride, n, y, y_stride, r0, r1);
    case Fp32Set::Scalar: break;
  }
  for (int t = 0; t < n; ++t) scalar::gemv_prepared(w, xs + t * xs_stride, y + t * y_stride, r0, r1);
}

void gemv_rows(Isa isa, const Nf4Matrix& w, const float* x, float* y, int64_t r0, int64_t r1) {
  std::vector<float> xs(static_cast<size_t>(w.cols));
  prepare_x(isa, w, x, xs.data());
  gemv_prepared(isa, w, xs.data(), y, r0, r1);
}

void dequantize_rows(Isa isa, const Nf4Matrix& w, int64_t r0, int64_t r1, float* out) {
  switch (fp32_set(isa)) {
    case Fp32Set::Avx512: return avx512::dequantize_rows(w, r0, r1, out);
    case Fp32Set::Avx2: return avx2::dequantize_rows(w, r0, r1, out);
    case Fp32Set::Scalar: return scalar::dequantize_rows(w, r0, r1, out);
  }
}

bool q8_simd_kernel(Isa isa, const Nf4Matrix& w) {
  const int bytes = vector_bytes(isa);
  return bytes > 0 && w.cols % (2 * bytes) == 0 && w.blocksize >= 64;
}

void prepare_q8(Isa isa, const Nf4Matrix& w, const float* x, int8_t* q, float* d) {
  if (!q8_simd_kernel(isa, w)) {
    quantize_q8(x, w.cols, q, d);
    return write_q8_lane_sums(q, w.cols, q + w.cols);
  }
  // Scratch for the natural order, reused: this runs per token and matrix on the decode path.
  thread_local std::vector<int8_t> natural_q;
  natural_q.resize(size_t(w.cols));
  quantize_q8(x, w.cols, natural_q.data(), d);
  lay_out_q8(vector_bytes(isa), natural_q.data(), w.cols, q);
  write_q8_lane_sums(natural_q.data(), w.cols, q + w.cols);
}

void gemv_q8(Isa isa, const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n,
             float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  if (!q8_simd_kernel(isa, w)) return scalar::gemv_q8(w, q, q_stride, d, d_stride, n, y, y_stride, r0, r1);
  switch (isa) {
    case Isa::Avx2: return avx2::gemv_q8(w, q, q_stride, d, d_stride, n, y, y_stride, r0, r1);
    case Isa::Avx2Vnni: return avx2::gemv_q8_vnni(w, q, q_stride, d, d_stride, n, y, y_stride, r0, r1);
    case Isa::Avx512: return avx512::gemv_q8(w, q, q_stride, d, d_stride, n, y, y_stride, r0, r1);
    case Isa::Avx512Vnni: return avx512::gemv_q8_vnni(w, q, q_stride, d, d_stride, n, y, y_stride, r0, r1);
    case Isa::Scalar: break;
  }
  scalar::gemv_q8(w, q, q_stride, d, d_stride, n, y, y_stride, r0, r1);
}

}  // namespace moelab::cpu
