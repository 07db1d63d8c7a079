#pragma once
// The 16 NF4 code values, index = 4-bit code (bitsandbytes get_4bit_type("nf4"), kernels.cu
// nf4_dequantization_lut), as float32: the one definition in moelab. nf4::kCodes, the cpu-nf4 kernels'
// kNf4Codes and the cuda-nf4 constant table are this array; tables derived from it (the int8 codes of
// the integer kernels) are tested against it in tests/test_nf4.cpp (Nf4Codes.*).
//
// A plain C++17 header without includes so nvcc's device code can read it too.
namespace moelab::nf4 {

inline constexpr float kCodeValues[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Element i's 4-bit code in a packed NF4 tensor (bitsandbytes' packing: byte i / 2, the high nibble for
// even i): the one definition of the nibble order, for the CPU kernels, the quantizer's dequantize and
// the cuda-nf4 kernels (host and device).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline constexpr int code_at(const unsigned char* packed, long long i) {
  return (i & 1) ? (packed[i >> 1] & 15) : (packed[i >> 1] >> 4);
}

}  // namespace moelab::nf4
