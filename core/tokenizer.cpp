#include "core/tokenizer.hpp"

#include <fmt/format.h>
#include <sentencepiece_processor.h>

#include <cctype>
#include <cstdlib>
#include <filesystem>

#include "core/error.hpp"
#include "core/regular_file.hpp"

namespace moelab {

Tokenizer::Tokenizer(const std::string& model_path)
    : path_(model_path), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  if (path_type(model_path) == std::filesystem::file_type::not_found) throw Error(fmt::format("{}: tokenizer model not found", model_path));
  // Read here (a FIFO or a directory is refused, never blocks), then parsed from memory.
  const std::string bytes = read_regular_file(model_path, "tokenizer model", 1u << 30);
  const auto status = sp_->LoadFromSerializedProto(bytes);
  if (!status.ok())
    throw Error(fmt::format("{}: not a sentencepiece model ({})", model_path, status.ToString()));
}

Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) throw Error(fmt::format("{}: encode failed ({})", path_, status.ToString()));
  std::vector<int32_t> out;
  out.reserve(ids.size() + 1);
  if (add_bos && bos_id() >= 0) out.push_back(bos_id());
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<int> v(ids.begin(), ids.end());
  for (int id : v)
    if (id < 0 || id >= vocab_size())
      throw Error(fmt::format("{}: token id {} outside the vocabulary of {}", path_, id, vocab_size()));
  std::string text;
  const auto status = sp_->Decode(v, &text);
  if (!status.ok()) throw Error(fmt::format("{}: decode failed ({})", path_, status.ToString()));
  return text;
}

std::string Tokenizer::piece(int32_t id) const {
  // sentencepiece indexes its piece table unchecked (protobuf aborts the process on a negative id).
  if (id < 0 || id >= vocab_size())
    throw Error(fmt::format("{}: token id {} outside the vocabulary of {}", path_, id, vocab_size()));
  return sp_->IdToPiece(id);
}

std::string Tokenizer::token_bytes(int32_t id) const {
  const std::string p = piece(id);  // checks the range
  if (sp_->IsControl(id)) return {};
  if (sp_->IsUnknown(id)) {
    std::string text;
    sp_->Decode(std::vector<int>{id}, &text).IgnoreError();
    return text;
  }
  if (sp_->IsByte(id) && p.size() == 6 && p.rfind("<0x", 0) == 0 && p[5] == '>' && std::isxdigit((unsigned char)p[3]) &&
      std::isxdigit((unsigned char)p[4]))
    return std::string(1, char(std::strtol(p.substr(3, 2).c_str(), nullptr, 16)));
  static const std::string kSpace = "\xE2\x96\x81";  // U+2581, sentencepiece's word boundary
  std::string out;
  for (size_t i = 0; i < p.size();) {
    if (p.compare(i, kSpace.size(), kSpace) == 0) {
      out += ' ';
      i += kSpace.size();
    } else {
      out += p[i++];
    }
  }
  return out;
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }
int Tokenizer::unk_id() const { return sp_->unk_id(); }

namespace {
// Length of the prefix of `s` that does not end inside a multi-byte UTF-8 sequence or on the
// replacement character sentencepiece emits for an incomplete byte-fallback sequence.
size_t complete_prefix(const std::string& s) {
  // sentencepiece decodes each byte of an unfinished byte-fallback sequence to U+FFFD; a UTF-8
  // character has at most 3 bytes after its first, so at most 3 trailing U+FFFD are held back.
  static const std::string kReplacement = "\xEF\xBF\xBD";
  size_t n = s.size();
  for (int held = 0; held < 3 && n >= 3 && s.compare(n - 3, 3, kReplacement) == 0; ++held) n -= 3;
  return n;
}
}  // namespace

StreamDecoder::StreamDecoder(const Tokenizer& tok, std::vector<int32_t> context)
    : tok_(tok), ids_(std::move(context)) {
  emitted_ = complete_prefix(tok_.decode(ids_));
}

std::string StreamDecoder::push(int32_t id) {
  ids_.push_back(id);
  const std::string text = tok_.decode(ids_);
  const size_t ready = complete_prefix(text);
  if (ready <= emitted_) return {};
  std::string out = text.substr(emitted_, ready - emitted_);
  emitted_ = ready;
  return out;
}

std::string StreamDecoder::flush() {
  const std::string text = tok_.decode(ids_);
  std::string out = emitted_ < text.size() ? text.substr(emitted_) : std::string();
  emitted_ = text.size();
  return out;
}

}  // namespace moelab
