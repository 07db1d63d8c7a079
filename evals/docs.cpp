#include "evals/docs.hpp"

#include <bzlib.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <sstream>

#include "core/ascii.hpp"
#include "core/error.hpp"
#include "evals/unicode_case.hpp"
#include "evals/unicode_space.hpp"
#include "core/json_bounded.hpp"

namespace moelab::evals {

using nlohmann::json;

namespace {

// Where the harness applies a Python str method or a regex to a document, the code below does what
// Python does on Unicode text: str.strip() and the regexes' \s take every str.isspace() character,
// capitalize() and lower() use the full Unicode mappings (evals/unicode_space.hpp, unicode_case.hpp).
// ASCII-only handling (core/ascii.hpp) is left for moelab's own parsing (blank JSONL lines, articles).

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t p = 0; (p = s.find(from, p)) != std::string::npos; p += to.size()) s.replace(p, from.size(), to);
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// ---- Reading files: plain, gzip (zlib) and bzip2 (libbz2), in-process. ----

// Decompressed eval data larger than this is refused (a decompression bomb must not exhaust memory).
constexpr size_t kMaxDecompressed = size_t(2) << 30;

std::string read_raw(const std::string& path) {
  // O_NONBLOCK: a FIFO named as data must not block in open(); fstat then refuses anything but a
  // regular file (directory, FIFO, device) with its kind named.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error(fmt::format("{}: cannot stat: {}", path, std::strerror(errno)));
  if (!S_ISREG(st.st_mode))
    throw Error(fmt::format("{}: not a regular file ({})", path,
                            S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket"));
  std::string out;
  out.reserve(size_t(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(fmt::format("{}: read error: {}", path, std::strerror(errno)));
    }
    if (n == 0) break;
    out.append(buf, size_t(n));
  }
  return out;
}

bool all_zero(const std::string& s, size_t from) {
  for (size_t i = from; i < s.size(); ++i)
    if (s[i] != 0) return false;
  return true;
}

// gzip, every member (as `gzip -dc`: concatenated members are one stream); zero padding after the
// last member is ignored, anything else after it is an error.
std::string gunzip(const std::string& path, const std::string& in) {
  auto magic_at = [&](size_t p) { return in.size() - p >= 2 && (unsigned char)in[p] == 0x1f && (unsigned char)in[p + 1] == 0x8b; };
  if (!magic_at(0)) throw Error(fmt::format("{}: not gzip data (no gzip header; is the file name's .gz right?)", path));
  std::string out;
  char buf[1 << 16];
  for (size_t next = 0; next < in.size();) {  // one gzip member per pass, starting at `next`
    z_stream z{};
    if (inflateInit2(&z, 15 + 16) != Z_OK) throw Error(fmt::format("{}: zlib could not start", path));
    struct End {
      z_stream* z;
      ~End() { inflateEnd(z); }
    } end{&z};
    size_t fed = next;  // input handed to zlib so far
    for (;;) {
      if (z.avail_in == 0 && fed < in.size()) {
        const size_t k = std::min<size_t>(in.size() - fed, size_t(1) << 20);
        z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data() + fed));
        z.avail_in = uInt(k);
        fed += k;
      }
      z.next_out = reinterpret_cast<Bytef*>(buf);
      z.avail_out = sizeof buf;
      const int rc = inflate(&z, Z_NO_FLUSH);
      if (rc == Z_NEED_DICT || rc == Z_DATA_ERROR || rc == Z_MEM_ERROR || rc == Z_STREAM_ERROR)
        throw Error(fmt::format("{}: corrupt gzip data ({}, near compressed byte {})", path,
                                z.msg ? z.msg : "inflate failed", fed - z.avail_in));
      out.append(buf, sizeof buf - z.avail_out);
      if (out.size() > kMaxDecompressed)
        throw Error(fmt::format("{}: decompresses to more than {} GiB; refusing", path, kMaxDecompressed >> 30));
      if (rc == Z_STREAM_END) break;
      if (z.avail_in == 0 && fed == in.size() && z.avail_out != 0)
        throw Error(fmt::format("{}: truncated gzip data (the compressed stream ends early)", path));
    }
    next = fed - z.avail_in;
    if (next < in.size() && !magic_at(next)) {
      if (all_zero(in, next)) break;
      throw Error(fmt::format("{}: corrupt gzip data (unexpected bytes after the compressed stream, at byte {})", path, next));
    }
  }
  return out;
}

// bzip2, every stream (as `bzip2 -dc`).
std::string bunzip2(const std::string& path, const std::string& in) {
  auto magic_at = [&](size_t p) { return in.size() - p >= 3 && in.compare(p, 3, "BZh") == 0; };
  if (!magic_at(0)) throw Error(fmt::format("{}: not bzip2 data (no bzip2 header; is the file name's .bz2 right?)", path));
  std::string out;
  char buf[1 << 16];
  for (size_t next = 0; next < in.size();) {
    bz_stream z{};
    if (BZ2_bzDecompressInit(&z, 0, 0) != BZ_OK) throw Error(fmt::format("{}: libbz2 could not start", path));
    struct End {
      bz_stream* z;
      ~End() { BZ2_bzDecompressEnd(z); }
    } end{&z};
    size_t fed = next;
    for (;;) {
      if (z.avail_in == 0 && fed < in.size()) {
        const size_t k = std::min<size_t>(in.size() - fed, size_t(1) << 20);
        z.next_in = const_cast<char*>(in.data() + fed);
        z.avail_in = unsigned(k);
        fed += k;
      }
      z.next_out = buf;
      z.avail_out = sizeof buf;
      const int rc = BZ2_bzDecompress(&z);
      if (rc != BZ_OK && rc != BZ_STREAM_END)
        throw Error(fmt::format("{}: corrupt bzip2 data ({}, near compressed byte {})", path,
                                rc == BZ_DATA_ERROR_MAGIC ? "bad stream header"
                                : rc == BZ_DATA_ERROR     ? "checksum or block error"
                                : rc == BZ_MEM_ERROR      ? "out of memory"
                                                          : "decompression failed",
                                fed - z.avail_in));
      out.append(buf, sizeof buf - z.avail_out);
      if (out.size() > kMaxDecompressed)
        throw Error(fmt::format("{}: decompresses to more than {} GiB; refusing", path, kMaxDecompressed >> 30));
      if (rc == BZ_STREAM_END) break;
      if (z.avail_in == 0 && fed == in.size() && z.avail_out != 0)
        throw Error(fmt::format("{}: truncated bzip2 data (the compressed stream ends early)", path));
    }
    next = fed - z.avail_in;
    if (next < in.size() && !magic_at(next)) {
      if (all_zero(in, next)) break;
      throw Error(fmt::format("{}: corrupt bzip2 data (unexpected bytes after the compressed stream, at byte {})", path, next));
    }
  }
  return out;
}

std::string read_all(const std::string& path) {
  if (ends_with(path, ".gz")) return gunzip(path, read_raw(path));
  if (ends_with(path, ".bz2")) return bunzip2(path, read_raw(path));
  return read_raw(path);
}

std::string strip_compression(std::string p) {
  for (const char* s : {".bz2", ".gz"})
    if (p.size() > strlen(s) && ends_with(p, s)) p.resize(p.size() - strlen(s));
  return p;
}

// Length of the valid UTF-8 prefix of s (s.size() when all of it is valid).
size_t valid_utf8_prefix(const std::string& s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const unsigned char c = (unsigned char)s[i];
    size_t len;
    uint32_t cp;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
    else return i;
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      const unsigned char cc = (unsigned char)s[i + k];
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return i;
    i += len;
  }
  return n;
}

