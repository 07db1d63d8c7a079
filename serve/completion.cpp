#include "serve/completion.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/sampling.hpp"
#include "core/tokenizer.hpp"
#include "serve/api_error.hpp"
#include "serve/chat.hpp"

namespace moelab::serve {

RowLogSoftmax::RowLogSoftmax(std::span<const float> row) : row_(row) {
  double mx = -INFINITY;
  for (float v : row) mx = std::max(mx, double(v));
  double sum = 0;
  for (float v : row) sum += std::exp(double(v) - mx);
  max_ = mx;
  log_sum_ = std::log(sum);
}

std::vector<int32_t> top_tokens(std::span<const float> row, int n) {
  const int size = int(row.size());
  n = std::min(n, size);
  std::vector<int32_t> order(static_cast<size_t>(size));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + n, order.end(),
                    [&](int32_t a, int32_t b) { return row[a] != row[b] ? row[a] > row[b] : a < b; });
  order.resize(size_t(n));
  return order;
}

size_t char_count(std::string_view s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

namespace {

// Valid UTF-8 (no overlongs, surrogates or code points past U+10FFFF)?
bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k < len; ++k) {
      const unsigned char d = s[i + k];
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += size_t(len);
  }
  return true;
}

// The longest suffix of `text` that is a proper prefix of a stop string: text that may still become a stop
// string, held back from a stream.
size_t stop_holdback(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const auto& s : stops)
    for (size_t k = std::min(s.size() - 1, text.size()); k > hold; --k)
      if (text.compare(text.size() - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
  return hold;
}

// The first stop string in `text` at or after byte `from` (npos when none): its position.
size_t find_stop(const std::string& text, const std::vector<std::string>& stops, size_t from) {
  size_t best = std::string::npos;
  for (const auto& s : stops) {
    const size_t p = text.find(s, from);
    if (p < best) best = p;
  }
  return best;
}

}  // namespace

std::string token_display(const std::string& bytes) {
  if (valid_utf8(bytes)) return bytes;
  std::string out = "bytes:";
  for (unsigned char c : bytes) out += fmt::format("\\x{:02x}", c);
  return out;
}

int64_t PreparedRequest::prompt_tokens() const {
  int64_t n = 0;
  for (const auto& p : prompt_ids) n += int64_t(p.size());
  return n;
}

Completer::Completer(Engine& engine, const Tokenizer& tok)
    : engine_(engine), tok_(tok), vocab_(std::min(tok.vocab_size(), engine.config().vocab_size)) {
  // Does decode() drop the word-boundary space of a text's first piece (sentencepiece's dummy prefix)?
  strips_first_space_ = false;
  static const std::string kBoundary = "\xE2\x96\x81";  // U+2581
  for (int id = 0; id < tok.vocab_size(); ++id) {
    const std::string piece = tok.piece(id), b = tok.token_bytes(id);
    if (piece.rfind(kBoundary, 0) == 0 && b.size() > 1 && b[0] == ' ' && b[1] != ' ') {
      strips_first_space_ = tok.decode({id}) == b.substr(1);
      break;
    }
  }
}

