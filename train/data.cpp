// JSONL training data: reading (plain or gzip), validating each line, tokenizing as trl's SFT does, and the
// per-epoch shuffle. See data.hpp for the format and the rules.
#include "train/data.hpp"

#include <fmt/format.h>
#include <zlib.h>

#include <algorithm>
#include <deque>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/error.hpp"
#include "core/regular_file.hpp"
#include "core/json_bounded.hpp"
#include "core/safetensors.hpp"  // printable()

namespace moelab::train {

int64_t Dataset::target_tokens() const {
  int64_t n = 0;
  for (const auto& s : sequences)
    for (uint8_t t : s.target) n += t != 0;
  return n;
}

int64_t Dataset::tokens() const {
  int64_t n = 0;
  for (const auto& s : sequences) n += int64_t(s.tokens.size());
  return n;
}

namespace {

constexpr uint64_t kMaxFileBytes = 4ull << 30;  // decompressed: a larger file is a mistake, not a dataset

// The file's bytes, inflated when they start with gzip's magic number.
std::string read_maybe_gzip(const std::string& path) {
  std::string raw = read_regular_file(path, "training data", kMaxFileBytes);
  if (raw.size() < 2 || uint8_t(raw[0]) != 0x1f || uint8_t(raw[1]) != 0x8b) return raw;
  z_stream zs{};
  if (inflateInit2(&zs, 15 + 32) != Z_OK) throw Error(fmt::format("{}: cannot start gzip decompression", path));
  std::string out;
  zs.next_in = reinterpret_cast<Bytef*>(raw.data());
  zs.avail_in = uInt(raw.size());
  char buf[1 << 16];
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    zs.next_out = reinterpret_cast<Bytef*>(buf);
    zs.avail_out = sizeof buf;
    rc = inflate(&zs, Z_NO_FLUSH);
    if (rc == Z_STREAM_END && zs.avail_in > 0) {
      out.append(buf, sizeof buf - zs.avail_out);
      // Zero bytes after the last member (tape and block-device padding; `gzip -dc` ignores it, and so does
      // the eval reader, evals/docs.cpp): the end of the data.
      const auto* rest = zs.next_in;
      if (std::all_of(rest, rest + zs.avail_in, [](Bytef b) { return b == 0; })) break;
      // Concatenated gzip members (as `cat a.gz b.gz` makes): go on with the next one.
      inflateReset(&zs);
      rc = Z_OK;
      continue;
    }
    if (rc != Z_OK && rc != Z_STREAM_END) {
      const std::string why = zs.msg ? zs.msg : (rc == Z_BUF_ERROR ? "truncated" : "corrupt");
      inflateEnd(&zs);
      throw Error(fmt::format("{}: not a valid gzip file ({})", path, why));
    }
    out.append(buf, sizeof buf - zs.avail_out);
    if (out.size() > kMaxFileBytes) {
      inflateEnd(&zs);
      throw Error(fmt::format("{}: more than {} bytes decompressed", path, kMaxFileBytes));
    }
  }
  inflateEnd(&zs);
  return out;
}

// The string field `key` of line `where`, or throws naming it.
std::string string_field(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto& v = j.at(key);
  if (!v.is_string()) throw Error(fmt::format("{}: \"{}\" is {}, not a string", where, key, v.type_name()));
  return v.get<std::string>();
}

// --- Conversational data: Mixtral-Instruct's chat template, as transformers renders and tokenizes it ---

struct ChatMessage {
  std::string role, content;
  std::string label;  // where it came from, for errors: "messages[2]", "completion[0]"
};

// Field `key` of line `where`: a non-empty list of {"role": ..., "content": ...} objects.
std::vector<ChatMessage> parse_messages(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto& v = j.at(key);
  if (!v.is_array())
    throw Error(fmt::format("{}: \"{}\" is {}, not a list of messages", where, key, v.type_name()));
  if (v.empty()) throw Error(fmt::format("{}: \"{}\" is an empty list", where, key));
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string label = fmt::format("{}[{}]", key, i);
    const auto& m = v[i];
    if (!m.is_object())
      throw Error(fmt::format("{}: {} is {}, not an object {{\"role\": ..., \"content\": ...}}", where, label,
                              m.type_name()));
    for (const auto& [k, value] : m.items())
      if (k != "role" && k != "content")
        throw Error(fmt::format("{}: {}: unknown field \"{}\" (a message holds \"role\" and \"content\")", where,
                                label, printable(k)));
    for (const char* f : {"role", "content"}) {
      if (!m.contains(f)) throw Error(fmt::format("{}: {} has no \"{}\"", where, label, f));
      if (!m.at(f).is_string())
        throw Error(fmt::format("{}: {}.{} is {}, not a string", where, label, f, m.at(f).type_name()));
    }
    ChatMessage cm{m.at("role").get<std::string>(), m.at("content").get<std::string>(), label};
    if (cm.role != "user" && cm.role != "assistant" && cm.role != "system")
      throw Error(fmt::format("{}: {}.role is \"{}\"; Mixtral-Instruct's chat template knows \"user\", "
                              "\"assistant\" and one leading \"system\"",
                              where, label, printable(cm.role)));
    out.push_back(std::move(cm));
  }
  return out;
}

