// Routing traces (analysis/trace.hpp). By concern: trace_h5.{hpp,cpp} (HDF5 helpers, safe attribute and
// row reading, opening files), trace_writer.cpp (TraceWriter), trace_reader.cpp (read_trace,
// repair_trace), trace_inputs.cpp (read_trace_inputs), trace_probe.cpp (RoutingProbe, route_window);
// here, the float16 conversion of router logits.
#include "analysis/trace.hpp"

#include <cmath>
#include <cstring>

namespace moelab::analysis {

// ---------------------------------------------------------------------------------------------------
// IEEE half precision

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7fffffff;
  if (abs > 0x7f800000) return sign | 0x7e00 | uint16_t((abs >> 13) & 0x3ff);  // NaN, kept quiet
  if (abs >= 0x477ff000) return sign | 0x7c00;  // >= 65520, halfway to 2^16 or more: infinity
  if (abs >= 0x38800000) {                      // a normal half (>= 2^-14)
    // Rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even; a
    // mantissa carry correctly bumps the exponent.
    const uint32_t odd = (abs >> 13) & 1;
    return sign | uint16_t((abs - (uint32_t(112) << 23) + 0xfff + odd) >> 13);
  }
  // Subnormal half (multiples of 2^-24): adding 0.5 puts the value where one float ulp is 2^-24, so
  // the FPU's own round-to-nearest-even does the rounding; the low bits are then the half mantissa.
  float v;
  std::memcpy(&v, &abs, 4);
  v += 0.5f;
  uint32_t r;
  std::memcpy(&r, &v, 4);
  return sign | uint16_t(r - 0x3f000000);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = std::ldexp(float(mant), -24);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace moelab::analysis
