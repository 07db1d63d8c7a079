#include "evals/extract.hpp"

#include <algorithm>

#include "core/ascii.hpp"
#include "evals/unicode_case.hpp"
#include "evals/utf8.hpp"

namespace moelab::evals {

// The two filters below are hand-written equivalents of the harness's regexes (linear time; std::regex's
// recursive matcher overflows the stack on long runs).

namespace {
bool strict_class(char c) { return is_ascii_digit(c) || c == '.' || c == ','; }             // [0-9\.\,]
bool flexible_class(char c) { return is_ascii_digit(c) || c == '$' || c == '.' || c == ','; }  // [$0-9.,]
template <class Pred>
size_t run_end(const std::string& s, size_t k, Pred pred) {
  while (k < s.size() && pred(s[k])) ++k;
  return k;
}
}  // namespace

std::string gsm8k_strict(const std::string& response) {
  // regex_search "#### (\-?[0-9\.\,]+)": the first "#### " followed by an optional '-' and at least one
  // of [0-9.,]; group 1 is the '-' and the whole run.
  for (size_t p = response.find("#### "); p != std::string::npos; p = response.find("#### ", p + 1)) {
    const size_t start = p + 5;
    const size_t digits = start < response.size() && response[start] == '-' ? start + 1 : start;
    const size_t e = run_end(response, digits, strict_class);
    if (e > digits) return strip_ascii_space(response.substr(start, e - start));
  }
  return "[invalid]";
}

std::string gsm8k_flexible(const std::string& response) {
  // Every match of "(-?[$0-9.,]{2,})|(-?[0-9]+)", left to right, each search resuming after the
  // previous match; the last one's non-empty group.
  const std::string& s = response;
  std::string last;
  bool any = false;
  for (size_t p = 0; p < s.size();) {
    const size_t body = s[p] == '-' ? p + 1 : p;  // '-' is not in either class: with it, or no match here
    const size_t e1 = run_end(s, body, flexible_class);
    size_t end = 0;
    if (e1 - body >= 2) end = e1;                       // first alternative
    else if (const size_t e2 = run_end(s, body, is_ascii_digit); e2 > body) end = e2;  // second
    if (end == 0) {
      ++p;
      continue;
    }
    last = s.substr(p, end - p);
    any = true;
    p = end;
  }
  return any ? strip_ascii_space(last) : "[invalid]";
}

namespace {

// A string read back from a numpy str array: numpy pads to the array's width with NULs and drops
// trailing NULs on reading (and in ==), so a string's own trailing NULs are lost too.
std::string numpy_item(std::string s) {
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// The first n code points of s.
std::string first_code_points(const std::string& s, size_t n) {
  size_t i = 0;
  for (; i < s.size() && n > 0; --n) i += utf8_next(s, i).bytes;
  return s.substr(0, i);
}

}  // namespace

// exact_match_hf_evaluate (lm_eval/api/metrics.py) on one string: each regex is applied with re.sub
// and the result stored in a numpy array (`np.array([re.sub(s, "", x) for x in predictions])`), which
// the next regex reads back; then np.char.lower, which calls Python's str.lower() and stores the result
// in an array of the same width, so a lower-case form longer than the string ('İ' -> 'i' + U+0307) is cut
// to the string's length in code points.
std::string gsm8k_normalize(std::string s) {
  s.erase(std::remove(s.begin(), s.end(), ','), s.end());  // the first regex reads the Python string itself
  s = numpy_item(std::move(s));
  s.erase(std::remove(s.begin(), s.end(), '$'), s.end());
  s = numpy_item(std::move(s));
  // "(?s).*#### ": greedy, so everything up to and including the LAST "#### ".
  const size_t p = s.rfind("#### ");
  if (p != std::string::npos) s.erase(0, p + 5);
  s = numpy_item(std::move(s));
  // "\.$": a '.' at the very end, or just before a final '\n' (Python's $).
  if (!s.empty() && s.back() == '.') s.pop_back();
  else if (s.size() >= 2 && s.back() == '\n' && s[s.size() - 2] == '.') s.erase(s.size() - 2, 1);
  const size_t width = utf8_decode(s).size();  // the array's width: the string as re.sub returned it
  return numpy_item(first_code_points(python_lower(numpy_item(std::move(s))), width));
}

double gsm8k_exact_match(const std::string& prediction, const std::string& reference) {
  return gsm8k_normalize(prediction) == gsm8k_normalize(reference) ? 1.0 : 0.0;
}

std::string cut_at_stops(std::string text, const std::vector<std::string>& stops) {
  for (const auto& s : stops) {
    if (s.empty()) continue;
    const size_t p = text.find(s);
    if (p != std::string::npos) text.resize(p);
  }
  return text;
}

}  // namespace moelab::evals