// Checks `messages` as Mixtral-8x7B-Instruct-v0.1's chat template does (it raises where this throws) and
// renders it to that template's text, with the tokenizer's BOS and EOS pieces written out as in the template:
//   BOS, then per turn " [INST] " + user + " [/INST]" or " " + assistant + EOS; a leading system message goes
//   in front of the first user message as system + "\n\n".
// `prompt_part`: the prompt of a prompt-completion line, which may hold only the system message (the
// template renders BOS alone); a whole conversation needs a user message.
std::string render_mixtral_chat(const std::vector<ChatMessage>& messages, const Tokenizer& tok,
                                const std::string& where, bool prompt_part = false) {
  if (tok.bos_id() < 0 || tok.eos_id() < 0)
    throw Error(fmt::format("{}: the tokenizer has no BOS or no EOS token; Mixtral-Instruct's chat template needs both",
                            where));
  size_t first = 0;
  std::string system;
  bool has_system = false;
  if (!messages.empty() && messages[0].role == "system") {
    system = messages[0].content;
    has_system = true;
    first = 1;
  }
  // The text of a special token inside a message would be read as that token by transformers (a "</s>" in an
  // answer becomes EOS, silently, in trl); refused here instead, which also keeps the tokenization below exact.
  for (const auto& m : messages)
    for (int32_t id : {tok.unk_id(), tok.bos_id(), tok.eos_id()})
      if (id >= 0 && m.content.find(tok.piece(id)) != std::string::npos)
        throw Error(fmt::format("{}: {}.content contains \"{}\", the text of a special token (transformers would read "
                                "it as that token); remove or escape it",
                                where, m.label, tok.piece(id)));
  std::string text = tok.piece(tok.bos_id());
  for (size_t i = first; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (m.role == "system")
      throw Error(fmt::format("{}: {} is a system message; Mixtral-Instruct's chat template takes one, as the "
                              "first message",
                              where, m.label));
    const bool want_user = (i - first) % 2 == 0;
    if ((m.role == "user") != want_user)
      throw Error(fmt::format("{}: {} is \"{}\" where the chat template needs \"{}\" (after an optional system "
                              "message, roles alternate user/assistant/user/...)",
                              where, m.label, printable(m.role), want_user ? "user" : "assistant"));
    if (m.role == "user")
      text += " [INST] " + (i == first && has_system ? system + "\n\n" : std::string()) + m.content + " [/INST]";
    else
      text += " " + m.content + tok.piece(tok.eos_id());
  }
  if (messages.size() == first && !prompt_part)
    throw Error(fmt::format("{}: only a system message; a conversation needs a user message", where));
  return text;
}

// Tokenizes a rendered chat as transformers does for Mixtral-8x7B-Instruct-v0.1 (add_special_tokens=False; its
// tokenizer since the update that made it agree 1-to-1 with mistral_common, the reference: LlamaTokenizer with
// legacy=False, or the equivalent fast tokenizer): the text is split at each occurrence of a special token's
// text (BOS and EOS, written by the template), each becomes its id, and each piece between them is encoded
// by sentencepiece WITHOUT its word-boundary prefix, the template's own leading space standing for it:
// " [INST] Hi [/INST] Hello" -> "▁[" "INST" "]" "▁Hi" ... "▁Hello". Every such piece starts with the template's
// space (render_mixtral_chat refuses special-token text inside messages), so it is encoded as the text after
// that space with the model's own prefix (Mixtral's sentencepiece adds one and keeps repeated spaces).
std::vector<int32_t> tokenize_rendered(const std::string& text, const Tokenizer& tok) {
  const std::pair<std::string, int32_t> specials[] = {{tok.piece(tok.bos_id()), tok.bos_id()},
                                                      {tok.piece(tok.eos_id()), tok.eos_id()}};
  std::vector<int32_t> ids;
  size_t start = 0;
  auto flush = [&](size_t end) {
    if (end == start) return;
    if (text[start] != ' ')  // cannot happen for the template's text; a bug if it does
      throw Error(fmt::format("internal: a chat segment does not start with the template's space: \"{}\"",
                              text.substr(start, end - start)));
    const auto seg = tok.encode(std::string_view(text).substr(start + 1, end - start - 1), /*add_bos=*/false);
    ids.insert(ids.end(), seg.begin(), seg.end());
  };
  for (size_t i = 0; i < text.size();) {
    bool matched = false;
    for (const auto& [piece, id] : specials) {
      if (text.compare(i, piece.size(), piece) == 0) {
        flush(i);
        ids.push_back(id);
        i += piece.size();
        start = i;
        matched = true;
        break;
      }
    }
    if (!matched) ++i;
  }
  flush(text.size());
  return ids;
}

}  // namespace

