#pragma once
// The NF4 code table the cuda-nf4 kernels copy into constant memory is optimized/nf4/code_values.hpp's
// (the one table in moelab, itself checked against bitsandbytes' fixtures); a plain header (no CUDA, no
// heavy includes) so nvcc's C++17 device code and the host tests read the same array.
#include "optimized/nf4/code_values.hpp"

namespace moelab::cuda {

// Element i of a packed NF4 tensor: optimized/nf4's one nibble lookup (nf4::code_at), by the name the
// host tests use.
inline constexpr int nf4_code_at(const unsigned char* packed, long long i) { return nf4::code_at(packed, i); }

}  // namespace moelab::cuda