// The text forms (HellaSwag 6-line, WikiText) are split into lines; each must be UTF-8 (the records
// are written back as JSON in --log-samples and --convert-to).
std::vector<std::string> text_lines(const std::string& text, const std::string& source, bool strip_cr) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t e = text.find('\n', start);
    if (e == std::string::npos) e = text.size();
    std::string l = text.substr(start, e - start);
    if (strip_cr && !l.empty() && l.back() == '\r') l.pop_back();
    if (const size_t v = valid_utf8_prefix(l); v != l.size())
      throw Error(fmt::format("{}:{}: not valid UTF-8 (byte {} of the line)", source, lines.size() + 1, v + 1));
    lines.push_back(std::move(l));
    start = e + 1;
  }
  return lines;
}

// ---- Record fields: presence, type and range, each failure naming the field. ----

std::string show(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

[[noreturn]] void field_error(const char* field, const std::string& problem) {
  throw Error(fmt::format("field \"{}\": {}", field, problem));
}

const json& need(const json& j, const char* field) {
  const auto it = j.find(field);
  if (it == j.end()) field_error(field, "missing");
  return *it;
}

std::string string_value(const json& v, const char* field) {
  if (!v.is_string()) field_error(field, fmt::format("expected a string, got {} {}", v.type_name(), show(v)));
  return v.get<std::string>();
}
std::string get_string(const json& j, const char* field) { return string_value(need(j, field), field); }

std::vector<std::string> get_strings(const json& j, const char* field, size_t min_count) {
  const json& v = need(j, field);
  if (!v.is_array()) field_error(field, fmt::format("expected an array of strings, got {} {}", v.type_name(), show(v)));
  if (v.size() < min_count)
    field_error(field, fmt::format("expected at least {} entr{}, got {}", min_count, min_count == 1 ? "y" : "ies", v.size()));
  std::vector<std::string> out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_string())
      field_error(field, fmt::format("entry {} is {} {}, not a string", i, v[i].type_name(), show(v[i])));
    out.push_back(v[i].get<std::string>());
  }
  return out;
}