size_t max_token_bytes(const Tokenizer& tok) {
  // A special token's text ("<s>", "</s>", "<unk>") stands in rendered chats for one token: count it too.
  size_t most = 5;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) most = std::max(most, tok.token_bytes(id).size());
  return most;
}

std::string_view tokenization_prefix(std::string_view text, int64_t max_tokens, size_t token_bytes) {
  const size_t need = size_t(max_tokens) * token_bytes;  // the first max_tokens tokens lie within these bytes
  if (text.size() <= 2 * need) return text;
  // Cut before a lone space between two non-spaces in [need, 2 * need]: sentencepiece's pieces hold its word
  // boundary only in front (or in runs of spaces), so no piece spans such a space and the tokens before it
  // are the same with or without the text after it.
  for (size_t p = std::min(2 * need, text.size() - 2); p > need; --p)
    if (text[p] == ' ' && text[p - 1] != ' ' && text[p + 1] != ' ') return text.substr(0, p);
  // One word longer than `need` bytes: cut at a character boundary 2 * need bytes in; the pieces it changes
  // are at its end, far past the first max_tokens tokens.
  size_t p = 2 * need;
  while (p > 0 && (uint8_t(text[p]) & 0xC0) == 0x80) --p;
  return text.substr(0, p);
}

namespace {

// The first max_tokens tokens of `encode(text)`, tokenizing only tokenization_prefix(text) (memory bounded by
// max_tokens, not the line: sentencepiece needs hundreds of bytes per byte of text). Where the prefix gives no
// more tokens than that (pieces longer than any in the vocabulary: runs of unknown characters merged into one
// <unk>), the whole text is tokenized instead, so the result is always the whole text's first tokens.
template <typename Encode>
std::vector<int32_t> first_tokens(const std::string& text, int64_t max_tokens, size_t token_bytes, Encode encode) {
  const std::string_view prefix = tokenization_prefix(text, max_tokens, token_bytes);
  if (prefix.size() < text.size()) {
    auto ids = encode(std::string(prefix));
    if (int64_t(ids.size()) > max_tokens) {
      ids.resize(size_t(max_tokens) + 1);  // one more than fits: the caller still sees a sequence it cuts
      return ids;
    }
  }
  return encode(text);
}

}  // namespace

