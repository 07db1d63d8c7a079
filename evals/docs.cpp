#include "evals/docs.hpp"

#include <fmt/format.h>

#include <cctype>
#include <cstdio>
#include <fstream>
#include <regex>
#include <sstream>

#include "core/error.hpp"

namespace moelab::evals {

using nlohmann::json;

namespace {

std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace((unsigned char)s[a])) ++a;
  while (b > a && std::isspace((unsigned char)s[b - 1])) --b;
  return s.substr(a, b - a);
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t p = 0; (p = s.find(from, p)) != std::string::npos; p += to.size()) s.replace(p, from.size(), to);
}

// Python str.capitalize() for ASCII: first character upper, the rest lower.
std::string capitalize(std::string s) {
  for (size_t i = 0; i < s.size(); ++i) s[i] = char(i == 0 ? std::toupper((unsigned char)s[i]) : std::tolower((unsigned char)s[i]));
  return s;
}

std::string read_all(const std::string& path) {
  auto ends = [&](const std::string& suf) { return path.size() >= suf.size() && path.compare(path.size() - suf.size(), suf.size(), suf) == 0; };
  if (ends(".bz2") || ends(".gz")) {
    std::ifstream probe(path);
    if (!probe) throw Error(fmt::format("{}: cannot open", path));
    std::string cmd = std::string(ends(".bz2") ? "bzip2 -dc " : "gzip -dc ") + "'" + path + "'";
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) throw Error(fmt::format("{}: cannot run {}", path, cmd));
    std::string out;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    if (pclose(p) != 0) throw Error(fmt::format("{}: decompression failed", path));
    return out;
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(fmt::format("{}: cannot open", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string strip_compression(std::string p) {
  for (const char* s : {".bz2", ".gz"})
    if (p.size() > strlen(s) && p.compare(p.size() - strlen(s), strlen(s), s) == 0) p.resize(p.size() - strlen(s));
  return p;
}

}  // namespace

std::string hellaswag_preprocess(std::string text) {
  text = strip(text);
  replace_all(text, " [title]", ". ");
  static const std::regex brackets(R"(\[.*?\])");
  text = std::regex_replace(text, brackets, "");
  // Python str.replace("  ", " "): one left-to-right pass, non-overlapping.
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ' ' && i + 1 < text.size() && text[i + 1] == ' ') {
      out += ' ';
      ++i;
    } else {
      out += text[i];
    }
  }
  return out;
}

Doc from_hellaswag_json(const json& j) {
  Doc d;
  const std::string ctx = j.at("ctx_a").get<std::string>() + " " + capitalize(j.at("ctx_b").get<std::string>());
  d.query = hellaswag_preprocess(j.at("activity_label").get<std::string>() + ": " + ctx);
  for (const auto& e : j.at("endings")) d.choices.push_back(hellaswag_preprocess(e.get<std::string>()));
  const auto& l = j.at("label");
  d.gold = l.is_string() ? std::stoi(l.get<std::string>()) : l.get<int>();
  d.source = j;
  return d;
}

