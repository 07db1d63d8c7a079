#pragma once
// A test fixture for tests that run the moelab binary: a temporary folder, files written into it, and each
// run's stdout and stderr kept in a folder of its own (run0, run1, ...) for a failing test's message.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "process_util.hpp"

namespace moelab::test {

class MoelabRunsInATempDir : public ::testing::Test {
 protected:
  explicit MoelabRunsInATempDir(const std::string& prefix) : dir(prefix) {}

  // `text` as the file `name` in the folder; returns its path.
  std::string write(const std::string& name, const std::string& text) {
    std::ofstream(dir.file(name), std::ios::binary) << text;
    return dir.file(name);
  }
  MoelabRun moelab(const std::vector<std::string>& args) {
    const std::filesystem::path d = dir.path() / fmt::format("run{}", runs_++);
    std::filesystem::create_directories(d);
    return run_moelab(args, d);
  }

  TempDir dir;
  int runs_ = 0;  // runs so far (also a cheap unique suffix for output folder names)
};

}  // namespace moelab::test