Dataset load_dataset(const std::string& path, const Tokenizer& tok, const DataOptions& opt) {
  if (opt.max_seq_len < 2) throw Error(fmt::format("max sequence length {} is too short (at least 2)", opt.max_seq_len));
  const std::string text = read_maybe_gzip(path);
  // Only a bounded prefix of each text is tokenized (first_tokens): the first max_seq_len tokens are all that
  // is kept.
  const size_t token_bytes = max_token_bytes(tok);
  auto encode_with_bos = [&](const std::string& t) { return tok.encode(t, /*add_bos=*/true); };
  auto encode_rendered = [&](const std::string& t) { return tokenize_rendered(t, tok); };
  Dataset ds;
  ds.path = path;
  int64_t kind_line = 0;  // the line that fixed the file's kind
  std::vector<std::string> domains_seen;
  size_t pos = 0;
  for (int64_t line_no = 1; pos < text.size(); ++line_no) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = fmt::format("{}:{}", path, line_no);
    nlohmann::json j;
    try {
      j = parse_json_bounded(line, where);
    } catch (const nlohmann::json::exception& e) {
      // Every kind: a syntax error (parse_error), and also a number too large for a double, "1e400", which
      // nlohmann reports as out_of_range.
      throw Error(fmt::format("{}: not valid JSON ({})", where, e.what()));
    }
    if (!j.is_object()) throw Error(fmt::format("{}: a line must be a JSON object, not {}", where, j.type_name()));
    for (const auto& [key, value] : j.items())
      if (key != "text" && key != "prompt" && key != "completion" && key != "messages" && key != "domain" &&
          key != "source")
        throw Error(fmt::format("{}: unknown field \"{}\" (a line holds \"text\", \"messages\", or \"prompt\" and "
                                "\"completion\"; \"domain\" and \"source\" are read as metadata)", where,
                                printable(key)));
    const bool has_text = j.contains("text"), has_prompt = j.contains("prompt"), has_completion = j.contains("completion");
    const bool has_messages = j.contains("messages");
    std::string kind;
    if (has_text && !has_prompt && !has_completion && !has_messages) kind = "text";
    else if (has_messages && !has_text && !has_prompt && !has_completion) kind = "conversational";
    else if (!has_text && !has_messages && has_prompt && has_completion) {
      // Strings: standard prompt-completion; message lists: conversational. One of each is a mistake.
      const bool prompt_list = j.at("prompt").is_array(), completion_list = j.at("completion").is_array();
      if (prompt_list != completion_list)
        throw Error(fmt::format("{}: \"{}\" is a list of messages but \"{}\" is {}; both are strings or both are "
                                "message lists", where, prompt_list ? "prompt" : "completion",
                                prompt_list ? "completion" : "prompt",
                                j.at(prompt_list ? "completion" : "prompt").type_name()));
      kind = prompt_list ? "conversational prompt-completion" : "prompt-completion";
    }
    else if (has_text) throw Error(fmt::format("{}: \"text\" together with \"{}\"; a line is one kind", where,
                                               has_messages ? "messages" : "prompt\"/\"completion"));
    else if (has_messages) throw Error(fmt::format("{}: \"messages\" together with \"prompt\"/\"completion\"; a line is one kind", where));
    else if (has_prompt) throw Error(fmt::format("{}: \"prompt\" without \"completion\"", where));
    else if (has_completion) throw Error(fmt::format("{}: \"completion\" without \"prompt\"", where));
    else throw Error(fmt::format("{}: no \"text\", \"messages\" or \"prompt\"/\"completion\" field", where));
    if (ds.kind.empty()) {
      ds.kind = kind;
      kind_line = line_no;
    } else if (kind != ds.kind) {
      throw Error(fmt::format("{}: a {} example in a {} dataset (line {} is {}); one file holds one kind", where, kind,
                              ds.kind, kind_line, ds.kind));
    }
    std::string domain;
    if (j.contains("domain")) domain = string_field(j, "domain", where);
    if (j.contains("source")) (void)string_field(j, "source", where);
    ++ds.lines;
    if (std::find(domains_seen.begin(), domains_seen.end(), domain) == domains_seen.end()) domains_seen.push_back(domain);

    TrainSequence seq;
    if (kind == "text") {
      const std::string t = string_field(j, "text", where);
      if (t.empty()) throw Error(fmt::format("{}: \"text\" is empty", where));
      if (!opt.domain.empty() && domain != opt.domain) continue;
      seq.tokens = first_tokens(t, opt.max_seq_len, token_bytes, encode_with_bos);
      seq.tokens.push_back(tok.eos_id());
      seq.target.assign(seq.tokens.size(), 1);
    } else if (kind == "conversational") {
      // trl: apply_chat_template(messages) tokenized as is (the template writes BOS and each EOS); every token
      // is learned (assistant_only_loss is off by default, and Mixtral's template cannot mark assistant spans).
      const auto messages = parse_messages(j, "messages", where);
      const std::string rendered = render_mixtral_chat(messages, tok, where);
      if (!opt.domain.empty() && domain != opt.domain) continue;
      seq.tokens = first_tokens(rendered, opt.max_seq_len, token_bytes, encode_rendered);
      seq.target.assign(seq.tokens.size(), 1);
    } else if (kind == "conversational prompt-completion") {
      // trl: the prompt's messages and prompt + completion rendered and tokenized separately; the first
      // len(prompt ids) positions of the whole are the prompt's.
      auto messages = parse_messages(j, "prompt", where);
      const auto completion = parse_messages(j, "completion", where);
      const size_t prompt_messages = messages.size();
      messages.insert(messages.end(), completion.begin(), completion.end());
      const std::string whole = render_mixtral_chat(messages, tok, where);
      messages.resize(prompt_messages);
      const std::string prompt = render_mixtral_chat(messages, tok, where, /*prompt_part=*/true);
      if (!opt.domain.empty() && domain != opt.domain) continue;
      const size_t prompt_len = first_tokens(prompt, opt.max_seq_len, token_bytes, encode_rendered).size();
      seq.tokens = first_tokens(whole, opt.max_seq_len, token_bytes, encode_rendered);
      seq.target.assign(seq.tokens.size(), 1);
      if (opt.completion_only_loss)
        for (size_t i = 0; i < std::min(prompt_len, seq.target.size()); ++i) seq.target[i] = 0;
    } else {
      const std::string prompt = string_field(j, "prompt", where);
      const std::string completion = string_field(j, "completion", where);
      if (completion.empty()) throw Error(fmt::format("{}: \"completion\" is empty", where));
      if (!opt.domain.empty() && domain != opt.domain) continue;
      // trl: the prompt alone and the prompt + completion tokenized separately; the first len(prompt ids)
      // positions of the whole are the prompt's.
      const size_t prompt_len = first_tokens(prompt, opt.max_seq_len, token_bytes, encode_with_bos).size();
      seq.tokens = first_tokens(prompt + completion, opt.max_seq_len, token_bytes, encode_with_bos);
      seq.tokens.push_back(tok.eos_id());
      seq.target.assign(seq.tokens.size(), 1);
      if (opt.completion_only_loss)
        for (size_t i = 0; i < std::min(prompt_len, seq.target.size()); ++i) seq.target[i] = 0;
    }
    seq.target[0] = 0;  // the first token is predicted from nothing
    if (int64_t(seq.tokens.size()) > opt.max_seq_len) {
      seq.tokens.resize(size_t(opt.max_seq_len));
      seq.target.resize(size_t(opt.max_seq_len));
      ++ds.truncated;
    }
    if (std::find(seq.target.begin(), seq.target.end(), uint8_t(1)) == seq.target.end()) {
      ++ds.dropped_no_target;
      continue;
    }
    ds.sequences.push_back(std::move(seq));
    ds.domains.push_back(domain);
  }
  if (ds.lines == 0) throw Error(fmt::format("{}: no examples (an empty file?)", path));
  if (ds.sequences.empty()) {
    if (!opt.domain.empty()) {
      std::string present;
      for (const auto& d : domains_seen) present += (present.empty() ? "" : ", ") + (d.empty() ? "(none)" : printable(d));
      throw Error(fmt::format("{}: no example with \"domain\" \"{}\" (domains present: {})", path,
                              printable(opt.domain), present));
    }
    throw Error(fmt::format("{}: no example has a token to learn within --max-seq-len {}", path, opt.max_seq_len));
  }
  if (opt.packing) {
    std::vector<int64_t> lengths;
    for (const auto& s : ds.sequences) lengths.push_back(int64_t(s.tokens.size()));
    ds.bins = pack_bfd(lengths, opt.max_seq_len);
  } else {
    for (size_t i = 0; i < ds.sequences.size(); ++i) ds.bins.push_back({int64_t(i)});
  }
  return ds;
}

