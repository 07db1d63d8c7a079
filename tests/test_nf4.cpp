// NF4 format tests: bitsandbytes' fixtures (tests/fixtures/nf4, scripts/make_nf4_fixtures.py) byte for
// byte, and the CUDA rules directly where bitsandbytes' CPU path (the fixtures' oracle) differs from
// them. The differences are numbered as in tests/fixtures/nf4/README.md:
//   1 odd n (CPU cannot pack it)             OddLengthPadNibbleIsTheCodeOfZero, EveryCaseMatches...
//   2 values exactly on a threshold          MidpointProbeDiffersFromTheCpuPathAtFourThresholds
//   3 8-bit map entry 0 overwritten (-1.0)   CpuQuantizerOverwritesEntryZero, EveryCaseMatches...,
//                                            WritesWhatBitsandbytesWrites
//   4 8-bit tie rule                          TieProbeDiffersFromTheCpuPathOnlyOnExactMidpoints
//   5 CUDA fast-math reciprocal, GPU mean    not testable without a GPU (moelab: IEEE 1/absmax, CPU mean)
//   6 native CPU dequantize wrong when a row is not whole blocks: fixtures hold the flat result
//   7 pure-torch dequantize rounds the code to bf16 first: the bf16 fixture holds the native result
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"
#include "optimized/cpu/nf4_matrix.hpp"
#include "optimized/nf4/nf4.hpp"
#include "process_util.hpp"

using namespace moelab;
using namespace moelab::nf4;
using moelab::test::TempDir;
namespace fs = std::filesystem;

namespace {

std::string nf4_fixture(const std::string& rel) { return std::string(MOELAB_FIXTURES) + "/nf4/" + rel; }

const SafetensorsFile& cases_file() {
  static const SafetensorsFile f(nf4_fixture("cases.safetensors"));
  return f;
}

std::vector<uint8_t> read_u8(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.info(name);
  EXPECT_EQ(t.dtype, DType::U8) << name;
  const auto b = f.bytes(t);
  std::vector<uint8_t> out(b.size());
  if (!b.empty()) std::memcpy(out.data(), b.data(), b.size());
  return out;
}

uint32_t bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

// Index of the first element whose bit pattern differs, or -1.
int64_t first_bit_difference(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (bits(a[i]) != bits(b[i])) return int64_t(i);
  return -1;
}

struct FixtureCase {
  std::string name, input;
  int blocksize;
  bool nested, padded;
};

std::vector<FixtureCase> fixture_cases() {
  const auto j = nlohmann::json::parse(cases_file().metadata().at("cases"));
  std::vector<FixtureCase> out;
  for (const auto& c : j)
    out.push_back({c["case"], c["input"], c["blocksize"], c["nested"], c["padded_for_odd_n"]});
  return out;
}

// The decision tree exactly as formats.md 3.2 writes it (an oracle independent of quantize_value's
// threshold count).
uint8_t tree_oracle(float x) {
  return x > 0.03979014977812767f
             ? (x > 0.3893125355243683f
                    ? (x > 0.6427869200706482f ? (x > 0.8614784181118011f ? 15 : 14)
                                               : (x > 0.5016634166240692f ? 13 : 12))
                    : (x > 0.2035212516784668f ? (x > 0.2920137718319893f ? 11 : 10)
                                               : (x > 0.1202552504837513f ? 9 : 8)))
             : (x > -0.33967943489551544f
                    ? (x > -0.13791173323988914f ? (x > -0.045525018125772476f ? 7 : 6)
                                                 : (x > -0.23460740596055984f ? 5 : 4))
                    : (x > -0.6106329262256622f ? (x > -0.4599952697753906f ? 3 : 2)
                                                : (x > -0.8480964004993439f ? 1 : 0)));
}

uint8_t code_at(const std::vector<uint8_t>& packed, int64_t i) {
  const uint8_t byte = packed[size_t(i / 2)];
  return i % 2 == 0 ? byte >> 4 : byte & 0x0F;
}

// A straightforward model of the CUDA kernel for plain (not nested) quantization.
void plain_oracle(const std::vector<float>& x, int bs, std::vector<uint8_t>& packed, std::vector<float>& absmax) {
  const int64_t n = int64_t(x.size()), nb = (n + bs - 1) / bs;
  absmax.assign(size_t(nb), 0.0f);
  std::vector<uint8_t> codes(size_t(n + 1), 0);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) absmax[b] = std::max(absmax[b], std::fabs(x[i]));
    const float inv = 1.0f / absmax[b];
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) codes[i] = tree_oracle(x[i] * inv);
    if (n % 2 == 1 && b == nb - 1) codes[n] = tree_oracle(0.0f * inv);
  }
  packed.assign(size_t((n + 1) / 2), 0);
  for (int64_t k = 0; k < (n + 1) / 2; ++k) packed[k] = uint8_t(codes[2 * k] << 4 | codes[2 * k + 1]);
}

std::vector<float> random_normal(size_t n, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}


}  // namespace

// ------------------------------------------------------------------------------------------------
// The 4-bit code and its decision rule.

TEST(Nf4Codes, TableIsBitsandbytesTable) {
  const auto table = cases_file().read_f32("nf4_code");
  ASSERT_EQ(table.size(), 16u);
  for (size_t k = 0; k < 16; ++k) EXPECT_EQ(bits(table[k]), bits(kCodes[k])) << k;
}

// moelab defines the 16 values once (optimized/nf4/code_values.hpp). The std::array here and the
// cpu-nf4 kernels' table are that array; cuda-nf4's constant memory is initialized from it in
// kernels.cu. What is derived from it is checked against it below.
TEST(Nf4Codes, EveryFloatTableIsTheOneDefinition) {
  for (size_t k = 0; k < 16; ++k) EXPECT_EQ(bits(kCodes[k]), bits(kCodeValues[k])) << k;
  EXPECT_EQ(&cpu::kNf4Codes[0], &kCodeValues[0]) << "cpu-nf4 keeps a copy of the NF4 table";
}

