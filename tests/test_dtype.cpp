#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.hpp"

using namespace moelab;

namespace {

// Independent decoding of an IEEE binary16 bit pattern, from its fields, in double precision.
double f16_reference(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0) v = std::ldexp(double(mant), -24);  // subnormal: mant * 2^-14 * 2^-10
  else if (exp == 31) v = mant ? std::numeric_limits<double>::quiet_NaN() : HUGE_VAL;
  else v = std::ldexp(double(1024 + mant), exp - 15 - 10);
  return sign ? -v : v;
}

// Independent decoding of a bfloat16 bit pattern (8 exponent bits, 7 mantissa bits).
// `unbounded_exponent` decodes 0x7F80 as 2^128 instead of inf (for rounding-distance computations).
double bf16_reference(uint16_t b, bool unbounded_exponent = false) {
  const int sign = b >> 15, exp = (b >> 7) & 0xff, mant = b & 0x7f;
  double v;
  if (exp == 0) v = std::ldexp(double(mant), -126 - 7);
  else if (exp == 255 && !(unbounded_exponent && mant == 0))
    v = mant ? std::numeric_limits<double>::quiet_NaN() : HUGE_VAL;
  else v = std::ldexp(double(128 + mant), exp - 127 - 7);
  return sign ? -v : v;
}

// Round-to-nearest-even of a finite float to bfloat16, decided by exact distances in double.
uint16_t f32_to_bf16_reference(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint16_t lo = uint16_t(bits >> 16);  // truncation (toward zero)
  const uint16_t hi = uint16_t(lo + 1);      // next bfloat16 away from zero
  const double ax = std::fabs(double(x));
  const double d_lo = ax - std::fabs(bf16_reference(lo, true));
  const double d_hi = std::fabs(bf16_reference(hi, true)) - ax;
  if (d_lo < d_hi) return lo;
  if (d_hi < d_lo) return hi;
  return (lo & 1) == 0 ? lo : hi;
}

struct DTypeRow {
  const char* name;
  DType type;
  int bits;
};

// From the safetensors Dtype enum (see /work/shared/notes/formats.md section 2).
const std::vector<DTypeRow> kAllDTypes = {
    {"BOOL", DType::BOOL, 8},           {"F4", DType::F4, 4},
    {"F6_E2M3", DType::F6_E2M3, 6},     {"F6_E3M2", DType::F6_E3M2, 6},
    {"U8", DType::U8, 8},               {"I8", DType::I8, 8},
    {"F8_E5M2", DType::F8_E5M2, 8},     {"F8_E4M3", DType::F8_E4M3, 8},
    {"F8_E8M0", DType::F8_E8M0, 8},     {"F8_E4M3FNUZ", DType::F8_E4M3FNUZ, 8},
    {"F8_E5M2FNUZ", DType::F8_E5M2FNUZ, 8},
    {"I16", DType::I16, 16},            {"U16", DType::U16, 16},
    {"F16", DType::F16, 16},            {"BF16", DType::BF16, 16},
    {"I32", DType::I32, 32},            {"U32", DType::U32, 32},
    {"F32", DType::F32, 32},            {"C64", DType::C64, 64},
    {"F64", DType::F64, 64},            {"I64", DType::I64, 64},
    {"U64", DType::U64, 64},
};

uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }

}  // namespace

// ---------------------------------------------------------------- F16 -> F32

TEST(DtypeF16, KnownBitPatterns) {
  struct Row {
    uint16_t bits;
    float value;
  };
  const Row rows[] = {
      {0x0000, 0.0f},
      {0x3C00, 1.0f},
      {0xBC00, -1.0f},
      {0x4000, 2.0f},
      {0xC000, -2.0f},
      {0x3800, 0.5f},
      {0x3C01, 1.0009765625f},             // 1 + 2^-10
      {0x3555, 0.333251953125f},           // nearest f16 to 1/3
      {0x7BFF, 65504.0f},                  // max finite
      {0xFBFF, -65504.0f},
      {0x0400, 6.103515625e-05f},          // smallest normal 2^-14
      {0x03FF, 6.0975551605224609375e-05f},  // largest subnormal 1023 * 2^-24
      {0x0001, 5.9604644775390625e-08f},   // smallest subnormal 2^-24
      {0x8001, -5.9604644775390625e-08f},
      {0x0200, 3.0517578125e-05f},         // 2^-15, a subnormal
      {0x5640, 100.0f},
  };
  for (const auto& r : rows) {
    SCOPED_TRACE(testing::Message() << "bits 0x" << std::hex << r.bits);
    EXPECT_EQ(bits_of(f16_to_f32(r.bits)), bits_of(r.value));
  }
}

