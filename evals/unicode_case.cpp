#include "evals/unicode_case.hpp"

#include <algorithm>

#include "evals/unicode_case_table.hpp"
#include "evals/utf8.hpp"

namespace moelab::evals {

namespace {

namespace table = unicode_table;

constexpr char32_t kCapitalSigma = 0x3A3, kSmallSigma = 0x3C3, kFinalSigma = 0x3C2;

bool in(std::span<const table::Range> ranges, char32_t c) {
  const auto it = std::upper_bound(ranges.begin(), ranges.end(), c,
                                   [](char32_t v, const table::Range& r) { return v < r.first; });
  return it != ranges.begin() && c <= std::prev(it)->last;
}

// Appends c's mapping under one table (runs for single code points, expansions for longer mappings).
void append_mapped(std::u32string& out, char32_t c, std::span<const table::DeltaRun> runs,
                   std::span<const table::Expansion> expansions) {
  const auto e = std::lower_bound(expansions.begin(), expansions.end(), c,
                                  [](const table::Expansion& x, char32_t v) { return x.from < v; });
  if (e != expansions.end() && e->from == c) {
    for (const char32_t t : e->to)
      if (t != 0) out += t;
    return;
  }
  const auto r = std::upper_bound(runs.begin(), runs.end(), c,
                                  [](char32_t v, const table::DeltaRun& run) { return v < run.first; });
  if (r != runs.begin()) {
    const table::DeltaRun& run = *std::prev(r);
    if (c <= run.last && (c - run.first) % run.step == 0) {
      out += char32_t(int64_t(c) + run.delta);
      return;
    }
  }
  out += c;
}

// The Final_Sigma condition of Unicode's SpecialCasing: looking past case-ignorable characters, the
// nearest character before position i is cased, and the nearest after it is absent or not cased.
bool is_final_sigma(const std::u32string& s, size_t i) {
  size_t before = i;
  while (before > 0 && in(table::case_ignorable, s[before - 1])) --before;
  if (before == 0 || !in(table::cased, s[before - 1])) return false;
  size_t after = i + 1;
  while (after < s.size() && in(table::case_ignorable, s[after])) ++after;
  return after == s.size() || !in(table::cased, s[after]);
}

// lower() of s[from..], with the whole of s as the final-sigma context.
void append_lower(std::u32string& out, const std::u32string& s, size_t from) {
  for (size_t i = from; i < s.size(); ++i) {
    if (s[i] == kCapitalSigma) out += is_final_sigma(s, i) ? kFinalSigma : kSmallSigma;
    else append_mapped(out, s[i], table::lower_runs, table::lower_expansions);
  }
}

}  // namespace

std::string python_lower(std::string_view utf8) {
  const std::u32string s = utf8_decode(utf8);
  std::u32string out;
  out.reserve(s.size());
  append_lower(out, s, 0);
  return utf8_encode(out);
}

std::string python_capitalize(std::string_view utf8) {
  const std::u32string s = utf8_decode(utf8);
  if (s.empty()) return {};
  std::u32string out;
  out.reserve(s.size() + 2);
  append_mapped(out, s[0], table::title_runs, table::title_expansions);
  append_lower(out, s, 1);
  return utf8_encode(out);
}

}  // namespace moelab::evals
