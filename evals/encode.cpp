#include "evals/encode.hpp"

#include "core/error.hpp"
#include "core/tokenizer.hpp"
#include "evals/unicode_space.hpp"

namespace moelab::evals {

namespace {
const std::string kUnderline = "\xE2\x96\x81";  // "▁"
}  // namespace

TextCodec TextCodec::from(const Tokenizer& tok) {
  TextCodec c;
  c.encode = [&tok](std::string_view s) { return tok.encode(s, true); };
  c.encode_plain = [&tok](std::string_view s) { return tok.encode(s, false); };
  c.prefix_token = tok.bos_id();
  c.eos_token = tok.eos_id();
  const int bos = tok.bos_id(), eos = tok.eos_id();
  c.decode = [&tok, bos, eos](const Tokens& ids_in) {
    Tokens ids;
    for (int32_t id : ids_in)
      if (id != bos && id != eos) ids.push_back(id);
    if (ids.empty()) return std::string();
    std::string text = tok.decode(ids);
    // sentencepiece already drops the leading space of a first piece "▁x"; the slow LlamaTokenizer
    // drops one "▁" itself first, so a first piece "▁" (or "▁▁x") loses one more space.
    const std::string p0 = tok.piece(ids[0]);
    if (p0.rfind(kUnderline, 0) == 0 && !text.empty() && text[0] == ' ') text.erase(0, 1);
    return text;
  };
  return c;
}

std::pair<Tokens, Tokens> encode_pair(const TextCodec& codec, std::string context, std::string continuation) {
  if (context.empty()) {
    Tokens cont = codec.encode_plain(continuation);
    if (!cont.empty() && cont[0] == codec.prefix_token) return {Tokens{cont[0]}, Tokens(cont.begin() + 1, cont.end())};
    return {Tokens{codec.prefix_token}, cont};
  }
  // n_spaces = len(context) - len(context.rstrip()): Python's rstrip, Unicode white space.
  const size_t n_spaces = context.size() - python_rstrip(context).size();
  if (n_spaces > 0) {
    continuation = context.substr(context.size() - n_spaces) + continuation;
    context.resize(context.size() - n_spaces);
  }
  const Tokens whole = codec.encode(context + continuation);
  Tokens ctx = codec.encode(context);
  const size_t n = std::min(ctx.size(), whole.size());
  return {std::move(ctx), Tokens(whole.begin() + n, whole.end())};
}

}  // namespace moelab::evals