// The int8 kernels' codes are round(127 * code), here rounded in double. Every product is at least 0.03
// from a tie (127 * 0.1848 = 23.466), and a float product below 128 is off by at most 2^-18, so the
// float arithmetic of the compile-time derivation cannot round one differently.
TEST(Nf4Codes, Int8CodesAreTheTableTimes127Rounded) {
  for (size_t k = 0; k < 16; ++k) {
    const double scaled = 127.0 * double(kCodeValues[k]);
    EXPECT_EQ(int(cpu::kNf4Int8[k]), int(std::lround(scaled))) << k;
    EXPECT_GT(std::fabs(std::fabs(scaled - std::trunc(scaled)) - 0.5), 0.03) << k;
  }
}

TEST(Nf4Codes, ThresholdsAreTheKernelsFloatConstants) {
  // The bits nvcc gives the kernel's literals (nvcc -ptx of `x > -0.8480964004993439f` ...). Four of
  // them are one ulp from the float midpoint of their two codes, because the decimal literals were
  // printed from a float64 computation; a rounding through double (e.g. np.float32(0.12025525...))
  // would land on the midpoint instead, so these are pinned as bits.
  const uint32_t nvcc_bits[15] = {0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC,
                                  0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF, 0x3DF64863, 0x3E5067E0,
                                  0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9};
  const std::set<size_t> off_midpoint = {0, 8, 12, 14};
  for (size_t k = 0; k < 15; ++k) {
    EXPECT_EQ(bits(kThresholds[k]), nvcc_bits[k]) << k;
    const float mid = (kCodes[k] + kCodes[k + 1]) * 0.5f;
    const int64_t ulps = int64_t(bits(std::fabs(kThresholds[k]))) - int64_t(bits(std::fabs(mid)));
    EXPECT_EQ(std::abs(ulps), off_midpoint.count(k) ? 1 : 0) << k;
  }
}

TEST(Nf4Codes, DecisionRuleEqualsTheLiteralTree) {
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 2.0f, -2.0f, std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  for (float t : kThresholds) {
    float lo = t, hi = t;
    xs.push_back(t);
    for (int s = 0; s < 4; ++s) {
      lo = std::nextafter(lo, -2.0f);
      hi = std::nextafter(hi, 2.0f);
      xs.push_back(lo);
      xs.push_back(hi);
    }
  }
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.1f, 1.1f);
  for (int i = 0; i < 200000; ++i) xs.push_back(u(rng));
  for (float x : xs) ASSERT_EQ(quantize_value(x), tree_oracle(x)) << x;
}

TEST(Nf4Codes, ValueOnAMidpointTakesTheLowerCode) {
  for (int k = 0; k < 15; ++k) {
    const float t = kThresholds[size_t(k)];
    EXPECT_EQ(quantize_value(t), k) << "exactly on threshold " << k;
    EXPECT_EQ(quantize_value(std::nextafter(t, 2.0f)), k + 1) << "just above threshold " << k;
    EXPECT_EQ(quantize_value(std::nextafter(t, -2.0f)), k) << "just below threshold " << k;
  }
}

TEST(Nf4Codes, EveryCodeValueMapsToItself) {
  for (int c = 0; c < 16; ++c) EXPECT_EQ(quantize_value(kCodes[size_t(c)]), c);
}

TEST(Nf4Codes, NanTakesCodeZero) {
  EXPECT_EQ(quantize_value(std::numeric_limits<float>::quiet_NaN()), 0);
  EXPECT_EQ(quantize_value(0.0f * std::numeric_limits<float>::infinity()), 0);
}

// ------------------------------------------------------------------------------------------------
// quantize_nf4 against the CUDA rules directly.

TEST(Nf4Quantize, AllZeroBlockIsCodeZeroAndDequantizesToMinusZero) {
  std::vector<float> x(128, 0.0f);
  const auto tail = random_normal(64, 0.1f, 3);
  std::copy(tail.begin(), tail.end(), x.begin() + 64);
  const auto q = quantize_nf4(x.data(), int64_t(x.size()), 64, false);
  EXPECT_EQ(q.absmax[0], 0.0f);
  for (int k = 0; k < 32; ++k) EXPECT_EQ(q.packed[size_t(k)], 0x00) << k;  // 1/0 = inf, 0 * inf = NaN -> 0
  const auto d = dequantize(q);
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(d[size_t(i)], 0.0f);
    EXPECT_TRUE(std::signbit(d[size_t(i)])) << "-1.0 * 0 is -0.0";
  }
}

TEST(Nf4Quantize, AllZeroBlockUnderDoubleQuantizationRebuildsFromTheOffset) {
  // The zero block's absmax goes through (absmax - offset) and the 8-bit map like any other, so its
  // rebuilt absmax is not exactly 0 and the block dequantizes to -rebuilt (code 0 is -1.0).
  std::vector<float> x(64 * 4, 0.0f);
  for (int b = 1; b < 4; ++b)
    for (int i = 0; i < 64; ++i) x[size_t(b * 64 + i)] = 0.01f * float(b) * float((i % 7) - 3);
  const auto q = quantize_nf4(x.data(), int64_t(x.size()), 64, true);
  const auto absmax = block_absmax(q);
  const auto d = dequantize(q);
  EXPECT_NE(absmax[0], 0.0f);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(bits(d[size_t(i)]), bits(-1.0f * absmax[0]));
}

TEST(Nf4Quantize, OddLengthPadNibbleIsTheCodeOfZero) {
  // CUDA loads the element past the end as 0.0f in the same block: code 7 (0.0) unless the block is
  // all zero (code 0). bitsandbytes 0.49.2's CPU path cannot pack odd n at all (difference 1).
  const std::vector<float> x = {0.5f, -0.25f, 1.0f, 0.125f, -0.75f};
  const auto q = quantize_nf4(x.data(), 5, 64, false);
  ASSERT_EQ(q.packed.size(), 3u);
  EXPECT_EQ(q.packed[2] & 0x0F, 7);
  EXPECT_EQ(q.packed[2] >> 4, quantize_value(-0.75f));

  std::vector<float> y(65, 0.3f);
  y[64] = 0.0f;  // the last block is a single zero: the pad shares its NaN scale
  const auto qz = quantize_nf4(y.data(), 65, 64, false);
  EXPECT_EQ(qz.packed.back(), 0x00);
  EXPECT_EQ(dequantize(qz).size(), 65u);
}

