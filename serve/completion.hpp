#pragma once
// A completion on an Engine: the request's prompts tokenized and checked against the vocabulary and the
// context (ApiError 400 before anything runs), then each prompt run on its own from an empty KV cache.
//
// How the engine is called, so results can be compared with moelab's other commands:
// - echo (log-probabilities of the prompt): the prompt minus its last token is forwarded in one call, as
//   moelab eval scores one (context, continuation) request (evals/loglikelihood.cpp score_one): the
//   prompt's log-probabilities are equal bit for bit on the same engine. When tokens are also generated,
//   the last prompt token then runs as one decode step.
// - otherwise the whole prompt is one call that keeps the last row (forward_tail), then one decode step
//   per token, as `moelab generate` does (core/generate.cpp): greedy completions are the same tokens.
// Log-probabilities are the model's own (log_softmax of the logits in double, before temperature, top-k or
// top-p), computed as evals::token_logprob computes them.
#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/engine.hpp"
#include "serve/request.hpp"

namespace moelab {
class Tokenizer;
}

namespace moelab::serve {

// One of a position's most likely tokens: its text as shown (token_display), its log-probability, its
// bytes as they are (chat's "bytes" field, from which a client rebuilds a character split over tokens), and
// whether it is the position's own token added because it was not among the top N (the completions API
// shows it, as OpenAI's legacy one does; chat lists exactly top_logprobs entries).
struct TopLogprob {
  std::string token;
  double logprob = 0;
  std::string bytes;
  bool added = false;
};

// One position's log-probabilities: the token there (its text as bytes), its log-probability (none for a
// prompt's first token, which nothing predicts), the most likely tokens at that position (plus the token
// itself when it is not among them; none for a prompt's first token), and where its text starts in the
// returned text (in characters).
struct LogprobEntry {
  int32_t id = 0;
  std::string token;
  std::optional<double> logprob;
  std::optional<std::vector<TopLogprob>> top;
  size_t text_offset = 0;
  std::string bytes;  // the token's bytes as they are (token is token_display of them)
};

// Text that became final, with the log-probabilities of the tokens that produced it (streaming).
struct Delta {
  std::string text;
  std::vector<LogprobEntry> logprobs;
};

struct ChoiceResult {
  std::string text;           // echo: the prompt's text, then the completion
  std::string finish_reason;  // "stop" (EOS or a stop string) or "length" (max_tokens, or the context)
  int prompt_tokens = 0, completion_tokens = 0;  // completion_tokens counts an EOS that ended the text
  bool eos = false;                   // generation ended at EOS
  std::vector<int32_t> generated;     // the generated ids (EOS not included)
  std::vector<LogprobEntry> logprobs;  // echo: one per prompt token, then one per generated token (EOS too)
};

// A request checked and tokenized.
struct PreparedRequest {
  CompletionRequest req;
  std::vector<std::vector<int32_t>> prompt_ids;
  std::vector<std::string> prompt_texts;  // what echo returns: the text as given, or the ids decoded
  std::vector<int64_t> max_tokens;        // per prompt (chat without max_tokens: the context's room)
  int64_t prompt_tokens() const;
};

// Thrown by a Delta callback's caller when the callback returns false (the client went away).
struct ClientGone : std::exception {
  const char* what() const noexcept override { return "client disconnected"; }
};

class Completer {
 public:
  Completer(Engine& engine, const Tokenizer& tok);

  // Tokenizes and checks; ApiError 400 naming the field (prompt, max_tokens, messages).
  PreparedRequest prepare(CompletionRequest req) const;

  // Runs prompt `index`. `on_delta` (optional) receives text as it becomes final and returns false to
  // abandon the run (ClientGone is thrown). `cancel` is read before each token: when set, ApiError 503.
  ChoiceResult run(const PreparedRequest& p, size_t index, const std::function<bool(const Delta&)>& on_delta = {},
                   const std::atomic<bool>* cancel = nullptr);

  int context() const { return engine_.max_context(); }
  int vocab() const { return vocab_; }
  Engine& engine() { return engine_; }
  const Tokenizer& tokenizer() const { return tok_; }

 private:
  Engine& engine_;
  const Tokenizer& tok_;
  int vocab_;                  // ids accepted: below both the tokenizer's and the model's vocabulary
  bool strips_first_space_;    // decode() drops the leading space of a text's first piece
};

// log_softmax(row)[token] in double, as evals::token_logprob: (logit - max) - log(sum exp(logit - max)).
struct RowLogSoftmax {
  explicit RowLogSoftmax(std::span<const float> row);
  double operator()(int32_t token) const { return double(row_[size_t(token)]) - max_ - log_sum_; }
  std::span<const float> row_;
  double max_ = 0, log_sum_ = 0;
};

// The `n` most likely tokens of a row (highest logit first, lower id first on ties).
std::vector<int32_t> top_tokens(std::span<const float> row, int n);

// A token's bytes as a JSON string: as is when valid UTF-8, else OpenAI's "bytes:\xNN..." form.
std::string token_display(const std::string& bytes);
// Characters (code points) in UTF-8 text: bytes that do not continue a character.
size_t char_count(std::string_view s);

}  // namespace moelab::serve
