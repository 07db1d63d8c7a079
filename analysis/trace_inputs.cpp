// The inputs of `moelab trace`: plain-text files and JSONL records (analysis/trace.hpp).
#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "analysis/trace.hpp"
#include "core/error.hpp"
#include "core/json_bounded.hpp"

namespace moelab::analysis {

namespace {

bool is_jsonl(const std::string& path) {
  const auto ext = std::filesystem::path(path).extension().string();
  return ext == ".jsonl" || ext == ".ndjson";
}

std::string read_whole_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw Error(fmt::format("{}: is a directory, not a text file", path));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot open ({})", path, std::strerror(errno)));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error(fmt::format("{}: read failed", path));
  return ss.str();
}

void read_jsonl(const std::string& path, const std::string& file_domain, std::vector<TraceText>& out) {
  std::istringstream lines(read_whole_file(path));
  std::string line;
  for (int number = 1; std::getline(lines, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = fmt::format("{}:{}", path, number);
    const auto j = parse_json_bounded(line, where, false);
    if (j.is_discarded()) throw Error(fmt::format("{}: not valid JSON", where));
    if (!j.is_object()) throw Error(fmt::format("{}: expected a JSON object with a \"text\" field", where));
    if (!j.contains("text")) throw Error(fmt::format("{}: record has no \"text\" field", where));
    if (!j["text"].is_string()) throw Error(fmt::format("{}: \"text\" must be a string", where));
    std::string domain = file_domain;
    if (j.contains("domain") && !j["domain"].is_null()) {
      if (!j["domain"].is_string()) throw Error(fmt::format("{}: \"domain\" must be a string", where));
      domain = j["domain"].get<std::string>();
    }
    out.push_back({j["text"].get<std::string>(), domain, where});
  }
}

}  // namespace

std::vector<TraceText> read_trace_inputs(const std::vector<std::string>& files, const std::vector<std::string>& domains) {
  if (!domains.empty() && domains.size() != files.size())
    throw Error(fmt::format("{} --domain names given for {} --input files; give one per input, in the same order, or none",
                            domains.size(), files.size()));
  std::vector<TraceText> out;
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string file_domain = domains.empty() ? std::filesystem::path(files[i]).stem().string() : domains[i];
    if (is_jsonl(files[i])) read_jsonl(files[i], file_domain, out);
    else out.push_back({read_whole_file(files[i]), file_domain, files[i]});
  }
  return out;
}

}  // namespace moelab::analysis