PreparedRequest Completer::prepare(CompletionRequest req) const {
  PreparedRequest p;
  const int64_t ctx = engine_.max_context();
  if (req.chat) {
    p.prompt_ids.push_back(apply_chat_template(tok_, req.messages));
    p.prompt_texts.push_back({});
  } else {
    for (size_t i = 0; i < req.prompts.size(); ++i) {
      const auto& pr = req.prompts[i];
      const std::string name = req.prompts.size() > 1 ? fmt::format("prompt[{}]", i) : "prompt";
      std::vector<int32_t> ids;
      if (pr.is_text) {
        ids = tok_.encode(pr.text, req.add_special_tokens);
      } else {
        for (size_t k = 0; k < pr.ids.size(); ++k) {
          if (pr.ids[k] < 0 || pr.ids[k] >= vocab_)
            throw bad_field(name,
                            fmt::format("{} holds token id {} (at {}), outside the vocabulary of {} tokens (0 to {})",
                                        name, pr.ids[k], k, vocab_, vocab_ - 1),
                            "invalid_token_id");
          ids.push_back(int32_t(pr.ids[k]));
        }
      }
      if (ids.empty()) throw bad_field(name, fmt::format("{} is empty (no tokens)", name), "empty_prompt");
      p.prompt_ids.push_back(std::move(ids));
      p.prompt_texts.push_back(pr.is_text ? pr.text : std::string());
    }
  }
  for (size_t i = 0; i < p.prompt_ids.size(); ++i) {
    const int64_t n = int64_t(p.prompt_ids[i].size());
    const std::string name = req.chat ? "messages" : p.prompt_ids.size() > 1 ? fmt::format("prompt[{}]", i) : "prompt";
    if (n > ctx)
      throw bad_field(name,
                      fmt::format("this model's context is {} tokens, but {} has {} tokens", ctx, name, n),
                      "context_length_exceeded");
    int64_t m = req.max_tokens;
    if (m < 0) {  // chat without max_tokens: whatever the context holds
      m = ctx - n;
      if (m == 0)
        throw bad_field(name, fmt::format("{} fills the context of {} tokens: no room to generate", name, ctx),
                        "context_length_exceeded");
    }
    if (m > ctx - n)
      throw bad_field("max_tokens",
                      fmt::format("this model's context is {} tokens, but {} tokens were asked for ({} in {}, {} to "
                                  "generate); lower max_tokens to at most {}",
                                  ctx, m > ctx ? fmt::format("more than {}", ctx) : std::to_string(n + m), n, name, m,
                                  ctx - n),
                      "context_length_exceeded");
    p.max_tokens.push_back(m);
    if (!req.prompts.empty() && !req.prompts[i].is_text) p.prompt_texts[i] = tok_.decode(p.prompt_ids[i]);
  }
  if (req.top_k > vocab_) req.top_k = 0;
  p.req = std::move(req);
  return p;
}

