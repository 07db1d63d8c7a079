#pragma once
// Tokenization the way lm-evaluation-harness 0.4.9.2 tokenizes for a Hugging Face causal model
// (lm_eval/api/model.py TemplateLM._encode_pair and loglikelihood, lm_eval/models/huggingface.py
// tok_encode / tok_decode):
// - every string is encoded with the tokenizer's default special tokens, which for the Llama /
//   Mistral sentencepiece tokenizer means BOS first;
// - a (context, continuation) pair: trailing whitespace of the context (Python's rstrip(): Unicode
//   white space) moves to the front of the continuation, then context+continuation is encoded whole and
//   split at the encoded context's length;
// - an empty context becomes [BOS] (the prefix token), unless the continuation starts with it;
// - decoding (generated text) follows the slow LlamaTokenizer: one leading "▁" of the first piece is
//   dropped before sentencepiece decodes, special tokens are skipped.
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moelab {
class Tokenizer;
}

namespace moelab::evals {

using Tokens = std::vector<int32_t>;

// What scoring needs from a tokenizer; tests can supply a toy one.
struct TextCodec {
  std::function<Tokens(std::string_view)> encode;  // with the default special tokens (BOS)
  std::function<Tokens(std::string_view)> encode_plain;  // no special tokens
  std::function<std::string(const Tokens&)> decode;  // as tok_decode(skip_special_tokens=True)
  int32_t prefix_token = 1;  // BOS
  int32_t eos_token = 2;

  static TextCodec from(const Tokenizer& tok);
};

// (context tokens, continuation tokens) of one loglikelihood request.
std::pair<Tokens, Tokens> encode_pair(const TextCodec& codec, std::string context, std::string continuation);

}  // namespace moelab::evals
