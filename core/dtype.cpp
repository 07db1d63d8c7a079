#include "core/dtype.hpp"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <utility>

namespace moelab {
namespace {

struct DTypeInfo {
  DType type;
  std::string_view name;
  int bits;
};

constexpr std::array<DTypeInfo, 22> kDTypes{{
    {DType::BOOL, "BOOL", 8},        {DType::F4, "F4", 4},
    {DType::F6_E2M3, "F6_E2M3", 6},  {DType::F6_E3M2, "F6_E3M2", 6},
    {DType::U8, "U8", 8},            {DType::I8, "I8", 8},
    {DType::F8_E5M2, "F8_E5M2", 8},  {DType::F8_E4M3, "F8_E4M3", 8},
    {DType::F8_E8M0, "F8_E8M0", 8},  {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {DType::I16, "I16", 16},         {DType::U16, "U16", 16},
    {DType::F16, "F16", 16},         {DType::BF16, "BF16", 16},
    {DType::I32, "I32", 32},         {DType::U32, "U32", 32},
    {DType::F32, "F32", 32},         {DType::C64, "C64", 64},
    {DType::F64, "F64", 64},         {DType::I64, "I64", 64},
    {DType::U64, "U64", 64},
}};

const DTypeInfo& info(DType t) {
  for (const auto& i : kDTypes)
    if (i.type == t) return i;
  throw std::logic_error("unknown DType");
}

}  // namespace

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& i : kDTypes)
    if (i.name == name) return i.type;
  return std::nullopt;
}

std::string_view dtype_name(DType t) { return info(t).name; }
int dtype_bits(DType t) { return info(t).bits; }

bool dtype_is_float_convertible(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

float bf16_to_f32(uint16_t bits) { return std::bit_cast<float>(uint32_t(bits) << 16); }

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  if (exp == 0) {
    // zero or subnormal: value = mant * 2^-24, exact in float
    const float v = std::ldexp(float(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf / nan
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t f32_to_bf16(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fff + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

uint16_t f32_to_f16(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
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
  const float shifted = std::bit_cast<float>(abs) + 0.5f;
  return sign | uint16_t(std::bit_cast<uint32_t>(shifted) - 0x3f000000);
}

void convert_to_f32(DType t, const std::byte* src, size_t count, float* dst) {
  // An empty tensor may come with null pointers, which memcpy must never see (UBSan found it on an
  // empty tensor: SafetensorsRead.EmptyAndScalarTensorsAreAccepted under scripts/sanitize.sh).
  if (count == 0) return;
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case DType::BF16:
    case DType::F16: {
      const bool bf = t == DType::BF16;
      for (size_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = bf ? bf16_to_f32(h) : f16_to_f32(h);
      }
      return;
    }
    case DType::F64:
      for (size_t i = 0; i < count; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        dst[i] = float(d);
      }
      return;
    default:
      throw std::invalid_argument("convert_to_f32: dtype " + std::string(dtype_name(t)) +
                                  " is not a float type");
  }
}

int64_t first_non_finite(const float* values, size_t count) {
  // Branch-free over the chunk (an exponent of all ones is NaN or infinity), so it vectorizes; the
  // position is looked for only when something was found.
  uint32_t any = 0;
  for (size_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, values + i, 4);
    any |= uint32_t((bits & 0x7f800000u) == 0x7f800000u);
  }
  if (!any) return -1;
  for (size_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, values + i, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u) return int64_t(i);
  }
  return -1;
}

}  // namespace moelab