std::string range_text(size_t n, const char* what) {
  return n == 0 ? fmt::format("there are no {}", what) : fmt::format("expected 0..{} for {} {}", n - 1, n, what);
}

// An index into n items: a JSON integer (not 1.7, not 1.0, not a string) in [0, n).
int get_index(const json& j, const char* field, size_t n, const char* what) {
  const json& v = need(j, field);
  if (!v.is_number_integer()) field_error(field, fmt::format("expected an integer, got {} {}", v.type_name(), show(v)));
  const bool neg = v.is_number_integer() && !v.is_number_unsigned() && v.get<int64_t>() < 0;
  if (neg || v.get<uint64_t>() >= n) field_error(field, fmt::format("{} is out of range ({})", show(v), range_text(n, what)));
  return int(v.get<uint64_t>());
}

// An index written as a decimal string ("2") or an integer.
int index_from_text(const std::string& s, const char* field, size_t n, const char* what) {
  int v = -1;
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size())
    field_error(field, fmt::format("expected an integer label, got {}", show(json(s))));
  if (v < 0 || size_t(v) >= n) field_error(field, fmt::format("{} is out of range ({})", show(json(s)), range_text(n, what)));
  return v;
}

void optional_string(const json& j, const char* field, std::string& out) {
  const auto it = j.find(field);
  if (it != j.end()) out = string_value(*it, field);
}

}  // namespace

// ---- The harness's text preprocessing, in linear time (no std::regex: its recursive matcher
// overflows the stack on long spans). Each function reproduces the regex it replaces exactly. ----

std::string hellaswag_preprocess(std::string text) {
  text = python_strip(text);
  replace_all(text, " [title]", ". ");
  // re.sub("\\[.*?\\]", "", text): each '[' through the first ']' after it, unless a '\n' comes first
  // (Python's '.' matches every character but '\n', '\r' included).
  std::string kept;
  kept.reserve(text.size());
  for (size_t i = 0, n = text.size(); i < n;) {
    if (text[i] != '[') {
      kept += text[i++];
      continue;
    }
    size_t j = i + 1;
    while (j < n && text[j] != ']' && text[j] != '\n') ++j;
    if (j < n && text[j] == ']') {
      i = j + 1;  // removed
    } else {
      // No ']' before j, so no '[' in [i, j) can match either: keep the span as it is.
      kept.append(text, i, j - i);
      i = j;
    }
  }
  // Python str.replace("  ", " "): one left-to-right pass, non-overlapping.
  std::string out;
  out.reserve(kept.size());
  for (size_t i = 0; i < kept.size(); ++i) {
    if (kept[i] == ' ' && i + 1 < kept.size() && kept[i + 1] == ' ') {
      out += ' ';
      ++i;
    } else {
      out += kept[i];
    }
  }
  return out;
}

