#pragma once
// Helpers shared by the files of moelab_nf4 (not part of nf4.hpp's interface).
#include <cstdint>
#include <string>

namespace moelab::nf4::detail {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The torch dtypes a Linear4bit weight can have been quantized from.
inline bool is_known_dtype(const std::string& d) { return d == "float32" || d == "float16" || d == "bfloat16"; }

}  // namespace moelab::nf4::detail
