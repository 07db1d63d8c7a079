#pragma once
// The Unicode data behind Python's str methods, as the Python that generated
// evals/unicode_case_table.cpp answers for every code point (scripts/make_unicode_case_table.py says
// how each table is asked of Python). Read through evals/unicode_case.hpp and evals/unicode_space.hpp.
#include <cstdint>
#include <span>

namespace moelab::evals::unicode_table {

// Code points first, first + step, ... up to last map to c + delta (one code point each).
struct DeltaRun {
  char32_t first, last;
  uint8_t step;
  int32_t delta;
};
// A code point whose mapping is several code points (at most three; unused places are 0).
struct Expansion {
  char32_t from;
  char32_t to[3];
};
struct Range {
  char32_t first, last;
};

extern const char* const python_version;   // platform.python_version() of the generating Python
extern const char* const unicode_version;  // its unicodedata.unidata_version

// Sorted by `first`, not overlapping. A code point in no run and no expansion maps to itself.
extern const std::span<const DeltaRun> lower_runs;          // chr(c).lower()
extern const std::span<const Expansion> lower_expansions;  // sorted by `from`
extern const std::span<const DeltaRun> title_runs;          // chr(c).title()
extern const std::span<const Expansion> title_expansions;
extern const std::span<const Range> white_space;     // chr(c).isspace()
extern const std::span<const Range> case_ignorable;  // the final-sigma rule's classes
extern const std::span<const Range> cased;           // cased and not case-ignorable

}  // namespace moelab::evals::unicode_table
