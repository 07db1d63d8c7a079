#pragma once
// Training data for `moelab finetune`: JSONL (optionally gzip-compressed), one example per line, in one of
// trl's four dataset kinds (never mixed in one file):
//   language modeling                  {"text": "..."}
//   prompt-completion                  {"prompt": "...", "completion": "..."}
//   conversational language modeling   {"messages": [{"role": "user", "content": "..."}, ...]}
//   conversational prompt-completion   {"prompt": [messages...], "completion": [messages...]}
// plus optional string metadata "domain" (selectable with DataOptions::domain) and "source" (ignored). Any
// other field, a missing or non-string field, an empty text or completion, or a line that is not a JSON
// object is a moelab::Error naming the file and the line. Blank lines are skipped.
//
// Tokenized as trl's SFTTrainer does for a causal LM whose tokenizer adds BOS (Mixtral's): BOS + the text's
// tokens + EOS; for prompt-completion, BOS + tokens(prompt + completion) + EOS with the first
// len(BOS + tokens(prompt)) positions masked out of the loss (trl's completion_only_loss, its default for
// prompt-completion data) unless completion_only_loss is off. Then truncated to max_seq_len tokens.
//
// Conversational lines are rendered with Mixtral-8x7B-Instruct-v0.1's chat template (its tokenizer_config.json;
// the Jinja text is in scripts/make_chat_data_fixture.py) and tokenized as transformers' apply_chat_template
// does, which is what trl calls:
//   - A message is {"role", "content"}, both strings; role is "user", "assistant" or "system"; no other field.
//   - Text: BOS, then for each message after an optional leading system message, in turn,
//       user       " [INST] " + content + " [/INST]"   (the first one as " [INST] " + system + "\n\n" + content ...)
//       assistant  " " + content + EOS
//     Roles must alternate user/assistant/... starting with user; a system message anywhere but first, another
//     role, or only a system message is an error naming the line and the message ("messages[2]"), where the
//     template raises. A conversation may end with either role, as the template allows.
//   - Tokens: as transformers' apply_chat_template tokenizes that text with Mixtral-8x7B-Instruct-v0.1's tokenizer
//     (LlamaTokenizer with legacy=False, as its tokenizer has been since it was made to agree 1-to-1 with
//     mistral_common, Mistral's reference): BOS and EOS are their ids, and each piece of text between them
//     is encoded by sentencepiece with no word-boundary space of its own, the template's leading space
//     standing for it: "<s>", "▁[", "INST", "]", "▁Hi", ..., "▁[", "/", "INST", "]", "▁Hello", "</s>". For
//     messages with content this equals mistral_common's V1 rule (BOS + encode("[INST] " + user + " [/INST]")
//     + encode(answer) + EOS ...). No BOS/EOS beyond the template's; no EOS appended (trl adds one only to
//     non-conversational data). The text of a special token ("<s>", "</s>", "<unk>") inside a message is an
//     error: transformers would read it as that token (an answer's "</s>" becoming EOS, silently, in trl).
//   - Loss: "messages" learns every token (trl's default: assistant_only_loss is off, and Mixtral's template has
//     no {% generation %} marks to find assistant spans); conversational prompt-completion masks the first
//     len(tokens(render(prompt))) positions when completion_only_loss is on (trl's default for prompt-completion),
//     so with the usual completion [{"role": "assistant", ...}] the targets are the answer's tokens and its EOS.
//     The prompt may be only a system message (it renders as BOS alone).
// The first position of every sequence is never a target (nothing predicts it). tests/test_train_data.cpp checks
// the ids and targets against transformers (tests/fixtures/train/chat_data.json).
#include <cstdint>
#include <string>
#include <vector>

#include "core/tokenizer.hpp"
#include "train/lora_model.hpp"

namespace moelab::train {

struct DataOptions {
  int64_t max_seq_len = 1024;      // trl SFTConfig.max_length
  bool completion_only_loss = true;
  std::string domain;              // keep only lines whose "domain" is this ("": every line)
  bool packing = false;            // trl SFTConfig.packing (its "bfd" strategy): see Dataset::bins
};

struct Dataset {
  std::string path;
  std::string kind;  // "text", "prompt-completion", "conversational" or "conversational prompt-completion"
  std::vector<TrainSequence> sequences;    // in file order
  std::vector<std::string> domains;        // each sequence's "domain" ("" when the line has none)
  int64_t lines = 0;                       // examples read (before the domain filter)
  int64_t truncated = 0;                   // sequences cut to max_seq_len
  int64_t dropped_no_target = 0;           // left with no target token (a prompt filling max_seq_len): not kept
  // The training units: indices into `sequences`, one unit per micro-batch slot. Without packing, one sequence
  // each ({0}, {1}, ...). With DataOptions::packing, trl's best-fit-decreasing bins (pack_bfd over the sequence
  // lengths, capacity max_seq_len): whole examples, never split, at most max_seq_len tokens a bin. A bin's
  // examples stay separate sequences, each attending only to itself with positions from 0: that is what trl's
  // packed row computes with position_ids reset per example and a varlen (flash) attention, so a step over B
  // bins equals trl's step over B packed rows with no attention mask to add.
  std::vector<std::vector<int64_t>> bins;
  int64_t target_tokens() const;
  int64_t tokens() const;
};

// Reads and tokenizes `path` (a .jsonl file, or gzip-compressed: detected from its first bytes). Throws
// moelab::Error for a missing file, a directory, a bad line ("PATH:LINE: ..."), or no examples left.
Dataset load_dataset(const std::string& path, const Tokenizer& tok, const DataOptions& opt);

// Tokenizing a long line costs sentencepiece hundreds of bytes of memory per byte of text, so load_dataset
// tokenizes only a prefix of each text big enough for max_seq_len tokens: with B = max_token_bytes(tok) (the
// most bytes of text one token stands for), the first N tokens come from at most N * B bytes, and the text is
// cut before a lone space between N * B and 2 * N * B bytes in (a word boundary no sentencepiece piece spans,
// so the tokens before it do not depend on what follows), or at 2 * N * B bytes inside one longer word. Texts
// up to 2 * N * B bytes are tokenized whole. tests/test_train_data.cpp checks on the bundled corpus that the
// prefix's first N tokens are the whole text's.
size_t max_token_bytes(const Tokenizer& tok);
std::string_view tokenization_prefix(std::string_view text, int64_t max_tokens, size_t token_bytes);

// trl's best-fit-decreasing packing (trl.data_utils.pack_dataset, strategy "bfd") of items of the given lengths
// (each 1..capacity) into bins of `capacity`: items by decreasing length (ties in index order), each into the
// bin with the least space that still fits it (ties: the bin that reached that space first), else a new bin.
// Returns the bins in creation order, each with its items in insertion order. Throws for a length outside
// [1, capacity].
std::vector<std::vector<int64_t>> pack_bfd(const std::vector<int64_t>& lengths, int64_t capacity);

// The order of `n` examples in epoch `epoch` (0-based): a permutation drawn from (seed, epoch) alone, with
// our own generator (splitmix64) and Fisher-Yates, so it is the same on every platform and after a resume.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace moelab::train
