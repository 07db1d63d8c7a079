#include "serve/chat.hpp"

#include <fmt/format.h>

#include "core/tokenizer.hpp"
#include "serve/api_error.hpp"

namespace moelab::serve {

std::vector<int32_t> apply_chat_template(const Tokenizer& tok, const std::vector<ChatMessage>& messages) {
  std::vector<ChatMessage> turns;
  std::string system;
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (m.role == "system") {
      if (i != 0) throw bad_field("messages", fmt::format("messages[{}]: a system message must come first", i));
      system = m.content;
    } else if (m.role == "user" || m.role == "assistant") {
      const bool want_user = turns.size() % 2 == 0;
      if ((m.role == "user") != want_user)
        throw bad_field("messages", fmt::format("messages[{}]: roles must alternate user/assistant/user/..., starting "
                                                "with user (after an optional system message)",
                                                i));
      turns.push_back(m);
    } else {
      throw bad_field(fmt::format("messages[{}].role", i),
                      fmt::format("messages[{}].role must be system, user or assistant, got \"{}\"", i, m.role));
    }
  }
  if (turns.empty()) throw bad_field("messages", "'messages' needs at least one user message");
  if (turns.back().role != "user") throw bad_field("messages", "the last message must be the user's");
  if (!system.empty()) turns.front().content = system + "\n\n" + turns.front().content;
  std::vector<int32_t> ids;
  if (tok.bos_id() >= 0) ids.push_back(tok.bos_id());
  for (const auto& t : turns) {
    const auto seg = tok.encode(t.role == "user" ? "[INST] " + t.content + " [/INST]" : t.content, false);
    ids.insert(ids.end(), seg.begin(), seg.end());
    if (t.role == "assistant" && tok.eos_id() >= 0) ids.push_back(tok.eos_id());
  }
  return ids;
}

}  // namespace moelab::serve