TEST(Nf4Quantize, PartialLastBlockHasItsOwnAbsmax) {
  auto x = random_normal(100, 1.0f, 5);
  x[10] = 50.0f;  // in block 0 only
  const auto q = quantize_nf4(x.data(), 100, 64, false);
  ASSERT_EQ(q.absmax.size(), 2u);
  float tail = 0.0f;
  for (int i = 64; i < 100; ++i) tail = std::max(tail, std::fabs(x[size_t(i)]));
  EXPECT_EQ(q.absmax[0], 50.0f);
  EXPECT_EQ(q.absmax[1], tail);
}

TEST(Nf4Quantize, EveryAllowedBlocksizeMatchesTheKernelModel) {
  const auto x = random_normal(5001, 0.02f, 7);  // odd, and partial last block for every size
  for (int bs : kBlocksizes) {
    std::vector<uint8_t> packed;
    std::vector<float> absmax;
    plain_oracle(x, bs, packed, absmax);
    const auto q = quantize_nf4(x.data(), int64_t(x.size()), bs, false);
    EXPECT_EQ(q.packed, packed) << "blocksize " << bs;
    EXPECT_EQ(q.absmax, absmax) << "blocksize " << bs;
    EXPECT_EQ(q.nblocks(), (5001 + bs - 1) / bs);
    const auto d = dequantize(q);
    for (int64_t i = 0; i < 5001; i += 97)
      EXPECT_EQ(bits(d[size_t(i)]), bits(kCodes[code_at(packed, i)] * absmax[size_t(i / bs)]));
  }
}

TEST(Nf4Quantize, ScalesByTheReciprocalNotByDivision) {
  // Find values whose code depends on x * (1/a) versus x / a; the kernel multiplies.
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> ua(0.01f, 3.0f);
  int found = 0;
  for (int trial = 0; trial < 20000 && found < 20; ++trial) {
    const float a = ua(rng);
    const float t = kThresholds[size_t(trial % 15)];
    float x = t * a;
    for (int s = 0; s < 6; ++s, x = std::nextafter(x, 10.0f)) {
      if (std::fabs(x) >= a) continue;
      const float inv = 1.0f / a;
      if (quantize_value(x * inv) == quantize_value(x / a)) continue;
      std::vector<float> block = {a, x};
      const auto q = quantize_nf4(block.data(), 2, 64, false);
      EXPECT_EQ(q.packed[0] & 0x0F, quantize_value(x * inv)) << "a=" << a << " x=" << x;
      ++found;
    }
  }
  EXPECT_GT(found, 0) << "no value found where the two scalings disagree";
}

TEST(Nf4Quantize, ThreadsDoNotChangeTheResult) {
  const auto x = random_normal(64 * 1000 + 3, 0.05f, 13);
  const auto a = quantize_nf4(x.data(), int64_t(x.size()), 64, true, 1);
  const auto b = quantize_nf4(x.data(), int64_t(x.size()), 64, true, 7);
  EXPECT_EQ(a.packed, b.packed);
  EXPECT_EQ(a.qabsmax, b.qabsmax);
  EXPECT_EQ(a.nested_absmax, b.nested_absmax);
  EXPECT_EQ(bits(a.offset), bits(b.offset));
}

