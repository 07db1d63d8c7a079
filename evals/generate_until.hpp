#pragma once
// Generation until stop sequences, as the harness's HF generate_until: the context is encoded with
// BOS and left-truncated to max_context - max_gen_toks tokens; generation stops at EOS, after
// max_gen_toks tokens, or once the decoded continuation contains a stop sequence; the text is
// decoded without special tokens and cut at the first stop sequence.
#include <string>
#include <vector>

#include "core/engine.hpp"
#include "core/sampling.hpp"
#include "evals/encode.hpp"

namespace moelab::evals {

struct GenerateOptions {
  std::vector<std::string> until;  // the decoded EOS string is added, as the harness does
  int max_gen_toks = 256;
};

struct Generation {
  std::string text;  // cut at the first stop sequence
  Tokens tokens;     // generated ids
  int context_tokens = 0;
};

Generation generate_until(Engine& engine, const TextCodec& codec, const std::string& context,
                          const GenerateOptions& opts, Sampler& sampler);

}  // namespace moelab::evals