namespace {

// re.sub(r"O\s*([^C]*?)\s*C", r"O\1C", s) for an opening O and closing C (O == C for quotes): each O
// pairs with the first C after it, and the white space just inside the pair (Python's \s, which is
// str.isspace(): the greedy \s* and the lazy group leave exactly the stripped inside) is removed.
std::string tighten_pairs(const std::string& s, char open, char close) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0, n = s.size(); i < n;) {
    if (s[i] != open) {
      out += s[i++];
      continue;
    }
    const size_t j = s.find(close, i + 1);
    if (j == std::string::npos) {  // no C after this O, hence after any later O either
      out.append(s, i, std::string::npos);
      break;
    }
    out += open;
    out += python_strip(std::string_view(s).substr(i + 1, j - i - 1));
    out += close;
    i = j + 1;
  }
  return out;
}

}  // namespace

std::string wikitext_detokenize(std::string s) {
  replace_all(s, "s '", "s'");
  {  // re.sub(r"/' [0-9]/", r"/'[0-9]/", s): the replacement is that literal text.
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0, n = s.size(); i < n;) {
      if (s[i] == '/' && i + 4 < n && s[i + 1] == '\'' && s[i + 2] == ' ' && is_ascii_digit(s[i + 3]) && s[i + 4] == '/') {
        out += "/'[0-9]/";
        i += 5;
      } else {
        out += s[i++];
      }
    }
    s = std::move(out);
  }
  replace_all(s, " @-@ ", "-");
  replace_all(s, " @,@ ", ",");
  replace_all(s, " @.@ ", ".");
  for (const char* p : {" : ", " ; ", " . ", " ! ", " ? ", " , "}) {
    std::string from = p, to = std::string(1, p[1]) + " ";
    replace_all(s, from, to);
  }
  s = tighten_pairs(s, '(', ')');
  s = tighten_pairs(s, '[', ']');
  s = tighten_pairs(s, '{', '}');
  s = tighten_pairs(s, '"', '"');
  s = tighten_pairs(s, '\'', '\'');
  replace_all(s, "= = = =", "====");
  replace_all(s, "= = =", "===");
  replace_all(s, "= =", "==");
  replace_all(s, " \xC2\xB0 ", "\xC2\xB0");
  replace_all(s, " \n", "\n");
  replace_all(s, "\n ", "\n");
  replace_all(s, " N ", " 1 ");
  replace_all(s, " 's", "'s");
  return s;
}

// regex_match(line, "^ = [^=].* = $"): " = ", one character other than '=', any characters other than
// '\n' and '\r', then " = " ending the line.
bool wikitext_is_article_heading(const std::string& l) {
  const size_t n = l.size();
  if (n < 7 || l.compare(0, 3, " = ") != 0 || l[3] == '=' || l.compare(n - 3, 3, " = ") != 0) return false;
  for (size_t k = 4; k < n - 3; ++k)
    if (l[k] == '\n' || l[k] == '\r') return false;
  return true;
}

// ---- Converters from public records. ----

Doc from_hellaswag_json(const json& j) {
  Doc d;
  // lm_eval/tasks/hellaswag/utils.py _process_doc: Python's str.capitalize(), full Unicode mappings.
  const std::string ctx = get_string(j, "ctx_a") + " " + python_capitalize(get_string(j, "ctx_b"));
  d.query = hellaswag_preprocess(get_string(j, "activity_label") + ": " + ctx);
  for (const auto& e : get_strings(j, "endings", 1)) d.choices.push_back(hellaswag_preprocess(e));
  const json& l = need(j, "label");
  d.gold = l.is_string() ? index_from_text(l.get<std::string>(), "label", d.choices.size(), "endings")
                         : get_index(j, "label", d.choices.size(), "endings");
  d.source = j;
  return d;
}

