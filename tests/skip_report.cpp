// After every ctest run (CTEST_CUSTOM_POST_TEST, written by tests/CMakeLists.txt), lists each skipped
// test with the reason it gave. ctest itself prints only "(Skipped)": the reason is in the test's
// output, which --output-on-failure never shows for a skipped test, so a missing GPU, an ISA this CPU
// lacks or an absent Python tier would otherwise pass unnoticed.
//
//   moelab_skip_report Testing/Temporary/LastTest.log.tmp
//
// Reads the log ctest is writing for this run: while the post-test command runs it is still
// LastTest.log.tmp (renamed to LastTest.log only afterwards, so LastTest.log would be the previous
// run's; seen with cmake 3.25). No such file (ctest -N ran no test) means no report. Per test: a
// "N/M Test: NAME" line, the output
// between "Output:" and "<end of output>", then "Skip regular expression found in output" when the
// test skipped. The reason is GoogleTest's message after "FILE:LINE: Skipped", or a line of the form
// "SKIP: reason" (the convention of this project's non-GoogleTest entries). Always exits 0: a report.
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

struct Block {
  std::string name;
  std::vector<std::string> output;
  bool skipped = false;
};

std::string trim(std::string s) {
  const auto b = s.find_first_not_of(" \t\r");
  const auto e = s.find_last_not_of(" \t\r");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// "12/810 Test: Suite.Name  # GetParam() = (...)" -> "Suite.Name" (the parameter comment is dropped:
// the reason below says the same thing in words).
bool parse_test_line(const std::string& line, std::string& name) {
  const auto slash = line.find('/');
  const auto tag = line.find(" Test: ");
  if (slash == std::string::npos || tag == std::string::npos || slash > tag) return false;
  for (size_t i = 0; i < tag; ++i)
    if (line[i] != '/' && (line[i] < '0' || line[i] > '9')) return false;
  name = line.substr(tag + 7);
  if (const auto comment = name.find("  # "); comment != std::string::npos) name.resize(comment);
  name = trim(name);
  return true;
}

std::string reason_of(const Block& b) {
  std::string reason;
  bool in_message = false;
  for (const auto& line : b.output) {
    if (in_message) {
      if (line.rfind("[  SKIPPED ]", 0) == 0) break;
      if (trim(line).empty()) continue;
      reason += (reason.empty() ? "" : " ") + trim(line);
    } else if (ends_with(trim(line), ": Skipped")) {
      in_message = true;
    } else if (line.rfind("SKIP: ", 0) == 0) {
      return trim(line.substr(6));
    }
  }
  return reason.empty() ? "(the test gave no reason)" : reason;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: moelab_skip_report Testing/Temporary/LastTest.log.tmp\n";
    return 0;
  }
  std::ifstream in(argv[1]);
  if (!in) return 0;  // no test ran in this ctest invocation
  std::vector<Block> blocks;
  bool in_output = false;
  for (std::string line; std::getline(in, line);) {
    std::string name;
    if (!in_output && parse_test_line(line, name)) {
      blocks.push_back(Block{name, {}, false});
    } else if (blocks.empty()) {
      continue;
    } else if (!in_output && line == "Output:") {
      in_output = true;
      std::getline(in, line);  // the dashed rule
    } else if (in_output && line == "<end of output>") {
      in_output = false;
    } else if (in_output) {
      blocks.back().output.push_back(line);
    } else if (line.rfind("Skip regular expression found in output", 0) == 0) {
      blocks.back().skipped = true;
    }
  }
  // Grouped by reason, every test named: one reason usually covers many parameterised cases.
  std::map<std::string, std::vector<std::string>> by_reason;
  size_t total = 0;
  for (const auto& b : blocks)
    if (b.skipped) {
      by_reason[reason_of(b)].push_back(b.name);
      ++total;
    }
  if (blocks.empty()) return 0;  // no test ran (ctest -N, or a filter that matched nothing)
  if (total == 0) {
    std::cout << "skip report: no test skipped\n";
    return 0;
  }
  std::cout << "\nskip report: " << total << " tests skipped, for " << by_reason.size() << " reasons:\n";
  for (const auto& [reason, names] : by_reason) {
    std::cout << "SKIP (" << names.size() << ") " << reason << "\n";
    for (const auto& n : names) std::cout << "    " << n << "\n";
  }
  return 0;
}
