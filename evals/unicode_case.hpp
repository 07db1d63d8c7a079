#pragma once
// Python's str.lower() and str.capitalize() on UTF-8 text, as CPython computes them (full case
// mappings, so one code point may become several: 'İ'.lower() is 'i' + U+0307, 'ß'.capitalize() is
// "Ss"; capital sigma lower-cases to final 'ς' at the end of a word). lm-evaluation-harness applies them
// to documents (HellaSwag's ctx_b.capitalize()) and answers (exact_match's lower-casing). The Unicode
// data is the generating Python's (evals/unicode_case_table.cpp records its version).
#include <string>
#include <string_view>

namespace moelab::evals {

// str.lower(): every code point's full lower-case mapping; U+03A3 by the final-sigma rule.
std::string python_lower(std::string_view utf8);
// str.capitalize(): the first code point's full title-case mapping, then lower() of the rest (the rest
// as it stands in the whole string: the first character counts as context for a final sigma).
std::string python_capitalize(std::string_view utf8);

}  // namespace moelab::evals