std::vector<Doc> from_hellaswag_text(const std::string& text, const std::string& source) {
  auto lines = text_lines(text, source, /*strip_cr=*/true);
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  if (lines.size() % 6 != 0)
    throw Error(fmt::format("{}: the HellaSwag text form has 6 lines per item (context, label, 4 endings), but there are "
                            "{} lines (the last item, from line {}, is incomplete)",
                            source, lines.size(), lines.size() / 6 * 6 + 1));
  std::vector<Doc> docs;
  for (size_t i = 0; i < lines.size(); i += 6) {
    Doc d;
    // "activity_label: ctx" with ctx_a and ctx_b already joined (ctx_b not re-capitalized).
    d.query = hellaswag_preprocess(lines[i]);
    try {
      d.gold = index_from_text(lines[i + 1], "label", 4, "endings");
    } catch (const Error& e) {
      throw Error(fmt::format("{}:{}: {}", source, i + 2, e.what()));
    }
    for (int k = 0; k < 4; ++k) d.choices.push_back(hellaswag_preprocess(lines[i + 2 + k]));
    d.source = {{"ctx", lines[i]}, {"label", d.gold}, {"endings", std::vector<std::string>(lines.begin() + i + 2, lines.begin() + i + 6)}};
    docs.push_back(std::move(d));
  }
  return docs;
}

Doc from_arc(const json& j) {
  // HF form {question, choices: {text, label}, answerKey} or AI2 form {question: {stem, choices: [{text, label}]}, answerKey}.
  Doc d;
  std::vector<std::string> labels;
  std::string q;
  const json& question = need(j, "question");
  if (question.is_object()) {
    q = get_string(question, "stem");
    const json& cs = need(question, "choices");
    if (!cs.is_array() || cs.empty()) field_error("choices", fmt::format("expected a non-empty array, got {}", show(cs)));
    for (const auto& c : cs) {
      if (!c.is_object()) field_error("choices", fmt::format("expected objects with text and label, got {}", show(c)));
      d.choices.push_back(get_string(c, "text"));
      labels.push_back(get_string(c, "label"));
    }
  } else {
    q = string_value(question, "question");
    const json& cs = need(j, "choices");
    if (!cs.is_object()) field_error("choices", fmt::format("expected an object with text and label, got {}", show(cs)));
    d.choices = get_strings(cs, "text", 1);
    labels = get_strings(cs, "label", 1);
    if (labels.size() != d.choices.size())
      field_error("choices", fmt::format("{} texts but {} labels", d.choices.size(), labels.size()));
  }
  for (size_t a = 0; a < labels.size(); ++a)
    for (size_t b = a + 1; b < labels.size(); ++b)
      if (labels[a] == labels[b]) field_error("choices", fmt::format("label {} appears twice", show(json(labels[a]))));
  d.query = "Question: " + q + "\nAnswer:";
  const std::string key = get_string(j, "answerKey");
  for (size_t i = 0; i < labels.size(); ++i)
    if (labels[i] == key) d.gold = int(i);
  if (d.gold < 0) field_error("answerKey", fmt::format("{} is not among the labels {}", show(json(key)), show(json(labels))));
  d.source = j;
  return d;
}

Doc from_mmlu(const json& j) {
  Doc d;
  const auto choices = get_strings(j, "choices", 4);
  if (choices.size() != 4) field_error("choices", fmt::format("expected 4 choices, got {}", choices.size()));
  d.query = python_strip(get_string(j, "question"));  // the template's {{question.strip()}}
  const char* L = "ABCD";
  for (int i = 0; i < 4; ++i) d.query += fmt::format("\n{}. {}", L[i], choices[size_t(i)]);
  d.query += "\nAnswer:";
  d.choices = {"A", "B", "C", "D"};
  const json& a = need(j, "answer");
  if (a.is_string()) {
    const std::string s = a.get<std::string>();
    if (s.size() != 1 || s[0] < 'A' || s[0] > 'D')
      field_error("answer", fmt::format("expected a letter A..D or an integer 0..3, got {}", show(a)));
    d.gold = s[0] - 'A';
  } else {
    d.gold = get_index(j, "answer", 4, "choices");
  }
  optional_string(j, "subject", d.subject);
  d.source = j;
  return d;
}