ChoiceResult Completer::run(const PreparedRequest& p, size_t index, const std::function<bool(const Delta&)>& on_delta,
                            const std::atomic<bool>* cancel) {
  const CompletionRequest& req = p.req;
  const std::vector<int32_t>& ids = p.prompt_ids[index];
  const int n = int(ids.size());
  const int m = int(p.max_tokens[index]);
  const bool want = req.logprobs.has_value();
  const int top_n = want ? int(*req.logprobs) : 0;
  const auto check_cancel = [&] {
    if (cancel && cancel->load()) throw ApiError(503, "the server is shutting down", "server_error", "", "shutting_down");
  };
  const auto entry = [&](std::span<const float> row, int32_t token, std::string bytes, size_t offset) {
    const RowLogSoftmax lsm(row);
    LogprobEntry e{token, {}, lsm(token), std::vector<TopLogprob>{}, offset, {}};
    bool has_token = false;
    for (const int32_t t : top_tokens(row, top_n)) {
      const std::string b = tok_.token_bytes(t);
      e.top->push_back({token_display(b), lsm(t), b, false});
      has_token = has_token || t == token;
    }
    if (!has_token) {
      const std::string b = tok_.token_bytes(token);
      e.top->push_back({token_display(b), *e.logprob, b, true});
    }
    e.token = token_display(bytes);
    e.bytes = std::move(bytes);
    return e;
  };

  ChoiceResult r;
  r.prompt_tokens = n;
  r.finish_reason = "length";
  check_cancel();
  engine_.reset();
  MatrixRF last;  // its last row predicts the next token
  // The bytes of each token as they appear in the text: a text's first piece loses its leading space.
  bool at_text_start = true;
  const auto bytes_in_text = [&](int32_t id) {
    std::string b = tok_.token_bytes(id);
    if (at_text_start && !b.empty()) {
      if (strips_first_space_ && b[0] == ' ') b.erase(0, 1);
      at_text_start = false;
    }
    return b;
  };
  std::string prompt_text;
  if (req.echo) {
    prompt_text = p.prompt_texts[index];
    Delta d{prompt_text, {}};
    size_t offset = 0;
    if (want) {
      std::string b = bytes_in_text(ids[0]);
      d.logprobs.push_back({ids[0], token_display(b), std::nullopt, std::nullopt, 0, b});
      offset += char_count(b);
    }
    if (n > 1 && (want || m > 0)) {
      const MatrixRF rows = engine_.forward(std::span<const int32_t>(ids.data(), size_t(n - 1)));
      if (want)
        for (int k = 1; k < n; ++k) {
          std::string b = bytes_in_text(ids[k]);
          const auto row = rows.row(k - 1);
          d.logprobs.push_back(entry(std::span<const float>(row.data(), size_t(row.size())), ids[k], b, offset));
          offset += char_count(b);
        }
      if (m > 0) last = engine_.forward(std::span<const int32_t>(&ids[n - 1], 1));
    } else if (m > 0) {
      last = engine_.forward(std::span<const int32_t>(ids.data(), 1));
    }
    if (!want)
      for (int k = 0; k < n; ++k) bytes_in_text(ids[k]);  // only to know whether the text has started
    r.logprobs = d.logprobs;
    if (on_delta && !on_delta(d)) throw ClientGone();
  } else {
    for (int k = 0; k < n; ++k) bytes_in_text(ids[k]);
    if (m > 0) last = engine_.forward_tail(ids, n - 1);
  }

  // Without a seed, each request draws its own (OpenAI's behaviour); greedy decoding never reads it.
  const uint64_t seed = req.seed ? *req.seed : (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
  Sampler sampler(SamplingParams{float(req.temperature), int(req.top_k), float(req.top_p), seed});
  StreamDecoder decoder(tok_, ids);
  std::string completion;
  size_t sent = 0;  // bytes of `completion` already handed to on_delta
  size_t max_stop = 0;
  for (const auto& s : req.stop) max_stop = std::max(max_stop, s.size());
  const size_t base_offset = char_count(prompt_text);
  size_t gen_chars = 0;
  std::vector<LogprobEntry> pending;
  bool stopped = false;
  const auto emit = [&](bool final) {
    if (!on_delta) return;
    const size_t ready = final ? completion.size() : completion.size() - stop_holdback(completion, req.stop);
    if (ready <= sent && pending.empty()) return;
    Delta d{ready > sent ? completion.substr(sent, ready - sent) : std::string(), std::move(pending)};
    pending.clear();
    sent = std::max(sent, ready);
    if (!on_delta(d)) throw ClientGone();
  };
  for (int step = 0; step < m; ++step) {
    check_cancel();
    const auto row = last.row(last.rows() - 1);
    const std::span<const float> logits(row.data(), size_t(row.size()));
    const int32_t next = sampler.sample(logits);
    if (next == tok_.eos_id()) {
      // EOS ends the text but was generated: counted, and listed in logprobs (as vLLM and OpenAI do), so an
      // echo request with max_tokens 1 always has one entry after the prompt's (lm-eval drops it).
      r.finish_reason = "stop";
      r.eos = true;
      if (want) {
        auto e = entry(logits, next, std::string(), base_offset + gen_chars);
        r.logprobs.push_back(e);
        pending.push_back(std::move(e));
      }
      break;
    }
    r.generated.push_back(next);
    if (want) {
      std::string b = bytes_in_text(next);
      auto e = entry(logits, next, b, base_offset + gen_chars);
      gen_chars += char_count(b);
      r.logprobs.push_back(e);
      pending.push_back(std::move(e));
    } else {
      bytes_in_text(next);
    }
    const size_t before = completion.size();
    completion += decoder.push(next);
    if (!req.stop.empty()) {
      const size_t from = before >= max_stop ? before - max_stop + 1 : 0;
      if (const size_t at = find_stop(completion, req.stop, from); at != std::string::npos) {
        completion.resize(at);
        r.finish_reason = "stop";
        stopped = true;
        break;
      }
    }
    emit(false);
    if (step + 1 < m) last = engine_.forward(std::span<const int32_t>(&next, 1));
  }
  if (!stopped) {
    const size_t before = completion.size();
    completion += decoder.flush();
    if (!req.stop.empty()) {
      const size_t from = before >= max_stop ? before - max_stop + 1 : 0;
      if (const size_t at = find_stop(completion, req.stop, from); at != std::string::npos) {
        completion.resize(at);
        r.finish_reason = "stop";
      }
    }
  }
  emit(true);
  r.completion_tokens = int(r.generated.size()) + (r.eos ? 1 : 0);
  r.text = prompt_text + completion;
  return r;
}

}  // namespace moelab::serve