TEST(DtypeF16, SignedZeroInfinityAndNaN) {
  EXPECT_EQ(bits_of(f16_to_f32(0x0000)), 0x00000000u);
  EXPECT_EQ(bits_of(f16_to_f32(0x8000)), 0x80000000u);  // -0 keeps its sign
  EXPECT_TRUE(std::signbit(f16_to_f32(0x8000)));
  EXPECT_EQ(f16_to_f32(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7E00)));  // quiet NaN
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7C01)));  // signalling NaN must not become inf
  EXPECT_TRUE(std::isnan(f16_to_f32(0xFE00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7FFF)));
}

// Every one of the 65536 patterns against the field-by-field decoding.
TEST(DtypeF16, ExhaustiveAgainstFieldDecoding) {
  int mismatches = 0;
  for (uint32_t i = 0; i <= 0xFFFF; ++i) {
    const uint16_t h = uint16_t(i);
    const float got = f16_to_f32(h);
    const double want = f16_reference(h);
    bool ok;
    if (std::isnan(want)) ok = std::isnan(got);
    else ok = double(got) == want && std::signbit(got) == std::signbit(want);
    if (!ok && ++mismatches <= 10)
      ADD_FAILURE() << "f16 0x" << std::hex << i << std::dec << ": got " << got << " want " << want;
  }
  EXPECT_EQ(mismatches, 0);
}

// ---------------------------------------------------------------- F32 -> F16
// (the one float16 converter: checkpoints and the router logits of routing traces both use it)

TEST(DtypeF32ToF16, EveryHalfSurvivesTheRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << h;
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), uint16_t(h)) << "half bits " << h << " value " << f;
  }
}

// Between every two neighbouring halves (subnormals, normals, and 65504 -> infinity): the midpoint goes
// to the one with the even mantissa, anything off the midpoint to the nearer one. Midpoints of halves
// are exact in float (12 significant bits).
TEST(DtypeF32ToF16, RoundsToNearestEvenEverywhere) {
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const uint16_t lo = uint16_t(h), hi = uint16_t(h + 1);  // hi may be 0x7c00 = infinity
    const double a = f16_reference(lo);
    const double b = hi == 0x7c00 ? 65536.0 : f16_reference(hi);  // where infinity "would" be
    const float mid = float((a + b) / 2);
    ASSERT_EQ(double(mid), (a + b) / 2);
    const uint16_t even = (lo & 1) == 0 ? lo : hi;
    ASSERT_EQ(f32_to_f16(mid), even) << "midpoint of " << a << " and " << b;
    ASSERT_EQ(f32_to_f16(std::nextafter(mid, 0.0f)), lo) << "just below the midpoint of " << a << " and " << b;
    ASSERT_EQ(f32_to_f16(std::nextafter(mid, 1e9f)), hi) << "just above the midpoint of " << a << " and " << b;
    ASSERT_EQ(f32_to_f16(-mid), uint16_t(even | 0x8000)) << "negative midpoint";
  }
  EXPECT_EQ(f32_to_f16(1e9f), 0x7c00);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(f32_to_f16(1e-9f), 0x0000);  // below half the smallest subnormal
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(-std::numeric_limits<float>::quiet_NaN()))));
}

// ---------------------------------------------------------------- BF16 -> F32

TEST(DtypeBF16, KnownBitPatterns) {
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xBF80), -1.0f);
  EXPECT_EQ(bf16_to_f32(0xC040), -3.0f);
  EXPECT_EQ(bf16_to_f32(0x4049), 3.140625f);
  EXPECT_EQ(bf16_to_f32(0x3F00), 0.5f);
  EXPECT_EQ(bf16_to_f32(0x7F7F), std::ldexp(255.0f, 120));  // max finite (2 - 2^-7) * 2^127
  EXPECT_EQ(bf16_to_f32(0x0080), std::ldexp(1.0f, -126));  // smallest normal
  EXPECT_EQ(bf16_to_f32(0x0001), std::ldexp(1.0f, -133));  // smallest subnormal
  EXPECT_EQ(bits_of(bf16_to_f32(0x0000)), 0x00000000u);
  EXPECT_EQ(bits_of(bf16_to_f32(0x8000)), 0x80000000u);
  EXPECT_EQ(bf16_to_f32(0x7F80), std::numeric_limits<float>::infinity());
  EXPECT_EQ(bf16_to_f32(0xFF80), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(bf16_to_f32(0x7FC0)));
  EXPECT_TRUE(std::isnan(bf16_to_f32(0x7F81)));
}

