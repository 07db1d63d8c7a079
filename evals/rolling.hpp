#pragma once
// Rolling log-likelihood of a whole document (lm_eval/utils.py get_rolling_token_windows with
// context_len=1, then make_disjoint_window): the document's tokens (encoded with BOS, as the HF
// model's tok_encode does by default, so the BOS itself is predicted after the prefix token) are split
// into windows of at most max_len predicted tokens, the first conditioned on the prefix token, each
// later one on the tokens just before it; every token is predicted exactly once.
#include <vector>

#include "core/engine.hpp"
#include "evals/encode.hpp"

namespace moelab::evals {

struct RollingWindow {
  Tokens context;  // disjoint context (may be empty for later windows: then it lives in `input`)
  Tokens predicted;
};

// Exactly the (context, continuation) pairs the harness builds.
std::vector<RollingWindow> rolling_windows(const Tokens& tokens, int32_t prefix_token, int max_len);

struct RollingResult {
  double logprob = 0;
  int windows = 0;
  int tokens = 0;
};

RollingResult rolling_loglikelihood(Engine& engine, const Tokens& tokens, int32_t prefix_token);

}  // namespace moelab::evals
