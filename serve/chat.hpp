#pragma once
// Mixtral-Instruct's chat template (Mixtral-8x7B-Instruct-v0.1's tokenizer_config.json), built as token
// ids rather than rendered with Jinja:
//   <s>[INST] user [/INST]assistant</s>[INST] user [/INST]
// BOS and EOS are the special ids, never text; each text segment is encoded on its own (sentencepiece
// adds its word-boundary space in front of each, as transformers' legacy Llama tokenizer does after a
// special token). Roles must alternate user/assistant starting and ending with user; a leading system
// message is put in front of the first user message, separated by a blank line (the template itself has
// no system role).
#include <cstdint>
#include <vector>

#include "serve/request.hpp"

namespace moelab {
class Tokenizer;
}

namespace moelab::serve {

// Throws ApiError 400 (param "messages") for an order or role the template cannot express.
std::vector<int32_t> apply_chat_template(const Tokenizer& tok, const std::vector<ChatMessage>& messages);

}  // namespace moelab::serve