TEST(DtypeBF16, ExhaustiveAgainstFieldDecoding) {
  int mismatches = 0;
  for (uint32_t i = 0; i <= 0xFFFF; ++i) {
    const uint16_t b = uint16_t(i);
    const float got = bf16_to_f32(b);
    const double want = bf16_reference(b);
    bool ok;
    if (std::isnan(want)) ok = std::isnan(got);
    else ok = double(got) == want && std::signbit(got) == std::signbit(want);
    if (!ok && ++mismatches <= 10)
      ADD_FAILURE() << "bf16 0x" << std::hex << i << std::dec << ": got " << got << " want " << want;
  }
  EXPECT_EQ(mismatches, 0);
}

// ---------------------------------------------------------------- F32 -> BF16

TEST(DtypeF32ToBF16, ExactValuesAreKept) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(-3.0f), 0xC040);
  EXPECT_EQ(f32_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(f32_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  // Every non-NaN bfloat16 survives bf16 -> f32 -> bf16 unchanged.
  for (uint32_t i = 0; i <= 0xFFFF; ++i) {
    const uint16_t b = uint16_t(i);
    if (std::isnan(bf16_to_f32(b))) continue;
    ASSERT_EQ(f32_to_bf16(bf16_to_f32(b)), b) << "bf16 0x" << std::hex << i;
  }
}

TEST(DtypeF32ToBF16, RoundsToNearestEvenOnTies) {
  const float ulp = std::ldexp(1.0f, -7);  // bf16 spacing in [1, 2)
  const float half = ulp / 2;
  // 1 + half ulp: tie between 0x3F80 (even) and 0x3F81 -> 0x3F80.
  EXPECT_EQ(f32_to_bf16(1.0f + half), 0x3F80);
  // 1 + 3 half ulps: tie between 0x3F81 and 0x3F82 (even) -> 0x3F82.
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * half), 0x3F82);
  EXPECT_EQ(f32_to_bf16(-(1.0f + half)), 0xBF80);
  EXPECT_EQ(f32_to_bf16(-(1.0f + 3 * half)), 0xBF82);
  // Just off the tie: nearest wins.
  EXPECT_EQ(f32_to_bf16(std::nextafter(1.0f + half, 2.0f)), 0x3F81);
  EXPECT_EQ(f32_to_bf16(std::nextafter(1.0f + half, 0.0f)), 0x3F80);
  // Known values.
  EXPECT_EQ(f32_to_bf16(3.14159265f), 0x4049);  // 0x40490FDB truncates
  EXPECT_EQ(f32_to_bf16(0.1f), 0x3DCD);         // 0x3DCCCCCD rounds up
  // Rounding carries into the exponent.
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3FFFFFFFu)), 0x4000);
  // Overflow rounds to infinity as IEEE (and torch) do.
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(f32_to_bf16(-std::numeric_limits<float>::max()), 0xFF80);
  // Subnormals.
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x00000001u)), 0x0000);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x00008000u)), 0x0000);  // tie, 0 is even
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x00018000u)), 0x0002);  // tie, up to even
}

// For every finite bfloat16 `lo`: the float exactly halfway to the next one rounds to the even of the
// two, and one float below / above the tie rounds down / up.
TEST(DtypeF32ToBF16, ExhaustiveTies) {
  int mismatches = 0;
  for (uint32_t i = 0; i <= 0xFFFF; ++i) {
    const uint16_t lo = uint16_t(i);
    if (((lo >> 7) & 0xff) == 0xff) continue;  // inf / NaN
    const uint16_t hi = uint16_t(lo + 1);
    const uint32_t base = uint32_t(lo) << 16;
    const uint16_t tie = f32_to_bf16(std::bit_cast<float>(base | 0x8000u));
    const uint16_t below = f32_to_bf16(std::bit_cast<float>(base | 0x7FFFu));
    const uint16_t above = f32_to_bf16(std::bit_cast<float>(base | 0x8001u));
    const uint16_t even = (lo & 1) == 0 ? lo : hi;
    if ((tie != even || below != lo || above != hi) && ++mismatches <= 10)
      ADD_FAILURE() << "bf16 0x" << std::hex << lo << ": tie 0x" << tie << " below 0x" << below << " above 0x"
                    << above;
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(DtypeF32ToBF16, RandomFloatsMatchDistanceReference) {
  std::mt19937 rng(12345);
  int mismatches = 0;
  for (int n = 0; n < 1'000'000; ++n) {
    const float x = std::bit_cast<float>(uint32_t(rng()));
    if (std::isnan(x) || std::isinf(x)) continue;
    const uint16_t got = f32_to_bf16(x), want = f32_to_bf16_reference(x);
    if (got != want && ++mismatches <= 10)
      ADD_FAILURE() << "x bits 0x" << std::hex << bits_of(x) << ": got 0x" << got << " want 0x" << want;
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(DtypeF32ToBF16, NaNStaysNaN) {
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload lives only in the low 16 bits would truncate to inf if not handled.
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::bit_cast<float>(0x7F800001u)))));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::bit_cast<float>(0xFF800001u)))));
  // A NaN with all-ones low half must not carry into the sign/exponent.
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::bit_cast<float>(0x7FFFFFFFu)))));
}

