#pragma once
// safetensors dtypes and conversion of the float ones to FP32.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace moelab {

// Every dtype the safetensors format defines (huggingface/safetensors Dtype enum), so a valid file
// with an exotic tensor still parses; only the float ones below convert to FP32.
enum class DType {
  BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64
};

std::optional<DType> parse_dtype(std::string_view name);
std::string_view dtype_name(DType t);
int dtype_bits(DType t);           // bits per element (4, 6, 8, 16, 32, 64)
bool dtype_is_float_convertible(DType t);  // F32, F16, BF16, F64

float bf16_to_f32(uint16_t bits);
float f16_to_f32(uint16_t bits);
uint16_t f32_to_bf16(float value);  // round to nearest even, as torch does
// IEEE binary16: round to nearest, ties to even; beyond the half range gives infinity; NaN stays NaN.
uint16_t f32_to_f16(float value);

// Converts `count` elements starting at `src` (any alignment) to FP32.
void convert_to_f32(DType t, const std::byte* src, size_t count, float* dst);

// Index of the first NaN or infinity among `count` floats, or -1 when all are finite.
int64_t first_non_finite(const float* values, size_t count);

}  // namespace moelab
