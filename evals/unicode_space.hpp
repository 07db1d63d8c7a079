#pragma once
// Python's white space on UTF-8 text: str.isspace() (the set str.strip(), str.split() and re's \s use
// in str patterns: ASCII \t \n \v \f \r, space and U+001C..U+001F, plus U+0085, U+00A0, U+1680,
// U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000), and the harness's operations built on it.
// The set is the generating Python's (evals/unicode_case_table.cpp).
#include <string>
#include <string_view>
#include <vector>

namespace moelab::evals {

bool python_isspace(char32_t c);

std::string python_strip(std::string_view utf8);   // str.strip()
std::string python_rstrip(std::string_view utf8);  // str.rstrip()
// str.split() with no argument: the runs of non-white-space, no empty strings.
std::vector<std::string> python_split(std::string_view utf8);
// re.split(r"\s+", s): the pieces between maximal runs of white space, including an empty first or
// last piece when s starts or ends with white space ("" gives one empty piece).
std::vector<std::string> python_re_split_whitespace(std::string_view utf8);

}  // namespace moelab::evals
