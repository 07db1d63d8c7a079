#include "evals/utf8.hpp"

namespace moelab::evals {

Utf8Char utf8_next(std::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return (unsigned char)s[k]; };
  const unsigned char lead = byte(i);
  if (lead < 0x80) return {lead, 1};
  size_t n;
  char32_t cp, min;
  if ((lead & 0xE0) == 0xC0) n = 2, cp = lead & 0x1F, min = 0x80;
  else if ((lead & 0xF0) == 0xE0) n = 3, cp = lead & 0x0F, min = 0x800;
  else if ((lead & 0xF8) == 0xF0) n = 4, cp = lead & 0x07, min = 0x10000;
  else return {kRawByte + lead, 1};
  if (s.size() - i < n) return {kRawByte + lead, 1};
  for (size_t k = 1; k < n; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return {kRawByte + lead, 1};
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {kRawByte + lead, 1};
  return {cp, n};
}

std::u32string utf8_decode(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const Utf8Char c = utf8_next(s, i);
    out += c.cp;
    i += c.bytes;
  }
  return out;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp >= kRawByte) {
    out += char(cp - kRawByte);
  } else if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

std::string utf8_encode(std::u32string_view cps) {
  std::string out;
  out.reserve(cps.size());
  for (const char32_t c : cps) utf8_append(out, c);
  return out;
}

}  // namespace moelab::evals
