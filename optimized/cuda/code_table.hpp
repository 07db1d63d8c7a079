#pragma once
// The NF4 code table the cuda-nf4 kernels copy into constant memory. A plain header (no CUDA, no heavy
// includes) so nvcc's C++17 device code and the host tests read the same array; tests/test_cuda_host.cpp
// checks it bit for bit against optimized/nf4's bitsandbytes table.
namespace moelab::cuda {

inline constexpr float kNf4CodeTable[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// Element i of a packed NF4 tensor: byte i / 2, the high nibble for even i (bitsandbytes' packing).
inline constexpr int nf4_code_at(const unsigned char* packed, long long i) {
  return (i % 2 == 0) ? (packed[i / 2] >> 4) : (packed[i / 2] & 15);
}

}  // namespace moelab::cuda
