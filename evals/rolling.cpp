#include "evals/rolling.hpp"

#include "core/error.hpp"
#include "evals/loglikelihood.hpp"

namespace moelab::evals {

std::vector<RollingWindow> rolling_windows(const Tokens& t, int32_t prefix_token, int max_len) {
  std::vector<RollingWindow> out;
  if (t.empty()) return out;
  if (max_len < 1) throw Error("rolling: max length must be at least 1");
  const int64_t n = int64_t(t.size()), L = max_len;
  const int64_t pred_len = L;  // max_seq_len - context_len + 1 with context_len = 1
  // First window: [prefix] + t[:first-1] -> t[:first]
  const int64_t first = std::min(L, n);
  Tokens in{prefix_token};
  in.insert(in.end(), t.begin(), t.begin() + (first - 1));
  std::vector<std::pair<Tokens, Tokens>> raw;
  raw.push_back({in, Tokens(t.begin(), t.begin() + first)});
  int64_t predicted = first;
  while (predicted < n) {
    const int64_t wlen = std::min(n - predicted, pred_len);
    const int64_t end = predicted + wlen;
    // token_list[end - L - 1 : end - 1] (Python slice; a negative start counts from the end)
    int64_t s = end - L - 1, e = end - 1;
    if (s < 0) s = std::max<int64_t>(0, n + s);
    Tokens ctx = s < e ? Tokens(t.begin() + s, t.begin() + e) : Tokens();
    raw.push_back({ctx, Tokens(t.begin() + (end - wlen), t.begin() + end)});
    predicted += wlen;
  }
  for (auto& [a, b] : raw) {  // make_disjoint_window: a[: len(a) - (len(b) - 1)]
    const int64_t keep = std::max<int64_t>(0, int64_t(a.size()) - (int64_t(b.size()) - 1));
    out.push_back({Tokens(a.begin(), a.begin() + keep), b});
  }
  return out;
}

RollingResult rolling_loglikelihood(Engine& engine, const Tokens& tokens, int32_t prefix_token) {
  RollingResult r;
  for (const auto& w : rolling_windows(tokens, prefix_token, engine.max_context())) {
    // The harness scores (context, continuation) windows through _loglikelihood_tokens.
    std::vector<TokenRequest> req{{w.context, w.predicted}};
    const auto res = score_requests(engine, req);
    r.logprob += res[0].logprob;
    r.windows++;
    r.tokens += int(w.predicted.size());
  }
  return r;
}

}  // namespace moelab::evals
