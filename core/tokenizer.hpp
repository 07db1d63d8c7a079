#pragma once
// sentencepiece tokenizer.model (Mixtral / Mistral v1: BPE with byte fallback). BOS/EOS/UNK ids come
// from the model itself.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace moelab {

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);  // throws moelab::Error naming the file
  ~Tokenizer();

  std::vector<int32_t> encode(std::string_view text, bool add_bos = true) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string piece(int32_t id) const;  // an id outside the vocabulary throws moelab::Error (as decode)
  // The bytes `id` stands for inside a decoded text: "" for a control token (BOS, EOS), the byte of a
  // byte-fallback piece ("<0x0A>"), sentencepiece's surface for the unknown token, else the piece with each
  // "\u2581" as a space. (decode() also drops the one leading space of a text's first piece.)
  std::string token_bytes(int32_t id) const;
  int vocab_size() const;
  int bos_id() const;
  int eos_id() const;
  int unk_id() const;

 private:
  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

// Turns generated ids into text as they arrive. Decoding piece by piece would lose the leading-space
// rule and split multi-byte characters made of byte-fallback pieces, so it decodes the whole sequence
// and emits only the new, complete suffix.
class StreamDecoder {
 public:
  // `context` (e.g. the prompt) is decoded but not emitted, so the first generated piece keeps its
  // leading space the way it would inside the full text.
  explicit StreamDecoder(const Tokenizer& tok, std::vector<int32_t> context = {});
  std::string push(int32_t id);  // text that became final with this id (may be empty)
  std::string flush();           // whatever is still held back

 private:
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;
  size_t emitted_ = 0;  // bytes of decode(ids_) already returned
};

}  // namespace moelab