// dequantize_into (the trainer's block-at-a-time, threaded path) against the per-element definition
// out[i] = nf4[code[i]] * absmax[i / blocksize], bit for bit, in float and widened to double: partial last
// blocks, an odd length (the last block ends on a high nibble), an all-zero block, double quantization
// over several nested blocks, and tensors large enough that the blocks are split over threads.
TEST(Nf4Dequantize, IntoABufferEqualsThePerElementFormulaBitForBit) {
  struct Case {
    std::vector<int64_t> shape;
    int blocksize;
    bool nested;
  };
  const std::vector<Case> cases = {
      {{7, 100}, 64, false},     // 700 = 10 blocks + 60
      {{3, 333}, 32, true},      // odd: 999 = 31 blocks + 7, the last element alone in its byte
      {{256, 300}, 4096, true},  // 76800 = 18 blocks + 3072, threaded
      {{520, 512}, 64, true},    // 4160 blocks: 17 nested blocks, the last partial; threaded
      {{130, 513}, 128, false},  // 66690, partial, threaded, plain absmax
  };
  for (const auto& c : cases) {
    const int64_t n = c.shape[0] * c.shape[1];
    auto x = random_normal(size_t(n), 0.02f, 17);
    for (int64_t i = 0; i < std::min<int64_t>(n, c.blocksize); ++i) x[size_t(i)] = 0.0f;  // an all-zero block
    auto q = quantize_nf4(x.data(), n, c.blocksize, c.nested);
    q.shape = c.shape;
    const auto absmax = block_absmax(q);
    std::vector<float> expect(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      expect[size_t(i)] = kCodes[size_t(code_at(q.packed.data(), i))] * absmax[size_t(i / c.blocksize)];
    const std::string what = fmt::format("shape {}x{} blocksize {} nested {}", c.shape[0], c.shape[1], c.blocksize, c.nested);
    EXPECT_EQ(first_bit_difference(dequantize(q), expect), -1) << what;
    for (int threads : {1, 2, 3, 0}) {
      std::vector<float> f(size_t(n), std::nanf(""));
      dequantize_into(q, f.data(), threads);
      EXPECT_EQ(first_bit_difference(f, expect), -1) << what << " threads " << threads;
      std::vector<double> d(size_t(n), std::nan(""));
      dequantize_into(q, d.data(), threads);
      int64_t first_diff = -1;
      for (int64_t i = 0; i < n && first_diff < 0; ++i) {
        const double widened = expect[size_t(i)];
        if (std::memcmp(&d[size_t(i)], &widened, sizeof(double)) != 0) first_diff = i;
      }
      EXPECT_EQ(first_diff, -1) << what << " threads " << threads << " (double)";
    }
    // The range form, as the trainer's pool calls it: uneven pieces (one block, then 7, then the rest, the
    // last range running past the end, which is clamped), each element written once.
    std::vector<float> pieces(size_t(n), std::nanf(""));
    const int64_t nb = q.nblocks();
    dequantize_blocks_into(q, 0, 1, pieces.data());
    dequantize_blocks_into(q, 1, std::min<int64_t>(nb, 8), pieces.data());
    dequantize_blocks_into(q, std::min<int64_t>(nb, 8), nb + 5, pieces.data());
    EXPECT_EQ(first_bit_difference(pieces, expect), -1) << what << " in block ranges";
  }
  QuantizedTensor bad;  // validated like dequantize: no shape
  std::vector<float> out(4);
  EXPECT_THROW(dequantize_into(bad, out.data()), Error);
}

TEST(Nf4Quantize, RejectsBadBlocksizesEmptyAndNonFiniteInput) {
  const auto x = random_normal(256, 1.0f, 17);
  for (int bs : {0, -64, 16, 48, 100, 8192}) EXPECT_THROW(quantize_nf4(x.data(), 256, bs, false), Error) << bs;
  EXPECT_THROW(quantize_nf4(x.data(), 0, 64, false), Error);
  auto bad = x;
  bad[200] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(quantize_nf4(bad.data(), 256, 64, true), Error);
  bad[200] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(quantize_nf4(bad.data(), 256, 64, true), Error);
}

TEST(Nf4Quantize, NestedStatisticsFollowTheDefinition) {
  const auto x = random_normal(64 * 600, 0.02f, 19);  // 600 blocks: nested blocks 256, 256, 88
  const auto plain = quantize_nf4(x.data(), int64_t(x.size()), 64, false);
  const auto q = quantize_nf4(x.data(), int64_t(x.size()), 64, true);
  EXPECT_EQ(q.packed, plain.packed);
  ASSERT_EQ(q.nested_absmax.size(), 3u);
  EXPECT_EQ(bits(q.offset), bits(torch_cpu_mean(plain.absmax)));
  for (size_t b = 0; b < plain.absmax.size(); ++b) {
    const float centered = plain.absmax[b] - q.offset;
    EXPECT_EQ(q.qabsmax[b], quantize_dynamic(centered * (1.0f / q.nested_absmax[b / 256]), dynamic_map())) << b;
  }
  // Rebuilt absmax: code8 * nested absmax, then + offset, each rounded in float32.
  const auto rebuilt = block_absmax(q);
  for (size_t b = 0; b < rebuilt.size(); ++b) {
    const float scaled = dynamic_map()[q.qabsmax[b]] * q.nested_absmax[b / 256];
    EXPECT_EQ(bits(rebuilt[b]), bits(scaled + q.offset));
    EXPECT_NEAR(rebuilt[b], plain.absmax[b], 0.01 * plain.absmax[b] + 1e-6);
  }
}

// ------------------------------------------------------------------------------------------------
// The 8-bit dynamic map and its quantizer.

TEST(Nf4DynamicMap, MatchesBitsandbytesTable) {
  const auto table = cases_file().read_f32("dynamic_map");
  ASSERT_EQ(table.size(), 256u);
  for (size_t k = 0; k < 256; ++k) EXPECT_EQ(bits(table[k]), bits(dynamic_map()[k])) << k;
  EXPECT_EQ(dynamic_map()[127], 0.0f);
  EXPECT_EQ(dynamic_map()[255], 1.0f);
}

TEST(Nf4DynamicMap, CpuQuantizerOverwritesEntryZero) {
  // CPU-vs-CUDA difference 3: csrc/cpu_ops.cpp sets code[0] = -1.0 in bitsandbytes' cached map.
  const auto cpu = cases_file().read_f32("dynamic_map_after_cpu_quantize");
  EXPECT_EQ(cpu[0], -1.0f);
  EXPECT_NE(dynamic_map()[0], -1.0f);
  for (size_t k = 1; k < 256; ++k) EXPECT_EQ(bits(cpu[k]), bits(dynamic_map()[k])) << k;
}

TEST(Nf4DynamicMap, OnAMidpointTheEvenIndexWins) {
  const auto& code = dynamic_map();
  int ties = 0;
  for (int k = 0; k < 255; ++k) {
    const float mid = (code[size_t(k)] + code[size_t(k) + 1]) * 0.5f;
    EXPECT_EQ(quantize_dynamic(std::nextafter(mid, 2.0f), code), k + 1) << k;
    EXPECT_EQ(quantize_dynamic(std::nextafter(mid, -2.0f), code), k) << k;
    if (mid <= code[size_t(k)] || mid >= code[size_t(k) + 1]) continue;
    EXPECT_EQ(quantize_dynamic(mid, code), k % 2 == 0 ? k : k + 1) << "tie between " << k << " and " << k + 1;
    ++ties;
  }
  EXPECT_GT(ties, 250);
}

TEST(Nf4DynamicMap, PicksTheNearestEntry) {
  const auto& code = dynamic_map();
  std::mt19937 rng(23);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int i = 0; i < 100000; ++i) {
    const float x = i % 3 == 0 ? u(rng) * 1e-4f : u(rng);
    const int c = quantize_dynamic(x, code);
    // Nearest up to the rounding of the float midpoint the kernel compares with.
    const double slack = std::fabs(double(std::nextafter(x, 2.0f)) - double(x));
    for (int j = 0; j < 256; ++j)
      ASSERT_LE(std::fabs(double(x) - code[size_t(c)]), std::fabs(double(x) - code[size_t(j)]) + slack)
          << "x=" << x << " chose " << c << " but " << j << " is nearer";
  }
  EXPECT_EQ(quantize_dynamic(-1.0f, code), 0);
  EXPECT_EQ(quantize_dynamic(1.0f, code), 255);
  EXPECT_EQ(quantize_dynamic(0.0f, code), 127);
  EXPECT_EQ(quantize_dynamic(std::numeric_limits<float>::quiet_NaN(), code), 0);
}

