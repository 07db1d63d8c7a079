// QuantizedTensor: its sizes, its consistency check, and dequantization (per element, and by block into
// a caller's buffer).
#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.hpp"
#include "optimized/nf4/internal.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::nf4 {

using detail::ceil_div;

int64_t QuantizedTensor::numel() const { return shape_numel(shape); }
int64_t QuantizedTensor::nblocks() const { return blocksize > 0 ? ceil_div(numel(), blocksize) : 0; }

void validate(const QuantizedTensor& q, const std::string& what) {
  auto bad = [&](const std::string& problem) { return Error(fmt::format("{}: {}", what, problem)); };
  if (!is_valid_blocksize(q.blocksize)) throw bad(fmt::format("blocksize {} is not allowed", q.blocksize));
  if (!detail::is_known_dtype(q.dtype))
    throw bad(fmt::format("dtype '{}' is not float32, float16 or bfloat16", q.dtype));
  if (q.shape.empty()) throw bad("shape is empty");
  for (auto d : q.shape)
    if (d <= 0) throw bad(fmt::format("shape {} has a dimension <= 0", shape_str(q.shape)));
  const int64_t n = q.numel(), nb = q.nblocks();
  if (int64_t(q.packed.size()) != (n + 1) / 2)
    throw bad(fmt::format("{} packed bytes for {} elements (expected {})", q.packed.size(), n, (n + 1) / 2));
  if (!q.nested) {
    if (int64_t(q.absmax.size()) != nb) throw bad(fmt::format("{} absmax values for {} blocks", q.absmax.size(), nb));
    return;
  }
  if (!is_valid_blocksize(q.nested_blocksize))
    throw bad(fmt::format("nested blocksize {} is not allowed", q.nested_blocksize));
  if (int64_t(q.qabsmax.size()) != nb) throw bad(fmt::format("{} absmax codes for {} blocks", q.qabsmax.size(), nb));
  if (int64_t(q.nested_absmax.size()) != ceil_div(nb, q.nested_blocksize))
    throw bad(fmt::format("{} nested absmax values for {} blocks (nested blocksize {})", q.nested_absmax.size(), nb,
                          q.nested_blocksize));
  if (q.nested_code.size() != 256) throw bad(fmt::format("nested code map has {} entries, not 256", q.nested_code.size()));
  // Each block's absmax is code x nested_absmax + offset in float32: every term finite, and no sum past float32's
  // range (an offset of 1e39, or codes and nested values of 3e38, would dequantize to inf and NaN without a word;
  // bitsandbytes' are at most 1, a few hundred, and the mean absmax).
  if (!std::isfinite(q.offset)) throw bad(fmt::format("nested offset {} is not finite", q.offset));
  double max_code = 0, max_nested = 0;
  for (size_t k = 0; k < q.nested_code.size(); ++k) {
    if (!std::isfinite(q.nested_code[k])) throw bad(fmt::format("nested code map entry {} is {}", k, q.nested_code[k]));
    max_code = std::max(max_code, std::fabs(double(q.nested_code[k])));
  }
  for (size_t g = 0; g < q.nested_absmax.size(); ++g) {
    if (!std::isfinite(q.nested_absmax[g])) throw bad(fmt::format("nested absmax {} is {}", g, q.nested_absmax[g]));
    max_nested = std::max(max_nested, std::fabs(double(q.nested_absmax[g])));
  }
  const double bound = max_code * max_nested + std::fabs(double(q.offset));
  if (!(bound <= double(std::numeric_limits<float>::max())))
    throw bad(fmt::format("its nested statistics give block absmax values up to {:.3g}, past float32's range "
                          "(nested code up to {:.3g}, nested absmax up to {:.3g}, offset {:.3g})",
                          bound, max_code, max_nested, q.offset));
}

namespace {

// Block b's float32 absmax, rebuilt from the nested statistics when nested: dequantize_blockwise, then
// `absmax += offset`, two separate float32 roundings (the library builds with -ffp-contract=off, so no
// fused multiply-add).
inline float absmax_of_block(const QuantizedTensor& q, size_t b) {
  if (!q.nested) return q.absmax[b];
  const float scaled = q.nested_code[q.qabsmax[b]] * q.nested_absmax[b / size_t(q.nested_blocksize)];
  return scaled + q.offset;
}

template <typename T>
void dequantize_range(const QuantizedTensor& q, int64_t first_block, int64_t last_block, T* out) {
  const int64_t n = q.numel(), bs = q.blocksize;
  const unsigned char* packed = q.packed.data();
  for (int64_t b = first_block; b < last_block; ++b) {
    const float a = absmax_of_block(q, size_t(b));
    T scaled[16];  // the float32 product nf4[c] * absmax, as the per-element formula rounds it, then widened
    for (size_t c = 0; c < 16; ++c) scaled[c] = T(kCodes[c] * a);
    // Every allowed blocksize is even, so a block starts on a byte boundary: byte k of the block holds
    // its elements 2k and 2k+1. The last block may be partial and (odd n) end on a high nibble.
    const int64_t begin = b * bs, len = std::min(n, begin + bs) - begin;
    const unsigned char* p = packed + begin / 2;
    T* o = out + begin;
    const int64_t pairs = len / 2;
    for (int64_t k = 0; k < pairs; ++k) {
      o[2 * k] = scaled[code_at(p, 2 * k)];
      o[2 * k + 1] = scaled[code_at(p, 2 * k + 1)];
    }
    if (len & 1) o[len - 1] = scaled[code_at(p, len - 1)];
  }
}

template <typename T>
void dequantize_blocks(const QuantizedTensor& q, T* out, int threads) {
  validate(q);
  const int64_t nblocks = q.nblocks();
  const int nthreads = threads > 0 ? threads : omp_get_max_threads();
  // A few blocks are not worth waking threads for (the bundled model's matrices).
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && q.numel() >= (int64_t(1) << 16))
  for (int64_t b = 0; b < nblocks; ++b) dequantize_range(q, b, b + 1, out);
}

}  // namespace

std::vector<float> block_absmax(const QuantizedTensor& q) {
  validate(q);
  if (!q.nested) return q.absmax;
  std::vector<float> out(q.qabsmax.size());
  for (size_t b = 0; b < out.size(); ++b) out[b] = absmax_of_block(q, b);
  return out;
}

std::vector<float> dequantize(const QuantizedTensor& q) {
  const std::vector<float> absmax = block_absmax(q);
  const int64_t n = q.numel();
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out[size_t(i)] = kCodes[size_t(code_at(q.packed.data(), i))] * absmax[size_t(i / q.blocksize)];
  }
  return out;
}

void dequantize_into(const QuantizedTensor& q, float* out, int threads) { dequantize_blocks(q, out, threads); }
void dequantize_into(const QuantizedTensor& q, double* out, int threads) { dequantize_blocks(q, out, threads); }
void dequantize_blocks_into(const QuantizedTensor& q, int64_t first_block, int64_t last_block, float* out) {
  dequantize_range(q, std::max<int64_t>(0, first_block), std::min(q.nblocks(), last_block), out);
}
void dequantize_blocks_into(const QuantizedTensor& q, int64_t first_block, int64_t last_block, double* out) {
  dequantize_range(q, std::max<int64_t>(0, first_block), std::min(q.nblocks(), last_block), out);
}

}  // namespace moelab::nf4
