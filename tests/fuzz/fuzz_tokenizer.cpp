// libFuzzer harness: the bundled sentencepiece tokenizer (models/tiny-mixtral/tokenizer.model) on
// arbitrary bytes (encode, then decode and stream-decode the result) and arbitrary ids (decode, pieces,
// stream decoding). Ids outside the vocabulary must be a moelab::Error, never a read past the table.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string_view>
#include <vector>

#include "core/tokenizer.hpp"
#include "tests/fuzz/fuzz_util.hpp"

#ifndef MOELAB_FUZZ_TOKENIZER
#error "MOELAB_FUZZ_TOKENIZER (path of a tokenizer.model) must be defined"
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const moelab::Tokenizer tok(MOELAB_FUZZ_TOKENIZER);
  if (size == 0) return 0;
  const uint8_t mode = data[0] % 3;
  ++data, --size;
  moelab::fuzz::expect_only_moelab_errors([&] {
    if (mode == 0) {  // bytes: encode, decode back, stream-decode
      const std::string_view text(reinterpret_cast<const char*>(data), size);
      const std::vector<int32_t> ids = tok.encode(text, size % 2 == 0);
      for (int32_t id : ids)
        if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
      (void)tok.decode(ids);
      moelab::StreamDecoder sd(tok);
      for (int32_t id : ids) (void)sd.push(id);
      (void)sd.flush();
      return;
    }
    std::vector<int32_t> ids(size / 4);
    if (!ids.empty()) std::memcpy(ids.data(), data, ids.size() * 4);
    if (mode == 1) {  // raw ids: any int32, in or out of the vocabulary
      moelab::fuzz::expect_only_moelab_errors([&] { (void)tok.decode(ids); });
      for (int32_t id : ids) moelab::fuzz::expect_only_moelab_errors([&] { (void)tok.piece(id); });
      return;
    }
    // mode 2: ids folded into the vocabulary (reaches byte-fallback and control pieces), stream-decoded
    // after a context.
    const int v = tok.vocab_size();
    for (int32_t& id : ids) id = static_cast<int32_t>(static_cast<uint32_t>(id) % static_cast<uint32_t>(v));
    const size_t split = ids.size() / 2;
    moelab::StreamDecoder sd(tok, std::vector<int32_t>(ids.begin(), ids.begin() + split));
    for (size_t i = split; i < ids.size(); ++i) (void)sd.push(ids[i]);
    (void)sd.flush();
    (void)tok.decode(ids);
    for (int32_t id : ids) (void)tok.piece(id);
  });
  return 0;
}