Doc from_winogrande(const json& j) {
  Doc d;
  const std::string s = get_string(j, "sentence");
  const size_t idx = s.find('_');
  if (idx == std::string::npos) field_error("sentence", "has no '_' blank");
  d.contexts = {s.substr(0, idx) + get_string(j, "option1"), s.substr(0, idx) + get_string(j, "option2")};
  d.continuation = python_strip(std::string_view(s).substr(idx + 1));  // doc_to_target's .strip()
  const json& a = need(j, "answer");
  if (a.is_string() && (a == "1" || a == "2")) d.gold = a == "1" ? 0 : 1;
  else if (a.is_number_integer() && (a == 1 || a == 2)) d.gold = a == 1 ? 0 : 1;
  else field_error("answer", fmt::format("expected \"1\" or \"2\", got {}", show(a)));
  d.source = j;
  return d;
}

Doc from_piqa(const json& j) {
  Doc d;
  d.query = "Question: " + get_string(j, "goal") + "\nAnswer:";
  d.choices = {get_string(j, "sol1"), get_string(j, "sol2")};
  d.gold = get_index(j, "label", 2, "solutions");
  d.source = j;
  return d;
}

Doc from_gsm8k(const json& j) {
  Doc d;
  d.text = "Question: " + get_string(j, "question") + "\nAnswer:";
  d.target = get_string(j, "answer");
  d.source = j;
  return d;
}

std::vector<Doc> from_wikitext(const std::string& text, const std::string& source) {
  // Articles start at a top-level heading line " = Title = " (not " = = Section = = ").
  const auto lines = text_lines(text, source, /*strip_cr=*/false);
  std::vector<Doc> docs;
  std::string cur;
  auto flush = [&] {
    if (strip_ascii_space(cur).empty()) return;
    Doc d;
    d.page = cur;
    d.text = wikitext_detokenize(cur);
    d.source = {{"page", cur}};  // the harness's document (EleutherAI/wikitext_document_level)
    docs.push_back(std::move(d));
  };
  for (size_t i = 0; i < lines.size(); ++i) {
    const bool is_heading = wikitext_is_article_heading(lines[i]) && i > 0 && lines[i - 1].empty();
    if (is_heading && !cur.empty()) flush(), cur.clear();
    cur += lines[i] + "\n";
  }
  flush();
  return docs;
}

json to_normalized(const Doc& d, TaskType type) {
  switch (type) {
    case TaskType::MultipleChoice:
      if (d.partial()) return {{"contexts", d.contexts}, {"continuation", d.continuation}, {"gold", d.gold}};
      return d.subject.empty() ? json{{"query", d.query}, {"choices", d.choices}, {"gold", d.gold}}
                               : json{{"query", d.query}, {"choices", d.choices}, {"gold", d.gold}, {"subject", d.subject}};
    case TaskType::Generate: return {{"text", d.text}, {"target", d.target}};
    case TaskType::Rolling: return {{"page", d.page}, {"text", d.text}};
    case TaskType::Code:
      return {{"task_id", d.task_id}, {"prompt", d.prompt}, {"test", d.test}, {"entry_point", d.entry_point}};
  }
  return {};
}

