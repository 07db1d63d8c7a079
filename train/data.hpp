#pragma once
// Training data for `moelab finetune`: JSONL (optionally gzip-compressed), one example per line, in either
// of trl's two dataset kinds (never mixed in one file):
//   language modeling   {"text": "..."}
//   prompt-completion   {"prompt": "...", "completion": "..."}
// plus optional string metadata "domain" (selectable with DataOptions::domain) and "source" (ignored). Any
// other field, a missing or non-string field, an empty text or completion, or a line that is not a JSON
// object is a moelab::Error naming the file and the line. Blank lines are skipped.
//
// Tokenized as trl's SFTTrainer does for a causal LM whose tokenizer adds BOS (Mixtral's): BOS + the text's
// tokens + EOS; for prompt-completion, BOS + tokens(prompt + completion) + EOS with the first
// len(BOS + tokens(prompt)) positions masked out of the loss (trl's completion_only_loss, its default for
// prompt-completion data) unless completion_only_loss is off. Then truncated to max_seq_len tokens.
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
};

struct Dataset {
  std::string path;
  std::string kind;                        // "text" or "prompt-completion"
  std::vector<TrainSequence> sequences;    // in file order
  std::vector<std::string> domains;        // each sequence's "domain" ("" when the line has none)
  int64_t lines = 0;                       // examples read (before the domain filter)
  int64_t truncated = 0;                   // sequences cut to max_seq_len
  int64_t dropped_no_target = 0;           // left with no target token (a prompt filling max_seq_len): not kept
  int64_t target_tokens() const;
  int64_t tokens() const;
};

// Reads and tokenizes `path` (a .jsonl file, or gzip-compressed: detected from its first bytes). Throws
// moelab::Error for a missing file, a directory, a bad line ("PATH:LINE: ..."), or no examples left.
Dataset load_dataset(const std::string& path, const Tokenizer& tok, const DataOptions& opt);

// The order of `n` examples in epoch `epoch` (0-based): a permutation drawn from (seed, epoch) alone, with
// our own generator (splitmix64) and Fisher-Yates, so it is the same on every platform and after a resume.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace moelab::train