TEST(Nf4DynamicMap, TieProbeDiffersFromTheCpuPathOnlyOnExactMidpoints) {
  // CPU-vs-CUDA difference 4: bitsandbytes' CPU lookup compares float distances and breaks ties low;
  // the CUDA search keeps its pivot. Input 0 is 1.0 (the block absmax), input k+1 the float midpoint
  // of entries k and k+1, so x * (1/absmax) == x.
  const auto in = cases_file().read_f32("tie8.input");
  const auto cpu = read_u8(cases_file(), "tie8.codes_bnb_cpu");
  ASSERT_EQ(in.size(), 256u);
  EXPECT_EQ(cases_file().read_f32("tie8.absmax")[0], 1.0f);
  EXPECT_EQ(quantize_dynamic(in[0], dynamic_map()), 255);
  int differing = 0;
  for (int k = 0; k < 255; ++k) {
    const float x = in[size_t(k) + 1];
    ASSERT_EQ(bits(x), bits((dynamic_map()[size_t(k)] + dynamic_map()[size_t(k) + 1]) * 0.5f));
    const int ours = quantize_dynamic(x, dynamic_map());
    EXPECT_TRUE(ours == k || ours == k + 1) << k;
    if (ours == cpu[size_t(k) + 1]) continue;
    ++differing;
    EXPECT_TRUE(cpu[size_t(k) + 1] == k || cpu[size_t(k) + 1] == k + 1) << k;
  }
  EXPECT_EQ(differing, 128);  // the count the fixture README records
}

// ------------------------------------------------------------------------------------------------
// torch's float32 mean (the double-quantization offset).

namespace {
// The probe vectors of scripts/make_nf4_fixtures.py (probe_vector): exact floats over ten decades.
std::vector<float> mean_probe(int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(uint64_t(i) * 2654435761ull + 12345ull);
    const float mag = std::ldexp(float(u >> 8), int(u & 31) - 16 - 24);
    v[size_t(i)] = ((u >> 5) & 1) ? -mag : mag;
  }
  return v;
}
}  // namespace

TEST(Nf4TorchMean, MatchesTorchForEveryCapabilityAndThreadCount) {
  const SafetensorsFile f(nf4_fixture("torch_mean.safetensors"));
  std::map<int64_t, std::vector<float>> vectors;
  int checked = 0;
  for (const auto& [name, info] : f.tensors()) {
    int64_t n = 0;
    char cap[16] = {};
    int threads = 0;
    ASSERT_EQ(std::sscanf(name.c_str(), "mean.n%ld.%15[a-z0-9].threads%d", &n, cap, &threads), 3) << name;
    auto& v = vectors[n];
    if (v.empty()) v = mean_probe(n);
    EXPECT_EQ(bits(torch_cpu_mean(v, threads)), bits(f.read_f32(name)[0])) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 26);
}

TEST(Nf4TorchMean, SummationOrderMatters) {
  // Why torch's order is reproduced: a running sum, or another thread count, gives another float.
  const auto v = mean_probe(70001);
  float running = 0.0f;
  for (float x : v) running += x;
  EXPECT_NE(bits(running / float(v.size())), bits(torch_cpu_mean(v)));
  EXPECT_NE(bits(torch_cpu_mean(v, 1)), bits(torch_cpu_mean(v, 2)));
  const auto small = mean_probe(1000);  // below torch's grain size threads change nothing
  EXPECT_EQ(bits(torch_cpu_mean(small, 1)), bits(torch_cpu_mean(small, 3)));
  EXPECT_TRUE(std::isnan(torch_cpu_mean(std::vector<float>{})));
}

// ------------------------------------------------------------------------------------------------
// bitsandbytes' fixtures, case by case.

TEST(Nf4Fixtures, CoverEveryBlocksizeAndBothModes) {
  std::set<int> sizes;
  std::set<bool> nested;
  for (const auto& c : fixture_cases()) {
    sizes.insert(c.blocksize);
    nested.insert(c.nested);
  }
  EXPECT_EQ(sizes, std::set<int>(kBlocksizes.begin(), kBlocksizes.end()));
  EXPECT_EQ(nested.size(), 2u);
}

TEST(Nf4Fixtures, EveryCaseMatchesBitsandbytesByteForByte) {
  const auto& f = cases_file();
  const auto cpu_map = f.read_f32("dynamic_map_after_cpu_quantize");
  int checked = 0;
  int64_t differing_in_code0_blocks = 0;
  for (const auto& c : fixture_cases()) {
    if (c.input == "midpoints_1x64") continue;  // its own test below
    SCOPED_TRACE(c.name);
    const auto x = f.read_f32("input." + c.input);
    const auto q = quantize_nf4(x.data(), int64_t(x.size()), c.blocksize, c.nested);
    // Odd n (difference 1): the fixture quantized x plus one 0.0, which is what the kernel does.
    EXPECT_EQ(q.packed, read_u8(f, c.name + ".packed"));
    if (c.nested) {
      EXPECT_EQ(q.qabsmax, read_u8(f, c.name + ".qabsmax"));
      EXPECT_EQ(first_bit_difference(q.nested_absmax, f.read_f32(c.name + ".nested_absmax")), -1);
      EXPECT_EQ(bits(q.offset), bits(f.read_f32(c.name + ".offset")[0]));
    } else {
      EXPECT_EQ(first_bit_difference(q.absmax, f.read_f32(c.name + ".absmax")), -1);
    }

    // Dequantization (over the flattened tensor, difference 6) equals bitsandbytes' exactly when given
    // the map bitsandbytes used (the CPU one, entry 0 = -1.0); with the CUDA map only blocks whose
    // absmax has 8-bit code 0 change (difference 3).
    const auto expect = f.read_f32(c.name + ".dequant");
    auto as_bnb = q;
    if (c.nested) as_bnb.nested_code = cpu_map;
    EXPECT_EQ(first_bit_difference(dequantize(as_bnb), expect), -1);
    const auto ours = dequantize(q);
    for (size_t i = 0; i < ours.size(); ++i) {
      const bool code0_block = c.nested && q.qabsmax[i / size_t(c.blocksize)] == 0;
      if (code0_block) {
        differing_in_code0_blocks += bits(ours[i]) != bits(expect[i]);
      } else {
        ASSERT_EQ(bits(ours[i]), bits(expect[i])) << "element " << i;
      }
    }
    ++checked;
  }
  EXPECT_EQ(checked, 24);
  EXPECT_EQ(differing_in_code0_blocks, 61 + 470 + 1814);  // the fixture README's table
}

