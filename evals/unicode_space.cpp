#include "evals/unicode_space.hpp"

#include <algorithm>

#include "evals/unicode_case_table.hpp"
#include "evals/utf8.hpp"

namespace moelab::evals {

bool python_isspace(char32_t c) {
  const auto& ws = unicode_table::white_space;
  const auto it = std::upper_bound(ws.begin(), ws.end(), c,
                                   [](char32_t v, const unicode_table::Range& r) { return v < r.first; });
  return it != ws.begin() && c <= std::prev(it)->last;
}

namespace {

// Calls run(begin, end) for each maximal run of white space (space == true) or of other characters,
// in order, as byte offsets into s.
template <class Run>
void for_each_run(std::string_view s, Run run) {
  size_t start = 0;
  bool start_is_space = false;
  for (size_t i = 0; i < s.size();) {
    const Utf8Char c = utf8_next(s, i);
    const bool space = python_isspace(c.cp);
    if (i == 0) start_is_space = space;
    else if (space != start_is_space) run(start, i, start_is_space), start = i, start_is_space = space;
    i += c.bytes;
  }
  if (!s.empty()) run(start, s.size(), start_is_space);
}

}  // namespace

std::string python_strip(std::string_view s) {
  size_t first = s.size(), last = 0;  // the bytes from the first to the end of the last non-space run
  for_each_run(s, [&](size_t b, size_t e, bool space) {
    if (!space) first = std::min(first, b), last = e;
  });
  return first < last ? std::string(s.substr(first, last - first)) : std::string();
}

std::string python_rstrip(std::string_view s) {
  size_t last = 0;
  for_each_run(s, [&](size_t, size_t e, bool space) {
    if (!space) last = e;
  });
  return std::string(s.substr(0, last));
}

std::vector<std::string> python_split(std::string_view s) {
  std::vector<std::string> out;
  for_each_run(s, [&](size_t b, size_t e, bool space) {
    if (!space) out.emplace_back(s.substr(b, e - b));
  });
  return out;
}

std::vector<std::string> python_re_split_whitespace(std::string_view s) {
  std::vector<std::string> out(1);  // the piece being built
  for_each_run(s, [&](size_t b, size_t e, bool space) {
    if (space) out.emplace_back();
    else out.back() = std::string(s.substr(b, e - b));
  });
  return out;
}

}  // namespace moelab::evals