std::vector<std::vector<int64_t>> pack_bfd(const std::vector<int64_t>& lengths, int64_t capacity) {
  std::vector<int64_t> by_length(lengths.size());
  std::iota(by_length.begin(), by_length.end(), int64_t(0));
  std::stable_sort(by_length.begin(), by_length.end(),
                   [&](int64_t a, int64_t b) { return lengths[size_t(a)] > lengths[size_t(b)]; });
  std::vector<std::vector<int64_t>> bins;
  std::vector<int64_t> used;
  // Open bins by remaining space (> 0); each space's bins first-come first-served, as trl's deque per space.
  std::map<int64_t, std::deque<size_t>> by_space;
  for (int64_t item : by_length) {
    const int64_t len = lengths[size_t(item)];
    if (len < 1 || len > capacity)
      throw Error(fmt::format("packing: item {} has length {}, outside 1..{}", item, len, capacity));
    size_t bin;
    const auto fit = by_space.lower_bound(len);  // the least space that fits
    if (fit != by_space.end()) {
      bin = fit->second.front();
      fit->second.pop_front();
      if (fit->second.empty()) by_space.erase(fit);
    } else {
      bin = bins.size();
      bins.emplace_back();
      used.push_back(0);
    }
    bins[bin].push_back(item);
    used[bin] += len;
    if (used[bin] < capacity) by_space[capacity - used[bin]].push_back(bin);
  }
  return bins;
}

namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
  uint64_t state = seed ^ (0xd1b54a32d192ed03ull * uint64_t(epoch + 1));
  for (int64_t i = n - 1; i > 0; --i) {
    // Lemire's multiply-shift: a draw in [0, i]; the bias (< 2^-40 for any dataset size here) does not matter,
    // what matters is that it is fixed.
    const uint64_t j = uint64_t((unsigned __int128)splitmix64(state) * uint64_t(i + 1) >> 64);
    std::swap(order[size_t(i)], order[size_t(j)]);
  }
  return order;
}

}  // namespace moelab::train