TEST(Nf4Fixtures, MidpointProbeDiffersFromTheCpuPathAtFourThresholds) {
  // CPU-vs-CUDA difference 2: bitsandbytes' CPU path takes argmin |x - code| in float32; exactly on
  // these four kernel constants the float distances make the upper code nearer, while the kernel's
  // strict '>' gives the lower one. Everywhere else (including the neighbouring floats) they agree.
  const std::set<int> cpu_takes_upper = {1, 3, 4, 8};
  const auto& f = cases_file();
  const auto x = f.read_f32("input.midpoints_1x64");
  const auto bnb = read_u8(f, "midpoints_1x64.bs64.plain.packed");
  const auto q = quantize_nf4(x.data(), 64, 64, false);
  ASSERT_EQ(q.absmax[0], 1.0f);
  for (int k = 0; k < 15; ++k) {
    for (int s = 0; s < 3; ++s) {  // below, on, above threshold k
      const int64_t i = 1 + 3 * k + s;
      const float t = kThresholds[size_t(k)];
      ASSERT_EQ(bits(x[size_t(i)]), bits(s == 0 ? std::nextafter(t, -2.0f) : s == 1 ? t : std::nextafter(t, 2.0f)));
      const int ours = code_at(q.packed, i), cpu = code_at(bnb, i);
      EXPECT_EQ(ours, s == 2 ? k + 1 : k) << "threshold " << k << " position " << s;
      if (s == 1 && cpu_takes_upper.count(k))
        EXPECT_EQ(cpu, k + 1) << "threshold " << k;
      else
        EXPECT_EQ(cpu, ours) << "threshold " << k << " position " << s;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Serialized form.

TEST(Nf4Serialized, PythonFloatRepr) {
  const std::vector<std::pair<double, const char*>> cases = {
      {0.13149841129779816, "0.13149841129779816"}, {1e-05, "1e-05"}, {0.0001, "0.0001"}, {1e16, "1e+16"},
      {1234567890123456.0, "1234567890123456.0"}, {9999999999999998.0, "9999999999999998.0"},
      {1e15, "1000000000000000.0"}, {123.0, "123.0"}, {100.0, "100.0"}, {-0.0, "-0.0"}, {0.0, "0.0"},
      {2.5, "2.5"}, {1.5e-07, "1.5e-07"}, {-2e-05, "-2e-05"}, {0.1, "0.1"}, {1e22, "1e+22"},
      {5e-324, "5e-324"}, {1.7976931348623157e308, "1.7976931348623157e+308"}, {0.00012345, "0.00012345"},
      {double(0.1f), "0.10000000149011612"}, {0.00015000000000000001, "0.00015000000000000001"},
      {std::numeric_limits<double>::quiet_NaN(), "NaN"}, {std::numeric_limits<double>::infinity(), "Infinity"},
      {-std::numeric_limits<double>::infinity(), "-Infinity"}};
  for (const auto& [v, s] : cases) EXPECT_EQ(python_json_float(v), s);
}

namespace {
const char* kLinearW1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
const char* kLinearQ = "model.layers.0.self_attn.q_proj.weight";
const char* kLinearGate = "model.layers.0.block_sparse_moe.gate.weight";
}  // namespace

TEST(Nf4Serialized, ReadsWhatBitsandbytesWrote) {
  const SafetensorsFile sd(nf4_fixture("linear4bit_state_dict.safetensors"));
  const SafetensorsFile expected(nf4_fixture("linear4bit_expected.safetensors"));
  for (const char* w : {kLinearW1, kLinearQ, kLinearGate}) {
    SCOPED_TRACE(w);
    ASSERT_TRUE(has_nf4_quant_state(sd, w));
    const auto q = read_nf4(sd, w);
    const auto& want = expected.info(std::string(w) + ".dequantized");
    EXPECT_EQ(q.shape, want.shape);
    const auto d = dequantize(q);
    if (want.dtype == DType::BF16) {
      EXPECT_EQ(q.dtype, "bfloat16");
      const auto raw = expected.bytes(want);
      for (size_t i = 0; i < d.size(); ++i) {
        uint16_t b;
        std::memcpy(&b, raw.data() + 2 * i, 2);
        // float32 product, one rounding to bf16 (as CUDA; not the pure-torch kernel, difference 7)
        ASSERT_EQ(f32_to_bf16(d[i]), b) << "element " << i;
      }
    } else {
      EXPECT_EQ(q.dtype, "float32");
      EXPECT_EQ(first_bit_difference(d, expected.read_f32(std::string(w) + ".dequantized")), -1);
    }
  }
  EXPECT_TRUE(read_nf4(sd, kLinearW1).nested);
  EXPECT_FALSE(read_nf4(sd, kLinearGate).nested);
  EXPECT_EQ(read_nf4(sd, kLinearGate).blocksize, 128);
}

TEST(Nf4Serialized, WritesWhatBitsandbytesWrites) {
  // Quantizing the original weights and serializing gives bitsandbytes' tensors byte for byte (JSON
  // included), except entry 0 of nested_quant_map, which the CPU path overwrote (difference 3).
  const SafetensorsFile sd(nf4_fixture("linear4bit_state_dict.safetensors"));
  const SafetensorsFile expected(nf4_fixture("linear4bit_expected.safetensors"));
  for (const char* w : {kLinearW1, kLinearQ, kLinearGate}) {
    SCOPED_TRACE(w);
    const auto ref = read_nf4(sd, w);
    const auto x = expected.read_f32(std::string(w) + ".original");
    auto q = quantize_nf4(x.data(), int64_t(x.size()), ref.blocksize, ref.nested);
    q.shape = expected.info(std::string(w) + ".original").shape;
    q.dtype = ref.dtype;
    const auto tensors = to_safetensors(q, w);
    size_t in_file = 0;
    for (const auto& [name, info] : sd.tensors()) in_file += name.rfind(w, 0) == 0;
    EXPECT_EQ(tensors.size(), in_file);
    for (const auto& t : tensors) {
      SCOPED_TRACE(t.name);
      ASSERT_TRUE(sd.contains(t.name));
      const auto& info = sd.info(t.name);
      EXPECT_EQ(t.dtype, info.dtype);
      EXPECT_EQ(t.shape, info.shape);
      const auto raw = sd.bytes(info);
      ASSERT_EQ(t.data.size(), raw.size());
      const bool is_map = t.name.ends_with(".nested_quant_map");
      const size_t skip = is_map ? 4 : 0;
      EXPECT_EQ(std::memcmp(t.data.data() + skip, raw.data() + skip, raw.size() - skip), 0);
      if (is_map) {
        float cpu0, ours0;
        std::memcpy(&cpu0, raw.data(), 4);
        std::memcpy(&ours0, t.data.data(), 4);
        EXPECT_EQ(cpu0, -1.0f);
        EXPECT_EQ(ours0, dynamic_map()[0]);
      }
      if (t.name.ends_with(kQuantStateSuffix)) {
        EXPECT_EQ(std::string(reinterpret_cast<const char*>(raw.data()), raw.size()), quant_state_json(q));
      }
    }
  }
}

TEST(Nf4Serialized, RoundTripThroughSafetensors) {
  TempDir dir;
  for (bool nested : {true, false}) {
    for (int64_t cols : {64, 33}) {  // 48 x 33 = 1584 elements: partial block; 7 x 33 below: odd n
      const int64_t rows = cols == 33 ? 7 : 48;
      const auto x = random_normal(size_t(rows * cols), 0.03f, uint32_t(cols + nested));
      auto q = quantize_nf4(x.data(), rows * cols, 64, nested);
      q.shape = {rows, cols};
      q.dtype = "bfloat16";
      const std::string path = dir.file(fmt::format("rt_{}_{}.safetensors", nested, cols));
      write_safetensors(path, to_safetensors(q, "layer.weight"), {{"format", "pt"}});
      const SafetensorsFile f(path);
      const auto back = read_nf4(f, "layer.weight");
      EXPECT_EQ(back.shape, q.shape);
      EXPECT_EQ(back.dtype, "bfloat16");
      EXPECT_EQ(back.blocksize, 64);
      EXPECT_EQ(back.nested, nested);
      EXPECT_EQ(back.packed, q.packed);
      EXPECT_EQ(back.absmax, q.absmax);
      EXPECT_EQ(back.qabsmax, q.qabsmax);
      EXPECT_EQ(back.nested_absmax, q.nested_absmax);
      EXPECT_EQ(back.nested_code, q.nested_code);
      EXPECT_EQ(bits(back.offset), bits(q.offset));
      EXPECT_EQ(first_bit_difference(dequantize(back), dequantize(q)), -1);
      EXPECT_EQ(f.info("layer.weight").shape, (std::vector<int64_t>{(rows * cols + 1) / 2, 1}));
      EXPECT_EQ(f.info("layer.weight.absmax").dtype, nested ? DType::U8 : DType::F32);
      EXPECT_EQ(f.contains("layer.weight.nested_absmax"), nested);
    }
  }
}

TEST(Nf4Serialized, ReadsAWeightSplitAcrossShards) {
  TempDir dir;
  const auto x = random_normal(64 * 10, 0.02f, 29);
  const auto q = quantize_nf4(x.data(), 640, 64, true);
  auto tensors = to_safetensors(q, "m.weight");
  std::vector<TensorToWrite> a(tensors.begin(), tensors.begin() + 2), b(tensors.begin() + 2, tensors.end());
  write_safetensors(dir.file("a.safetensors"), a);
  write_safetensors(dir.file("b.safetensors"), b);
  const SafetensorsFile fa(dir.file("a.safetensors")), fb(dir.file("b.safetensors"));
  const TensorLookup find = [&](const std::string& name) -> const SafetensorsFile* {
    return fa.contains(name) ? &fa : fb.contains(name) ? &fb : nullptr;
  };
  EXPECT_EQ(read_nf4(find, "m.weight").qabsmax, q.qabsmax);
  EXPECT_THROW(read_nf4(fa, "m.weight"), Error);
}

namespace {

// Writes the serialized form of a small nested tensor with one tensor changed, and returns the
// message read_nf4 throws (or "" when it does not).
template <typename Mutate>
std::string read_error_after(const TempDir& dir, const std::string& file, Mutate mutate) {
  const auto x = random_normal(640, 0.02f, 31);
  auto q = quantize_nf4(x.data(), 640, 64, true);
  q.shape = {10, 64};
  auto tensors = to_safetensors(q, "m.weight");
  mutate(tensors);
  const std::string path = dir.file(file);
  write_safetensors(path, tensors);
  try {
    const SafetensorsFile f(path);
    read_nf4(f, "m.weight");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TensorToWrite& tensor(std::vector<TensorToWrite>& ts, const std::string& name) {
  for (auto& t : ts)
    if (t.name == name) return t;
  throw std::runtime_error("no tensor " + name);
}

void set_json(std::vector<TensorToWrite>& ts, const std::string& json) {
  auto& t = tensor(ts, std::string("m.weight") + kQuantStateSuffix);
  t.shape = {int64_t(json.size())};
  t.data.resize(json.size());
  std::memcpy(t.data.data(), json.data(), json.size());
}

std::string good_json() {
  return R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [10, 64], )"
         R"("nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5})";
}

}  // namespace

TEST(Nf4Serialized, BadInputsAreClearErrors) {
  TempDir dir;
  struct Bad {
    const char* what;
    std::function<void(std::vector<TensorToWrite>&)> mutate;
    const char* tensor_in_message;
  };
  const std::vector<Bad> bads = {
      {"absmax as F32 in a nested state",
       [](auto& ts) {
         auto& t = tensor(ts, "m.weight.absmax");
         t.dtype = DType::F32;
         t.data.resize(t.data.size() * 4);
       },
       "m.weight.absmax"},
      {"packed weight of the wrong shape", [](auto& ts) { tensor(ts, "m.weight").shape = {160, 2}; }, "m.weight"},
      {"packed weight as I8", [](auto& ts) { tensor(ts, "m.weight").dtype = DType::I8; }, "m.weight"},
      {"too few absmax codes",
       [](auto& ts) {
         auto& t = tensor(ts, "m.weight.absmax");
         t.shape = {9};
         t.data.resize(9);
       },
       "m.weight.absmax"},
      {"nested map of 255 entries",
       [](auto& ts) {
         auto& t = tensor(ts, "m.weight.nested_quant_map");
         t.shape = {255};
         t.data.resize(255 * 4);
       },
       "m.weight.nested_quant_map"},
      {"quant_map that is not NF4",
       [](auto& ts) {
         auto& t = tensor(ts, "m.weight.quant_map");
         const float fp4_like = 0.25f;
         std::memcpy(t.data.data() + 4 * 3, &fp4_like, 4);
       },
       "m.weight.quant_map"},
      {"missing nested_absmax",
       [](auto& ts) {
         ts.erase(std::find_if(ts.begin(), ts.end(), [](auto& t) { return t.name == "m.weight.nested_absmax"; }));
       },
       "m.weight.nested_absmax"},
      {"corrupt JSON", [](auto& ts) { set_json(ts, R"({"quant_type": "nf4", "blocksize": 64,)"); }, kQuantStateSuffix},
      {"JSON not an object", [](auto& ts) { set_json(ts, "[1, 2]"); }, kQuantStateSuffix},
      {"fp4 quant_type",
       [](auto& ts) {
         auto j = good_json();
         j.replace(j.find("nf4"), 3, "fp4");
         set_json(ts, j);
       },
       kQuantStateSuffix},
      {"blocksize 48",
       [](auto& ts) {
         auto j = good_json();
         j.replace(j.find("64"), 2, "48");
         set_json(ts, j);
       },
       kQuantStateSuffix},
      {"unknown dtype",
       [](auto& ts) {
         auto j = good_json();
         j.replace(j.find("float32"), 7, "int8");
         set_json(ts, j);
       },
       kQuantStateSuffix},
      {"missing shape",
       [](auto& ts) {
         auto j = good_json();
         j.replace(j.find(R"("shape": [10, 64], )"), 19, "");
         set_json(ts, j);
       },
       kQuantStateSuffix},
      {"shape with a string",
       [](auto& ts) {
         auto j = good_json();
         j.replace(j.find("[10, 64]"), 8, R"([10, "64"])");
         set_json(ts, j);
       },
       kQuantStateSuffix},
      {"JSON shape disagrees with the packed size",
       [](auto& ts) {
         auto j = good_json();
         j.replace(j.find("[10, 64]"), 8, "[11, 64]");
         set_json(ts, j);
       },
       "m.weight"},
      {"nested_offset not a number",
       [](auto& ts) {
         auto j = good_json();
         j.replace(j.find("0.5"), 3, R"("0.5")");
         set_json(ts, j);
       },
       kQuantStateSuffix},
      // Statistics that make a block's absmax inf (code x nested absmax + offset in float32): before, read
      // without a word, and every product through the weight was inf or NaN.
      {"nested_offset past float32",
       [](auto& ts) {
         auto j = good_json();
         j.replace(j.find("0.5"), 3, "1e39");
         set_json(ts, j);
       },
       "nested offset inf is not finite"},
      {"nested code and nested absmax whose product overflows",
       [](auto& ts) {
         const float big = 3e38f;
         for (const char* name : {"m.weight.nested_quant_map", "m.weight.nested_absmax"}) {
           auto& t = tensor(ts, name);
           std::memcpy(t.data.data(), &big, 4);
         }
       },
       "past float32's range"},
      {"quant state as a 2-D F32 tensor",
       [](auto& ts) {
         auto& t = tensor(ts, std::string("m.weight") + kQuantStateSuffix);
         t.dtype = DType::F32;
         t.shape = {1, int64_t(t.data.size() / 4)};
         t.data.resize(t.data.size() / 4 * 4);
       },
       kQuantStateSuffix},
  };
  EXPECT_EQ(read_error_after(dir, "good.safetensors", [](auto&) {}), "");
  int i = 0;
  for (const auto& bad : bads) {
    const std::string file = fmt::format("bad{}.safetensors", i++);
    const std::string msg = read_error_after(dir, file, bad.mutate);
    EXPECT_NE(msg, "") << bad.what << ": no error";
    EXPECT_NE(msg.find(file), std::string::npos) << bad.what << ": " << msg;
    EXPECT_NE(msg.find(bad.tensor_in_message), std::string::npos) << bad.what << ": " << msg;
  }
  // Not an NF4 weight at all.
  const SafetensorsFile f(nf4_fixture("linear4bit_expected.safetensors"));
  EXPECT_FALSE(has_nf4_quant_state(f, std::string(kLinearW1) + ".original"));
  EXPECT_THROW(read_nf4(f, std::string(kLinearW1) + ".original"), Error);
}

TEST(Nf4Serialized, RefusesToWriteInconsistentTensors) {
  const auto x = random_normal(640, 0.02f, 37);
  auto q = quantize_nf4(x.data(), 640, 64, true);
  auto wrong_shape = q;
  wrong_shape.shape = {10, 65};
  EXPECT_THROW(to_safetensors(wrong_shape, "w"), Error);
  auto wrong_dtype = q;
  wrong_dtype.dtype = "int8";
  EXPECT_THROW(to_safetensors(wrong_dtype, "w"), Error);
  auto short_codes = q;
  short_codes.qabsmax.pop_back();
  EXPECT_THROW(dequantize(short_codes), Error);
  EXPECT_EQ(quant_state_json(q).rfind(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [640], )"
                                      R"("nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": )",
                                      0),
            0u);
}