namespace {

std::string keys_of(const json& j) {
  std::string k;
  for (const auto& [key, v] : j.items()) k += (k.empty() ? "" : ", ") + key;
  return k.empty() ? "none" : k;
}

// The public form a named task reads, or "" for the generic tasks (form detected per record).
Doc from_public(const std::string& task, const json& j) {
  if (task == "hellaswag") return from_hellaswag_json(j);
  if (task == "arc_easy" || task == "arc_challenge") return from_arc(j);
  if (task == "mmlu") return from_mmlu(j);
  if (task == "winogrande") return from_winogrande(j);
  if (task == "piqa") return from_piqa(j);
  if (task == "gsm8k") return from_gsm8k(j);
  throw Error("no public form");
}

bool named_public_task(const std::string& task) {
  for (const char* t : {"hellaswag", "arc_easy", "arc_challenge", "mmlu", "winogrande", "piqa", "gsm8k"})
    if (task == t) return true;
  return false;
}

Doc from_record(const std::string& task, TaskType type, const json& j) {
  if (!j.is_object()) throw Error(fmt::format("a record must be a JSON object, got {} {}", j.type_name(), show(j)));
  // Normalized forms first (recognized by a field only they have); every field then checked.
  if (type == TaskType::MultipleChoice && j.contains("contexts")) {
    Doc d;
    d.contexts = get_strings(j, "contexts", 1);
    d.continuation = get_string(j, "continuation");
    d.gold = get_index(j, "gold", d.contexts.size(), "contexts");
    d.source = j;
    return d;
  }
  if (type == TaskType::MultipleChoice && (j.contains("query") || j.contains("gold"))) {
    Doc d;
    d.query = get_string(j, "query");
    d.choices = get_strings(j, "choices", 1);
    d.gold = get_index(j, "gold", d.choices.size(), "choices");
    optional_string(j, "subject", d.subject);
    d.source = j;
    return d;
  }
  if (type == TaskType::Generate && (j.contains("text") || j.contains("target"))) {
    Doc d;
    d.text = get_string(j, "text");
    d.target = get_string(j, "target");
    d.source = j;
    return d;
  }
  if (type == TaskType::Rolling && j.contains("text")) {
    Doc d;
    d.text = get_string(j, "text");
    d.page = d.text;
    optional_string(j, "page", d.page);
    d.source = j;
    return d;
  }
  if (type == TaskType::Code) {
    Doc d;
    d.task_id = get_string(j, "task_id");
    d.prompt = get_string(j, "prompt");
    d.test = get_string(j, "test");
    d.entry_point = get_string(j, "entry_point");
    d.source = j;
    return d;
  }
  // A named task reads its own public form (a missing field is named); the generic ones detect it.
  if (named_public_task(task)) return from_public(task, j);
  if (type == TaskType::MultipleChoice) {
    if (j.contains("ctx_a") && j.contains("endings")) return from_hellaswag_json(j);
    if (j.contains("answerKey")) return from_arc(j);
    if (j.contains("sentence") && j.contains("option1")) return from_winogrande(j);
    if (j.contains("goal") && j.contains("sol1")) return from_piqa(j);
    if (j.contains("choices") && j.contains("answer") && j.contains("question")) return from_mmlu(j);
    throw Error(fmt::format("{}: record is neither the normalized form (query, choices, gold; or contexts, continuation, "
                            "gold) nor a known public form (its fields: {})", task, keys_of(j)));
  }
  if (type == TaskType::Generate) {
    if (j.contains("question") && j.contains("answer")) return from_gsm8k(j);
    throw Error(fmt::format("{}: record is neither the normalized form (text, target) nor GSM8K's (question, answer) "
                            "(its fields: {})", task, keys_of(j)));
  }
  // Rolling: the harness's WikiText form, {page}.
  if (j.contains("page")) {
    Doc d;
    d.page = get_string(j, "page");
    d.text = wikitext_detokenize(d.page);
    d.source = j;
    return d;
  }
  throw Error(fmt::format("{}: record is neither the normalized form (text, optional page) nor WikiText's (page) "
                          "(its fields: {})", task, keys_of(j)));
}

}  // namespace

