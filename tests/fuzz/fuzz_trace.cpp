// libFuzzer harness: the routing-trace reader (analysis/trace.hpp) on bytes written to a temporary file:
// read_trace, then repair_trace (which rewrites the file through a sibling temporary) and, when the
// repair succeeds, read_trace again. Damaged or crafted files must be one moelab::Error: never a hang
// (libFuzzer's -timeout), a crash or a giant allocation (-rss_limit_mb / -malloc_limit_mb).
#include <cstddef>
#include <cstdint>

#include "analysis/trace.hpp"
#include "tests/fuzz/fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = moelab::fuzz::write_temp("input.h5", data, size);
  moelab::fuzz::expect_only_moelab_errors([&] { (void)moelab::analysis::read_trace(path); });
  moelab::fuzz::expect_only_moelab_errors([&] {
    (void)moelab::analysis::repair_trace(path);
    (void)moelab::analysis::read_trace(path);
  });
  return 0;
}
