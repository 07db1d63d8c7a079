#include "evals/extract.hpp"

#include <algorithm>
#include <cctype>
#include <regex>

namespace moelab::evals {

namespace {
std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace((unsigned char)s[a])) ++a;
  while (b > a && std::isspace((unsigned char)s[b - 1])) --b;
  return s.substr(a, b - a);
}
}  // namespace

std::string gsm8k_strict(const std::string& response) {
  static const std::regex re(R"(#### (\-?[0-9\.\,]+))");
  std::smatch m;
  if (!std::regex_search(response, m, re)) return "[invalid]";
  return strip(m[1].str());
}

std::string gsm8k_flexible(const std::string& response) {
  static const std::regex re(R"((-?[$0-9.,]{2,})|(-?[0-9]+))");
  std::string last;
  bool any = false;
  for (auto it = std::sregex_iterator(response.begin(), response.end(), re); it != std::sregex_iterator(); ++it) {
    const auto& m = *it;
    last = m[1].matched && m[1].length() > 0 ? m[1].str() : m[2].str();
    any = true;
  }
  return any ? strip(last) : "[invalid]";
}

std::string gsm8k_normalize(std::string s) {
  s.erase(std::remove(s.begin(), s.end(), ','), s.end());
  s.erase(std::remove(s.begin(), s.end(), '$'), s.end());
  // "(?s).*#### ": greedy, so everything up to and including the LAST "#### ".
  const size_t p = s.rfind("#### ");
  if (p != std::string::npos) s.erase(0, p + 5);
  // "\.$": a '.' at the very end, or just before a final '\n' (Python's $).
  if (!s.empty() && s.back() == '.') s.pop_back();
  else if (s.size() >= 2 && s.back() == '\n' && s[s.size() - 2] == '.') s.erase(s.size() - 2, 1);
  for (auto& c : s) c = char(std::tolower((unsigned char)c));  // numpy lower (ASCII here)
  return s;
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
