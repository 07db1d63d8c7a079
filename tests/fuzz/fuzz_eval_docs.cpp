// libFuzzer harness: every eval data reader and converter (evals/docs.hpp). The first input byte picks
// the task, the second the container; the rest is the file's content:
//   0 .jsonl   1 .txt   2 .jsonl.gz (bytes as given)   3 .jsonl.bz2 (bytes as given)
//   4 .jsonl.gz and 5 .jsonl.bz2 and 6 .txt.gz (content compressed here first, so the fuzzer reaches
//     the records behind the decompressor)
//   7 the converters called directly: each line parsed as JSON and given to every from_* converter;
//     the HellaSwag/WikiText text forms and the preprocessing functions on the whole content.
// Every document read is also turned back into the normalized form. Bad data must be a moelab::Error.
#include <bzlib.h>
#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "evals/docs.hpp"
#include "evals/tasks.hpp"
#include "tests/fuzz/fuzz_util.hpp"

namespace {

const char* const kTasks[] = {"hellaswag", "arc_easy",  "arc_challenge",   "mmlu",     "winogrande", "piqa",
                              "gsm8k",     "humaneval", "wikitext",        "multiple_choice", "generate",   "rolling"};
constexpr size_t kNumTasks = sizeof(kTasks) / sizeof(kTasks[0]);

std::string gzip(const std::string& in) {
  z_stream z{};
  if (deflateInit2(&z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) __builtin_trap();
  std::string out(deflateBound(&z, in.size()) + 64, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END) __builtin_trap();
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

std::string bzip2(const std::string& in) {
  unsigned int len = static_cast<unsigned int>(in.size() + in.size() / 100 + 1024);
  std::string out(len, '\0');
  if (BZ2_bzBuffToBuffCompress(out.data(), &len, const_cast<char*>(in.data()), static_cast<unsigned int>(in.size()),
                               1, 0, 0) != BZ_OK)
    __builtin_trap();
  out.resize(len);
  return out;
}

// Documents from read_docs must serialize as they are (--log-samples writes them): read_docs checks
// UTF-8, so a json::type_error here is a bug. The text converters called directly take any bytes, so
// their documents are serialized with invalid UTF-8 replaced.
void normalize_all(const std::vector<moelab::evals::Doc>& docs, moelab::evals::TaskType type, bool strict = true) {
  for (const auto& d : docs)
    (void)moelab::evals::to_normalized(d, type).dump(-1, ' ', false,
                                                      strict ? nlohmann::json::error_handler_t::strict
                                                             : nlohmann::json::error_handler_t::replace);
}

template <class F>
void each(F&& f) {
  moelab::fuzz::expect_only_moelab_errors(f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moelab::evals;
  if (size < 2 || size > (1 << 20)) return 0;
  const std::string task = kTasks[data[0] % kNumTasks];
  const uint8_t container = data[1] % 8;
  const std::string content(reinterpret_cast<const char*>(data + 2), size - 2);
  const TaskType type = task_spec(task).type;

  if (container == 7) {
    for (size_t start = 0; start <= content.size();) {
      size_t e = content.find('\n', start);
      if (e == std::string::npos) e = content.size();
      const std::string line = content.substr(start, e - start);
      start = e + 1;
      // Lines that are not JSON are the caller's problem (read_docs reports them); the converters
      // take parsed JSON of any shape.
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) continue;
      each([&] { normalize_all({from_hellaswag_json(j)}, TaskType::MultipleChoice); });
      each([&] { normalize_all({from_arc(j)}, TaskType::MultipleChoice); });
      each([&] { normalize_all({from_mmlu(j)}, TaskType::MultipleChoice); });
      each([&] { normalize_all({from_winogrande(j)}, TaskType::MultipleChoice); });
      each([&] { normalize_all({from_piqa(j)}, TaskType::MultipleChoice); });
      each([&] { normalize_all({from_gsm8k(j)}, TaskType::Generate); });
    }
    each([&] { normalize_all(from_hellaswag_text(content), TaskType::MultipleChoice, false); });
    each([&] { normalize_all(from_wikitext(content), TaskType::Rolling, false); });
    each([&] { (void)hellaswag_preprocess(content); });
    each([&] { (void)wikitext_detokenize(content); });
    each([&] { (void)wikitext_is_article_heading(content); });
    return 0;
  }

  static const char* const kNames[] = {"data.jsonl",    "data.txt",      "data.jsonl.gz", "data.jsonl.bz2",
                                       "data.jsonl.gz", "data.jsonl.bz2", "data.txt.gz"};
  std::string bytes = content;
  if (container == 4 || container == 6) bytes = gzip(content);
  if (container == 5) bytes = bzip2(content);
  const std::string path = moelab::fuzz::write_temp(kNames[container], reinterpret_cast<const uint8_t*>(bytes.data()),
                                                    bytes.size());
  each([&] { normalize_all(read_docs(task, type, path), type); });
  return 0;
}
