#pragma once
// Shared by the fuzz harnesses (tests/fuzz/README.md): an input written to a temporary file, and the rule
// that a documented error is a fine outcome while anything else (another exception, a crash, a sanitizer
// report, a hang) is a bug.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "core/error.hpp"

namespace moelab::fuzz {

// A private temporary directory for this process (removed with its contents at exit), so parallel
// fuzzers (-jobs/-workers) and ctest -j never share files.
inline const std::string& temp_dir() {
  static std::string dir;
  if (dir.empty()) {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/moelab-fuzz-XXXXXX";
    if (!::mkdtemp(tmpl.data())) {
      std::perror("moelab fuzz: mkdtemp");
      std::abort();
    }
    dir = tmpl;
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    });
  }
  return dir;
}

// Writes `data` to `<temp_dir>/<name>` (replacing it) and returns the path.
inline std::string write_temp(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = temp_dir() + "/" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  out.close();
  if (!out) {
    std::fprintf(stderr, "moelab fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
  return path;
}

// Runs `f`; a moelab::Error is the documented answer to bad input. Anything else escapes and crashes the
// fuzzer (libFuzzer reports an uncaught exception as a deadly signal).
template <class F>
void expect_only_moelab_errors(F&& f) {
  try {
    f();
  } catch (const moelab::Error&) {
  }
}

}  // namespace moelab::fuzz
