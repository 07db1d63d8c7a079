#pragma once
// Scoring rules of lm-evaluation-harness 0.4.9.2 (lm_eval/api/task.py process_results,
// lm_eval/api/metrics.py), one function each.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace moelab::evals {

// Multiple choice. pred = argmax(lls); pred_norm = argmax(lls / len(choice)) with len = Python
// len() = Unicode code points of the choice string as given by doc_to_choice (no leading
// delimiter); pred_bytes = argmax(lls / UTF-8 bytes). numpy argmax: first index on ties.
struct ChoiceScores {
  double acc = 0, acc_norm = 0, acc_bytes = 0, exact_match = 0;
  size_t pred = 0, pred_norm = 0, pred_bytes = 0;
};
ChoiceScores score_choices(const std::vector<double>& lls, const std::vector<bool>& is_greedy,
                           const std::vector<std::string>& choices, int gold);

size_t utf8_length(const std::string& s);  // code points, as Python len(str)

// Aggregations.
double mean(const std::vector<double>& x);
double sample_stddev(const std::vector<double>& x);  // divides by n - 1
double mean_stderr(const std::vector<double>& x);    // sample_stddev / sqrt(n); NaN for n < 2
// (loglikelihood, weight) pairs: words or bytes.
using Weighted = std::vector<std::pair<double, double>>;
double weighted_mean(const Weighted& items);          // sum(ll) / sum(w)
double weighted_perplexity(const Weighted& items);    // exp(-weighted_mean)
double bits_per_byte(const Weighted& items);          // -weighted_mean / ln 2

// Counting as the harness does for rolling tasks: len(re.split(r"\s+", text)) and UTF-8 bytes.
size_t count_words(const std::string& text);
size_t count_bytes(const std::string& text);

// HumanEval: unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), computed as a product.
double pass_at_k(int n, int c, int k);

// maj@k: the most frequent answer (first seen wins ties); nullopt if all empty.
std::optional<std::string> majority_vote(const std::vector<std::string>& answers);

}  // namespace moelab::evals
