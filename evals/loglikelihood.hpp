#pragma once
// Log-likelihood of token continuations on any Engine, as lm-evaluation-harness computes it for a
// causal HF model (huggingface.py _loglikelihood_tokens): the input is (context + continuation)
// minus its last token, left-truncated to the engine's max_context()+1 tokens; the continuation's
// tokens are scored from the last len(continuation) positions; log_softmax over the vocabulary;
// is_greedy = every continuation token is the argmax at its position (first index on ties).
//
// Shared contexts: requests whose context tokens are equal and adjacent (a multiple-choice item's
// choices) form a group: the context is forwarded once, and each continuation runs from it after
// Engine::truncate() drops the previous continuation from the KV cache. A group that does not fit the
// context window falls back to one request at a time. ScoreStats counts the tokens forwarded.
#include <functional>
#include <span>
#include <vector>

#include "core/engine.hpp"
#include "evals/encode.hpp"

namespace moelab::evals {

struct TokenRequest {
  Tokens context;       // non-empty
  Tokens continuation;  // non-empty
};

struct LoglikelihoodResult {
  double logprob = 0;  // sum of the continuation tokens' log-probabilities
  bool is_greedy = false;
  bool truncated = false;  // continuation longer than the context: only its last max_context tokens scored
  std::vector<double> token_logprobs;
};

struct ScoreStats {
  int64_t tokens_forwarded = 0;
  int64_t groups = 0;
  int64_t truncated = 0;  // requests whose continuation alone exceeded the context (lm-eval asserts)
};

// log_softmax(row)[token] in double precision.
double token_logprob(std::span<const float> logits_row, int32_t token);

// Scores every request; `on_done(k)` is called after each request (for a progress bar).
std::vector<LoglikelihoodResult> score_requests(Engine& engine, const std::vector<TokenRequest>& requests,
                                                ScoreStats* stats = nullptr,
                                                const std::function<void()>& on_done = {});

// Scores continuation tokens given the logits of the positions that predict them ([n, vocab], row i
// predicts continuation[i]).
LoglikelihoodResult score_rows(const MatrixRF& logits, Eigen::Index first_row, const Tokens& continuation);

}  // namespace moelab::evals