// ---------------------------------------------------------------- names and sizes

TEST(DtypeNames, ParseNameAndBitsForEveryDtype) {
  ASSERT_EQ(kAllDTypes.size(), 22u);
  for (const auto& row : kAllDTypes) {
    SCOPED_TRACE(row.name);
    const auto parsed = parse_dtype(row.name);
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, row.type);
    EXPECT_EQ(dtype_name(row.type), row.name);
    EXPECT_EQ(dtype_bits(row.type), row.bits);
  }
}

TEST(DtypeNames, UnknownNamesAreRejected) {
  for (const char* name : {"", "f32", "F32 ", " F32", "FP32", "float32", "BFLOAT16", "bf16", "F8", "F8_E4M3FN",
                           "Q4_0", "I128", "NF4", "__metadata__"}) {
    EXPECT_FALSE(parse_dtype(name).has_value()) << "'" << name << "'";
  }
}

TEST(DtypeNames, OnlyFloatTypesAreConvertible) {
  for (const auto& row : kAllDTypes) {
    const bool want = row.type == DType::F32 || row.type == DType::F16 || row.type == DType::BF16 ||
                      row.type == DType::F64;
    EXPECT_EQ(dtype_is_float_convertible(row.type), want) << row.name;
  }
}

// ---------------------------------------------------------------- convert_to_f32

TEST(DtypeConvert, FloatTypesFromUnalignedBuffers) {
  // One byte of offset so the source is misaligned for every element type.
  std::vector<std::byte> buf(1 + 8 * 4);
  std::byte* src = buf.data() + 1;
  float out[4];

  const uint16_t f16[] = {0x3C00, 0xC000, 0x7BFF, 0x0001};
  std::memcpy(src, f16, sizeof f16);
  convert_to_f32(DType::F16, src, 4, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 65504.0f);
  EXPECT_EQ(out[3], std::ldexp(1.0f, -24));

  const uint16_t bf16[] = {0x3F80, 0xC040, 0x4049, 0x8000};
  std::memcpy(src, bf16, sizeof bf16);
  convert_to_f32(DType::BF16, src, 4, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -3.0f);
  EXPECT_EQ(out[2], 3.140625f);
  EXPECT_EQ(bits_of(out[3]), 0x80000000u);

  const float f32[] = {1.5f, -0.25f, 1e30f, std::ldexp(1.0f, -140)};
  std::memcpy(src, f32, sizeof f32);
  convert_to_f32(DType::F32, src, 4, out);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(bits_of(out[i]), bits_of(f32[i]));

  const double f64[] = {1.5, -2.25, 0.1, 1e300};
  std::memcpy(src, f64, sizeof f64);
  convert_to_f32(DType::F64, src, 4, out);
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -2.25f);
  EXPECT_EQ(out[2], 0.1f);
  EXPECT_EQ(out[3], std::numeric_limits<float>::infinity());
}

TEST(DtypeConvert, ZeroCountWritesNothing) {
  float out[1] = {42.0f};
  const std::byte src[2] = {};
  convert_to_f32(DType::BF16, src, 0, out);
  EXPECT_EQ(out[0], 42.0f);
}

TEST(DtypeConvert, NonFloatTypesThrow) {
  std::vector<std::byte> src(64);
  float out[8];
  for (const auto& row : kAllDTypes) {
    if (dtype_is_float_convertible(row.type)) continue;
    EXPECT_ANY_THROW(convert_to_f32(row.type, src.data(), 1, out)) << row.name;
  }
}
