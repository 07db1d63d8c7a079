#include "evals/metrics.hpp"

#include <cmath>
#include <map>

#include "core/error.hpp"
#include "evals/unicode_space.hpp"

namespace moelab::evals {

size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

namespace {
size_t argmax_scaled(const std::vector<double>& lls, const std::vector<double>& div) {
  size_t best = 0;
  for (size_t i = 1; i < lls.size(); ++i)
    if (lls[i] / div[i] > lls[best] / div[best]) best = i;
  return best;
}
}  // namespace

ChoiceScores score_choices(const std::vector<double>& lls, const std::vector<bool>& is_greedy,
                           const std::vector<std::string>& choices, int gold) {
  if (lls.empty() || lls.size() != choices.size()) throw Error("multiple choice: one log-likelihood per choice");
  std::vector<double> ones(lls.size(), 1.0), chars, bytes;
  for (const auto& c : choices) chars.push_back(double(utf8_length(c))), bytes.push_back(double(c.size()));
  ChoiceScores s;
  s.pred = argmax_scaled(lls, ones);
  s.pred_norm = argmax_scaled(lls, chars);
  s.pred_bytes = argmax_scaled(lls, bytes);
  const bool valid = gold >= 0 && size_t(gold) < choices.size();
  s.acc = valid && s.pred == size_t(gold);
  s.acc_norm = valid && s.pred_norm == size_t(gold);
  s.acc_bytes = valid && s.pred_bytes == size_t(gold);
  s.exact_match = valid && size_t(gold) < is_greedy.size() && is_greedy[size_t(gold)];
  return s;
}

double mean(const std::vector<double>& x) {
  double s = 0;
  for (double v : x) s += v;
  return x.empty() ? NAN : s / double(x.size());
}

double sample_stddev(const std::vector<double>& x) {
  if (x.size() < 2) return NAN;
  const double mu = mean(x);
  double s = 0;
  for (double v : x) s += (v - mu) * (v - mu);
  return std::sqrt(s / double(x.size() - 1));
}

double mean_stderr(const std::vector<double>& x) { return sample_stddev(x) / std::sqrt(double(x.size())); }

double weighted_mean(const Weighted& items) {
  double a = 0, b = 0;
  for (const auto& [ll, w] : items) a += ll, b += w;
  return a / b;
}
double weighted_perplexity(const Weighted& items) { return std::exp(-weighted_mean(items)); }
double bits_per_byte(const Weighted& items) { return -weighted_mean(items) / std::log(2.0); }

size_t count_words(const std::string& text) {
  // len(re.split(r"\s+", page)): Python's \s is Unicode white space (str.isspace()).
  return python_re_split_whitespace(text).size();
}

size_t count_bytes(const std::string& text) { return text.size(); }

double pass_at_k(int n, int c, int k) {
  if (k < 1 || n < 1 || c < 0 || c > n || k > n) throw Error("pass@k: need 1 <= k <= n and 0 <= c <= n");
  if (n - c < k) return 1.0;
  double prod = 1.0;  // prod_{i=n-c+1}^{n} (1 - k / i)
  for (int i = n - c + 1; i <= n; ++i) prod *= 1.0 - double(k) / double(i);
  return 1.0 - prod;
}

std::optional<std::string> majority_vote(const std::vector<std::string>& answers) {
  std::map<std::string, int> count;
  std::optional<std::string> best;
  int best_n = 0;
  for (const auto& a : answers) {
    if (a.empty()) continue;
    const int n = ++count[a];
    if (n > best_n) best_n = n, best = a;
  }
  // First seen wins ties: recompute in order of first appearance.
  for (const auto& a : answers)
    if (!a.empty() && count[a] == best_n) return a;
  return best;
}

}  // namespace moelab::evals