namespace {

// A header's "total": a placeholder Doc (about half a KiB) is allocated for each document of the split, so a
// one-line file asking for 1e8 of them took 50 GB. The largest split lm-eval draws few-shot examples from is a
// few hundred thousand documents (TriviaQA's train, 138k; MMLU's auxiliary_train, 100k); 2M bounds the
// placeholders near 1 GB.
constexpr uint64_t kMaxSparseTotal = 2'000'000;

bool is_sparse_header(const json& j) { return j.is_object() && j.contains("split") && j.contains("total"); }

// read_docs and read_fewshot_docs: JSONL records, or (allow_sparse) a sparse slice placed at its indices.
std::vector<Doc> read_records(const std::string& task, TaskType type, const std::string& path, bool allow_sparse,
                              std::string* split_out) {
  const std::string content = read_all(path);
  const std::string base = strip_compression(path);
  if (ends_with(base, ".txt")) {
    if (task == "hellaswag") return from_hellaswag_text(content, path);
    if (type == TaskType::Rolling) return from_wikitext(content, path);
    throw Error(fmt::format("{}: a .txt file is read only for hellaswag (6-line form) and rolling tasks", path));
  }
  std::vector<Doc> docs;
  bool first = true, sparse = false;
  std::string split;
  uint64_t total = 0;
  std::vector<size_t> indices;  // sparse: each record's index in the full split
  size_t line_no = 0;
  for (size_t start = 0; start < content.size();) {
    size_t e = content.find('\n', start);
    if (e == std::string::npos) e = content.size();
    const std::string line = content.substr(start, e - start);
    start = e + 1;
    ++line_no;
    if (strip_ascii_space(line).empty()) continue;
    json j;
    try {
      j = parse_json_bounded(line, fmt::format("{}:{}", path, line_no));
    } catch (const json::exception& ex) {
      std::string what = ex.what();
      if (const size_t p = what.find("] "); what.rfind("[json.exception", 0) == 0 && p != std::string::npos) what.erase(0, p + 2);
      throw Error(fmt::format("{}:{}: not valid JSON: {}", path, line_no, what));
    }
    try {
      if (first && is_sparse_header(j)) {
        if (!allow_sparse)
          throw Error("this is a sparse slice of a split (a header with \"split\" and \"total\"): only few-shot "
                      "examples are drawn from one; pass it with --fewshot-data");
        split = get_string(j, "split");
        if (split.empty()) field_error("split", "expected a split name, got \"\"");
        const json& t = need(j, "total");
        if (!t.is_number_unsigned() || t.get<uint64_t>() == 0 || t.get<uint64_t>() > kMaxSparseTotal)
          field_error("total", fmt::format("expected the split's size, an integer 1..{}, got {}", kMaxSparseTotal, show(t)));
        total = t.get<uint64_t>();
        sparse = true;
        first = false;
        continue;
      }
      first = false;
      if (sparse) {
        if (!j.is_object()) throw Error(fmt::format("a record must be a JSON object, got {} {}", j.type_name(), show(j)));
        const json& v = need(j, "index");
        if (!v.is_number_unsigned() || v.get<uint64_t>() >= total)
          field_error("index", fmt::format("expected the record's index in the {} split, an integer 0..{}, got {}", split,
                                           total - 1, show(v)));
        const size_t i = size_t(v.get<uint64_t>());
        if (!indices.empty() && i <= indices.back())
          field_error("index", fmt::format("{} is not above the previous record's {} (indices must increase)", i,
                                           indices.back()));
        json rec = j;
        rec.erase("index");
        docs.push_back(from_record(task, type, rec));
        docs.back().source = nlohmann::ordered_json::parse(line);
        docs.back().source.erase("index");
        indices.push_back(i);
      } else {
        docs.push_back(from_record(task, type, j));
        docs.back().source = nlohmann::ordered_json::parse(line);  // the keys in the file's order
      }
    } catch (const Error& ex) {
      throw Error(fmt::format("{}:{}: {}", path, line_no, ex.what()));
    } catch (const json::exception& ex) {  // not expected: every field is checked before use
      throw Error(fmt::format("{}:{}: {}", path, line_no, ex.what()));
    }
  }
  if (split_out) *split_out = split;
  if (!sparse) return docs;
  Doc gap;
  gap.absent_from = path;
  gap.absent_split = split;
  std::vector<Doc> placed(size_t(total), gap);
  for (size_t k = 0; k < docs.size(); ++k) placed[indices[k]] = std::move(docs[k]);
  return placed;
}

}  // namespace

std::vector<Doc> read_docs(const std::string& task, TaskType type, const std::string& path) {
  return read_records(task, type, path, /*allow_sparse=*/false, nullptr);
}

std::vector<Doc> read_fewshot_docs(const std::string& task, TaskType type, const std::string& path, std::string* split) {
  return read_records(task, type, path, /*allow_sparse=*/true, split);
}

}  // namespace moelab::evals
