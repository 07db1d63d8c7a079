#include "serve/response.hpp"

namespace moelab::serve {

ojson usage_json(int64_t prompt_tokens, int64_t completion_tokens) {
  return ojson{{"prompt_tokens", prompt_tokens},
               {"completion_tokens", completion_tokens},
               {"total_tokens", prompt_tokens + completion_tokens}};
}

ojson completion_logprobs_json(const std::vector<LogprobEntry>& entries) {
  ojson tokens = ojson::array(), lps = ojson::array(), tops = ojson::array(), offsets = ojson::array();
  for (const auto& e : entries) {
    tokens.push_back(e.token);
    lps.push_back(e.logprob ? ojson(*e.logprob) : ojson(nullptr));
    if (e.top) {
      ojson t = ojson::object();
      for (const auto& top : *e.top)
        if (!t.contains(top.token)) t[top.token] = top.logprob;  // two ids with the same text: the more likely one
      tops.push_back(std::move(t));
    } else {
      tops.push_back(nullptr);
    }
    offsets.push_back(e.text_offset);
  }
  return ojson{{"tokens", std::move(tokens)},
               {"token_logprobs", std::move(lps)},
               {"top_logprobs", std::move(tops)},
               {"text_offset", std::move(offsets)}};
}

namespace {

ojson head(const ResponseMeta& meta, const char* object) {
  return ojson{{"id", meta.id}, {"object", object}, {"created", meta.created}, {"model", meta.model}};
}

// Chat's logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}.
ojson chat_logprobs_json(const std::vector<LogprobEntry>& entries) {
  ojson content = ojson::array();
  const auto bytes_of = [](const std::string& s) {
    ojson b = ojson::array();
    for (unsigned char c : s) b.push_back(int(c));
    return b;
  };
  for (const auto& e : entries) {
    ojson top = ojson::array();
    if (e.top)
      for (const auto& t : *e.top)
        if (!t.added) top.push_back(ojson{{"token", t.token}, {"logprob", t.logprob}, {"bytes", bytes_of(t.bytes)}});
    content.push_back(ojson{{"token", e.token},
                            {"logprob", e.logprob ? ojson(*e.logprob) : ojson(nullptr)},
                            {"bytes", bytes_of(e.bytes)},
                            {"top_logprobs", std::move(top)}});
  }
  return ojson{{"content", std::move(content)}};
}

}  // namespace

ojson completion_json(const ResponseMeta& meta, const std::vector<ChoiceResult>& choices, bool logprobs) {
  ojson out = head(meta, "text_completion");
  ojson list = ojson::array();
  int64_t prompt = 0, completion = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    const auto& c = choices[i];
    list.push_back(ojson{{"index", i},
                         {"text", c.text},
                         {"logprobs", logprobs ? completion_logprobs_json(c.logprobs) : ojson(nullptr)},
                         {"finish_reason", c.finish_reason}});
    prompt += c.prompt_tokens;
    completion += c.completion_tokens;
  }
  out["choices"] = std::move(list);
  out["usage"] = usage_json(prompt, completion);
  return out;
}

ojson completion_chunk_json(const ResponseMeta& meta, size_t index, const Delta& d, bool logprobs,
                            const std::string& finish_reason) {
  ojson out = head(meta, "text_completion");
  out["choices"] = ojson::array({ojson{{"index", index},
                                       {"text", d.text},
                                       {"logprobs", logprobs ? completion_logprobs_json(d.logprobs) : ojson(nullptr)},
                                       {"finish_reason", finish_reason.empty() ? ojson(nullptr) : ojson(finish_reason)}}});
  return out;
}

ojson chat_json(const ResponseMeta& meta, const ChoiceResult& c, bool logprobs) {
  ojson out = head(meta, "chat.completion");
  out["choices"] = ojson::array({ojson{{"index", 0},
                                       {"message", ojson{{"role", "assistant"}, {"content", c.text}}},
                                       {"logprobs", logprobs ? chat_logprobs_json(c.logprobs) : ojson(nullptr)},
                                       {"finish_reason", c.finish_reason}}});
  out["usage"] = usage_json(c.prompt_tokens, c.completion_tokens);
  return out;
}

ojson chat_chunk_json(const ResponseMeta& meta, const Delta* d, bool first, bool logprobs,
                      const std::string& finish_reason) {
  ojson out = head(meta, "chat.completion.chunk");
  ojson delta = ojson::object();
  if (first) delta["role"] = "assistant";
  if (d) delta["content"] = d->text;
  out["choices"] = ojson::array({ojson{{"index", 0},
                                       {"delta", std::move(delta)},
                                       {"logprobs", logprobs && d ? chat_logprobs_json(d->logprobs) : ojson(nullptr)},
                                       {"finish_reason", finish_reason.empty() ? ojson(nullptr) : ojson(finish_reason)}}});
  return out;
}

}  // namespace moelab::serve