std::vector<Doc> from_hellaswag_text(const std::string& text) {
  std::vector<std::string> lines;
  std::stringstream ss(text);
  for (std::string l; std::getline(ss, l);) {
    if (!l.empty() && l.back() == '\r') l.pop_back();
    lines.push_back(l);
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  if (lines.size() % 6 != 0) throw Error("hellaswag text form: line count is not a multiple of 6");
  std::vector<Doc> docs;
  for (size_t i = 0; i < lines.size(); i += 6) {
    Doc d;
    // "activity_label: ctx" with ctx_a and ctx_b already joined (ctx_b not re-capitalized).
    d.query = hellaswag_preprocess(lines[i]);
    d.gold = std::stoi(lines[i + 1]);
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
  if (j.at("question").is_object()) {
    q = j["question"].at("stem");
    for (const auto& c : j["question"].at("choices")) d.choices.push_back(c.at("text")), labels.push_back(c.at("label"));
  } else {
    q = j.at("question");
    d.choices = j.at("choices").at("text").get<std::vector<std::string>>();
    labels = j.at("choices").at("label").get<std::vector<std::string>>();
  }
  d.query = "Question: " + q + "\nAnswer:";
  const std::string key = j.at("answerKey");
  for (size_t i = 0; i < labels.size(); ++i)
    if (labels[i] == key) d.gold = int(i);
  if (d.gold < 0) throw Error(fmt::format("arc: answerKey {} is not among the labels", key));
  d.source = j;
  return d;
}

Doc from_mmlu(const json& j) {
  Doc d;
  const auto choices = j.at("choices").get<std::vector<std::string>>();
  if (choices.size() != 4) throw Error("mmlu: expected 4 choices");
  d.query = strip(j.at("question").get<std::string>());
  const char* L = "ABCD";
  for (int i = 0; i < 4; ++i) d.query += fmt::format("\n{}. {}", L[i], choices[size_t(i)]);
  d.query += "\nAnswer:";
  d.choices = {"A", "B", "C", "D"};
  const auto& a = j.at("answer");
  d.gold = a.is_string() ? int(a.get<std::string>()[0] - 'A') : a.get<int>();
  d.subject = j.value("subject", "");
  d.source = j;
  return d;
}

Doc from_winogrande(const json& j) {
  Doc d;
  const std::string s = j.at("sentence");
  const size_t idx = s.find('_');
  if (idx == std::string::npos) throw Error("winogrande: sentence has no '_'");
  d.contexts = {s.substr(0, idx) + j.at("option1").get<std::string>(), s.substr(0, idx) + j.at("option2").get<std::string>()};
  d.continuation = strip(s.substr(idx + 1));
  const auto& a = j.at("answer");
  const std::string ans = a.is_string() ? a.get<std::string>() : std::to_string(a.get<int>());
  d.gold = ans == "1" ? 0 : ans == "2" ? 1 : -1;
  d.source = j;
  return d;
}

Doc from_piqa(const json& j) {
  Doc d;
  d.query = "Question: " + j.at("goal").get<std::string>() + "\nAnswer:";
  d.choices = {j.at("sol1"), j.at("sol2")};
  d.gold = j.at("label").get<int>();
  d.source = j;
  return d;
}

Doc from_gsm8k(const json& j) {
  Doc d;
  d.text = "Question: " + j.at("question").get<std::string>() + "\nAnswer:";
  d.target = j.at("answer");
  d.source = j;
  return d;
}

std::string wikitext_detokenize(std::string s) {
  replace_all(s, "s '", "s'");
  s = std::regex_replace(s, std::regex(R"(/' [0-9]/)"), "/'[0-9]/");
  replace_all(s, " @-@ ", "-");
  replace_all(s, " @,@ ", ",");
  replace_all(s, " @.@ ", ".");
  for (const char* p : {" : ", " ; ", " . ", " ! ", " ? ", " , "}) {
    std::string from = p, to = std::string(1, p[1]) + " ";
    replace_all(s, from, to);
  }
  s = std::regex_replace(s, std::regex(R"(\(\s*([^\)]*?)\s*\))"), "($1)");
  s = std::regex_replace(s, std::regex(R"(\[\s*([^\]]*?)\s*\])"), "[$1]");
  s = std::regex_replace(s, std::regex(R"(\{\s*([^}]*?)\s*\})"), "{$1}");
  s = std::regex_replace(s, std::regex(R"("\s*([^"]*?)\s*")"), "\"$1\"");
  s = std::regex_replace(s, std::regex(R"('\s*([^']*?)\s*')"), "'$1'");
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

std::vector<Doc> from_wikitext(const std::string& text) {
  // Articles start at a top-level heading line " = Title = " (not " = = Section = = ").
  static const std::regex heading(R"(^ = [^=].* = $)");
  std::vector<std::string> lines;
  std::stringstream ss(text);
  for (std::string l; std::getline(ss, l);) lines.push_back(l);
  std::vector<Doc> docs;
  std::string cur;
  auto flush = [&] {
    if (strip(cur).empty()) return;
    Doc d;
    d.page = cur;
    d.text = wikitext_detokenize(cur);
    docs.push_back(std::move(d));
  };
  for (size_t i = 0; i < lines.size(); ++i) {
    const bool is_heading = std::regex_match(lines[i], heading) && i > 0 && lines[i - 1].empty();
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

Doc from_record(const std::string& task, TaskType type, const json& j) {
  // Normalized forms first.
  if (type == TaskType::MultipleChoice && j.contains("contexts")) {
    Doc d;
    d.contexts = j.at("contexts").get<std::vector<std::string>>();
    d.continuation = j.at("continuation");
    d.gold = j.at("gold");
    d.source = j;
    return d;
  }
  if (type == TaskType::MultipleChoice && j.contains("query") && j.contains("choices") && j.contains("gold")) {
    Doc d;
    d.query = j.at("query");
    d.choices = j.at("choices").get<std::vector<std::string>>();
    d.gold = j.at("gold");
    d.subject = j.value("subject", "");
    d.source = j;
    return d;
  }
  if (type == TaskType::Generate && j.contains("text") && j.contains("target")) {
    Doc d;
    d.text = j.at("text");
    d.target = j.at("target");
    d.source = j;
    return d;
  }
  if (type == TaskType::Rolling && j.contains("text")) {
    Doc d;
    d.text = j.at("text");
    d.page = j.value("page", d.text);
    d.source = j;
    return d;
  }
  if (type == TaskType::Code) {
    Doc d;
    d.task_id = j.at("task_id");
    d.prompt = j.at("prompt");
    d.test = j.at("test");
    d.entry_point = j.at("entry_point");
    d.source = j;
    return d;
  }
  // Public forms.
  if (j.contains("ctx_a") && j.contains("endings")) return from_hellaswag_json(j);
  if (j.contains("answerKey")) return from_arc(j);
  if (j.contains("sentence") && j.contains("option1")) return from_winogrande(j);
  if (j.contains("goal") && j.contains("sol1")) return from_piqa(j);
  if (j.contains("choices") && j.contains("answer") && j.contains("question")) return from_mmlu(j);
  if (j.contains("question") && j.contains("answer")) return from_gsm8k(j);
  if (j.contains("page")) {
    Doc d;
    d.page = j.at("page");
    d.text = wikitext_detokenize(d.page);
    d.source = j;
    return d;
  }
  throw Error(fmt::format("{}: record matches neither the normalized form nor a known public form", task));
}

}  // namespace

std::vector<Doc> read_docs(const std::string& task, TaskType type, const std::string& path) {
  const std::string content = read_all(path);
  const std::string base = strip_compression(path);
  auto ends = [&](const char* s) { return base.size() >= strlen(s) && base.compare(base.size() - strlen(s), strlen(s), s) == 0; };
  if (ends(".txt")) {
    if (task == "hellaswag") return from_hellaswag_text(content);
    if (type == TaskType::Rolling) return from_wikitext(content);
    throw Error(fmt::format("{}: a .txt file is read only for hellaswag (6-line form) and rolling tasks", path));
  }
  std::vector<Doc> docs;
  std::stringstream ss(content);
  int line_no = 0;
  for (std::string line; std::getline(ss, line);) {
    ++line_no;
    if (strip(line).empty()) continue;
    try {
      docs.push_back(from_record(task, type, json::parse(line)));
    } catch (const json::exception& e) {
      throw Error(fmt::format("{}:{}: {}", path, line_no, e.what()));
    } catch (const Error& e) {
      throw Error(fmt::format("{}:{}: {}", path, line_no, e.what()));
    }
  }
  return docs;
}

}  // namespace moelab::evals
