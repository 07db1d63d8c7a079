#pragma once
// The body of POST /v1/completions and /v1/chat/completions, parsed and checked field by field before
// anything runs: every wrong type or value is an ApiError 400 naming the field. Fields a client may send
// that change nothing here (model, user, n = 1, ...) are accepted; fields that would change the result in
// a way this server does not implement (suffix, n > 1, penalties, logit_bias) are refused rather than
// silently ignored. Unknown fields are ignored, as OpenAI's API does.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moelab::serve {

// One prompt: text (tokenized by the server) or token ids (used as given).
struct Prompt {
  bool is_text = true;
  std::string text;
  std::vector<int64_t> ids;  // checked against the vocabulary later, where the vocabulary is known
};

struct ChatMessage {
  std::string role, content;
};

struct CompletionRequest {
  std::vector<Prompt> prompts;  // completions: one choice per prompt
  std::vector<ChatMessage> messages;  // chat completions
  bool chat = false;
  int64_t max_tokens = 16;      // OpenAI's default for completions; chat: the context's room
  bool max_tokens_given = false;
  double temperature = 1.0;     // OpenAI's default
  double top_p = 1.0;
  int64_t top_k = 0;            // vLLM's extension; 0 or -1: no limit
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::optional<int64_t> logprobs;  // completions: top-N per position; chat: top_logprobs when logprobs is true
  bool echo = false;
  bool stream = false;
  bool include_usage = false;   // stream_options.include_usage
  bool add_special_tokens = true;  // vLLM's extension: BOS before a text prompt
};

constexpr int kMaxLogprobs = 20;
constexpr size_t kMaxPrompts = 1024;
constexpr size_t kMaxStops = 16;

// Parses a JSON body (already known to be valid JSON). Throws ApiError (400) naming the field.
CompletionRequest parse_completion_request(const nlohmann::json& body);
CompletionRequest parse_chat_request(const nlohmann::json& body);

// The body as JSON, or ApiError 400 "malformed JSON" (with the parser's position).
nlohmann::json parse_json_body(const std::string& body);

}  // namespace moelab::serve
