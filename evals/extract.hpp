#pragma once
// Answer extraction and exact match for generation tasks, as lm-evaluation-harness's gsm8k task
// (lm_eval/tasks/gsm8k/gsm8k.yaml; filters in lm_eval/filters/extraction.py RegexFilter, metric
// exact_match_hf_evaluate in lm_eval/api/metrics.py).
#include <string>
#include <vector>

namespace moelab::evals {

// "strict-match": regex "#### (\-?[0-9\.\,]+)", first match, group 1; "[invalid]" if none.
std::string gsm8k_strict(const std::string& response);
// "flexible-extract": regex "(-?[$0-9.,]{2,})|(-?[0-9]+)", the LAST match (group_select -1), its
// first non-empty group; "[invalid]" if none.
std::string gsm8k_flexible(const std::string& response);

// exact_match with gsm8k's options: regexes_to_ignore ",", "\$", "(?s).*#### ", "\.$" removed from
// both sides, then lower-cased; 1.0 if equal. As the harness computes it with numpy string arrays:
// Python's Unicode lower(), cut to the string's length in code points, and trailing NULs dropped.
double gsm8k_exact_match(const std::string& prediction, const std::string& reference);
std::string gsm8k_normalize(std::string s);

// Cuts generated text at the first occurrence of any stop sequence (the harness splits on each
// `until` string in turn: s = s.split(term)[0]).
std::string cut_at_stops(std::string text, const std::vector<std::string>& stops);

}  // namespace moelab::evals
