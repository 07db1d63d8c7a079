// The NF4 quantizer: 4-bit codes by the CUDA kernel's decision tree, and double quantization of the
// per-block absmax.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "optimized/nf4/internal.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::nf4 {

namespace {

using detail::ceil_div;

// Runs fn(begin, end) over [0, count) split into up to `threads` contiguous ranges.
template <typename Fn>
void parallel_ranges(int64_t count, int threads, const Fn& fn) {
  const int64_t parts = std::clamp<int64_t>(threads, 1, std::max<int64_t>(count, 1));
  if (parts == 1) {
    fn(int64_t(0), count);
    return;
  }
  const int64_t chunk = ceil_div(count, parts);
  std::vector<std::thread> pool;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t begin = p * chunk, end = std::min(count, begin + chunk);
    if (begin < end) pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  for (auto& t : pool) t.join();
}

// The kernel's tree is a binary search over the sorted thresholds with '>' at every node, so its
// answer is the number of thresholds x is strictly greater than (0 for NaN, which compares false).
// Counting without branches lets the compiler vectorize the block loop.
inline uint8_t code_of(float x) {
  int code = 0;
  for (float t : kThresholds) code += x > t ? 1 : 0;
  return uint8_t(code);
}

// One 4-bit block: absmax, then every element scaled by the reciprocal. `end` is the end of the block
// or of the tensor; blocks start at even indices, so each block owns its bytes.
void quantize_block(const float* x, int64_t begin, int64_t end, uint8_t* packed, float* absmax) {
  float amax = 0.0f;
  for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
  *absmax = amax;
  // The kernel multiplies by 1.0f / absmax. An all-zero block gives inf, 0 * inf = NaN, and NaN
  // takes code 0 (-1.0); it dequantizes to -1.0 * 0 = -0.0.
  const float inv = 1.0f / amax;
  // The kernel loads the element past the end of an odd-length tensor as 0.0f and quantizes it like
  // the rest, so the pad nibble is the code of 0 * inv: 7 (the code of 0.0), or 0 in a zero block.
  const int64_t count = end - begin;
  std::array<uint8_t, kBlocksizes.back() + 1> codes;
  for (int64_t i = 0; i < count; ++i) codes[size_t(i)] = code_of(x[begin + i] * inv);
  if (count % 2 == 1) codes[size_t(count)] = code_of(0.0f * inv);
  for (int64_t k = 0; k < (count + 1) / 2; ++k)
    packed[begin / 2 + k] = uint8_t(codes[size_t(2 * k)] << 4 | codes[size_t(2 * k + 1)]);
}

// Double quantization of q.absmax (bitsandbytes quantize_4bit with compress_statistics=True).
void nest_statistics(QuantizedTensor& q) {
  const std::vector<float>& absmax = q.absmax;
  q.offset = torch_cpu_mean(absmax);
  const auto& code = dynamic_map();
  const int64_t nb = int64_t(absmax.size());
  q.qabsmax.assign(size_t(nb), 0);
  q.nested_absmax.assign(size_t(ceil_div(nb, q.nested_blocksize)), 0.0f);
  std::vector<float> centered(absmax.size());
  for (size_t i = 0; i < absmax.size(); ++i) centered[i] = absmax[i] - q.offset;
  for (int64_t b = 0; b * q.nested_blocksize < nb; ++b) {
    const int64_t begin = b * q.nested_blocksize, end = std::min(nb, begin + q.nested_blocksize);
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(centered[size_t(i)]));
    q.nested_absmax[size_t(b)] = amax;
    const float inv = 1.0f / amax;  // all equal absmax: 0 * inf = NaN -> code 0, rebuilt as the offset
    for (int64_t i = begin; i < end; ++i) q.qabsmax[size_t(i)] = quantize_dynamic(centered[size_t(i)] * inv, code);
  }
  q.nested_code.assign(code.begin(), code.end());
  q.nested = true;
  q.absmax.clear();
}

}  // namespace

bool is_valid_blocksize(int blocksize) {
  return std::find(kBlocksizes.begin(), kBlocksizes.end(), blocksize) != kBlocksizes.end();
}

uint8_t quantize_value(float x) { return code_of(x); }

QuantizedTensor quantize_nf4(const float* x, int64_t n, int blocksize, bool double_quant, int threads) {
  if (!is_valid_blocksize(blocksize))
    throw Error(fmt::format("NF4: blocksize {} is not one bitsandbytes allows (32, 64, ..., 4096)", blocksize));
  if (n <= 0) throw Error("NF4: cannot quantize an empty tensor");
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) throw Error(fmt::format("NF4: element {} is {}, cannot be quantized", i, x[i]));

  QuantizedTensor q;
  q.shape = {n};
  q.blocksize = blocksize;
  q.packed.assign(size_t((n + 1) / 2), 0);
  q.absmax.assign(size_t(ceil_div(n, blocksize)), 0.0f);
  parallel_ranges(q.nblocks(), threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b)
      quantize_block(x, b * blocksize, std::min(n, (b + 1) * blocksize), q.packed.data(), &q.absmax[size_t(b)]);
  });
  if (double_quant) nest_statistics(q);
  return q;
}

}  // namespace moelab::nf4
