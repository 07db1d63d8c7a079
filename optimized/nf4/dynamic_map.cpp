// bitsandbytes' dynamic 8-bit map (the code of the double-quantized absmax), built as torch builds it,
// and the CUDA kernel's rule for the 8-bit code of a value.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::nf4 {

namespace {

// torch.linspace(start, end, steps, dtype=float32) on CPU: each half counted from its own end, and
// the AVX2/AVX-512 builds of torch fuse `start + step * i` into one FMA (a build without FMA gives
// different last bits for steps >= 9; the fixture test checks this table against bitsandbytes').
std::vector<float> torch_linspace_f32(float start, float end, int64_t steps) {
  std::vector<float> out(static_cast<size_t>(steps));
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int64_t halfway = steps / 2;
  for (int64_t i = 0; i < steps; ++i)
    out[size_t(i)] = i < halfway ? std::fma(step, static_cast<float>(i), start)
                                 : std::fma(-step, static_cast<float>(steps - i - 1), end);
  return out;
}

std::array<float, 256> make_dynamic_map() {
  // signed, 7 exponent bits, 8 bits in all: for exponent e = 0..6 there are 2^e fraction values, the
  // midpoints of linspace(0.1, 1, 2^e + 1), scaled by 10^(e-6), each with both signs; then 0 and 1.
  constexpr int kExponentBits = 7;
  std::vector<float> values;
  for (int e = 0; e < kExponentBits; ++e) {
    const auto bounds = torch_linspace_f32(0.1f, 1.0f, (int64_t(1) << e) + 1);
    // Python evaluates 10 ** (e - 6) as a double (an int 1 for e = 6); torch rounds it to float32.
    const float scale = static_cast<float>(std::pow(10.0, e - (kExponentBits - 1)));
    for (size_t j = 0; j + 1 < bounds.size(); ++j) {
      const float mid = (bounds[j] + bounds[j + 1]) / 2.0f;
      values.push_back(scale * mid);
      values.push_back(-scale * mid);
    }
  }
  values.push_back(0.0f);
  values.push_back(1.0f);
  std::sort(values.begin(), values.end());
  if (values.size() != 256) throw Error("internal: dynamic map does not have 256 entries");
  std::array<float, 256> out;
  std::copy(values.begin(), values.end(), out.begin());
  return out;
}

}  // namespace

const std::array<float, 256>& dynamic_map() {
  static const std::array<float, 256> map = make_dynamic_map();
  return map;
}

uint8_t quantize_dynamic(float x, const std::array<float, 256>& code) {
  // Binary search: after 7 halvings the pivot p (always even) satisfies code[p-1] < x <= code[p+1].
  int p = 127;
  for (int step = 64; step > 0; step /= 2) p += x > code[size_t(p)] ? step : -step;
  // Nearest of the two candidates on x's side of code[p], by the float midpoint; on the midpoint
  // itself the pivot wins.
  if (x > code[size_t(p)]) {
    const float mid = (code[size_t(p)] + code[size_t(p) + 1]) * 0.5f;
    return uint8_t(x > mid ? p + 1 : p);
  }
  if (p == 0) return 0;
  const float mid = (code[size_t(p) - 1] + code[size_t(p)]) * 0.5f;
  return uint8_t(x < mid ? p - 1 : p);
}

}  // namespace moelab::nf4
