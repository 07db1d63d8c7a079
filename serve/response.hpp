#pragma once
// Response bodies in OpenAI's shapes: text_completion (legacy completions, with logprobs as tokens,
// token_logprobs, top_logprobs and text_offset), chat.completion, and their streamed chunks.
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "serve/completion.hpp"

namespace moelab::serve {

using ojson = nlohmann::ordered_json;

struct ResponseMeta {
  std::string id;     // "cmpl-..." or "chatcmpl-..."
  std::string model;
  int64_t created = 0;  // Unix seconds
};

ojson usage_json(int64_t prompt_tokens, int64_t completion_tokens);

// POST /v1/completions, not streamed: one choice per prompt, in order.
ojson completion_json(const ResponseMeta& meta, const std::vector<ChoiceResult>& choices, bool logprobs);
// One streamed chunk of choice `index`: a delta, or the end (finish_reason set, text empty).
ojson completion_chunk_json(const ResponseMeta& meta, size_t index, const Delta& d, bool logprobs,
                            const std::string& finish_reason);

// POST /v1/chat/completions, not streamed (one choice).
ojson chat_json(const ResponseMeta& meta, const ChoiceResult& choice, bool logprobs);
// Streamed: the first chunk carries the role, later ones content, the last one finish_reason.
ojson chat_chunk_json(const ResponseMeta& meta, const Delta* d, bool first, bool logprobs,
                      const std::string& finish_reason);

// The `logprobs` object of a legacy completion choice for these entries.
ojson completion_logprobs_json(const std::vector<LogprobEntry>& entries);

}  // namespace moelab::serve
