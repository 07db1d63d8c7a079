#pragma once
// UTF-8 to code points and back, for the Python str semantics of evals/unicode_case.* and
// evals/unicode_space.*. The eval readers accept only valid UTF-8 (docs.cpp), but these functions also
// take text that is not: a byte that starts no valid sequence decodes to kRawByte + the byte, which no
// Unicode table holds, and is written back as that byte, so such text passes through unchanged.
#include <cstddef>
#include <string>
#include <string_view>

namespace moelab::evals {

inline constexpr char32_t kRawByte = 0x110000;  // above every code point

struct Utf8Char {
  char32_t cp;
  size_t bytes;  // 1..4
};

// The character that starts at byte i (i < s.size()).
Utf8Char utf8_next(std::string_view s, size_t i);
std::u32string utf8_decode(std::string_view s);
void utf8_append(std::string& out, char32_t cp);
std::string utf8_encode(std::u32string_view cps);

}  // namespace moelab::evals
