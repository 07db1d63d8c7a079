#pragma once
// ASCII character classes and strip, as Python's str.strip() / \s and \d behave on ASCII text and as
// the C locale's isspace does: the six white-space characters, the ten digits. Evaluation data is
// preprocessed with these so that results do not depend on the process locale.
#include <string>

namespace moelab {

inline bool is_ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}
inline bool is_ascii_digit(char c) { return c >= '0' && c <= '9'; }

// `s` without leading and trailing ASCII white space.
inline std::string strip_ascii_space(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && is_ascii_space(s[a])) ++a;
  while (b > a && is_ascii_space(s[b - 1])) --b;
  return s.substr(a, b - a);
}

}  // namespace moelab
