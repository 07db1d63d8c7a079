// moelab_skip_report (run by ctest after every run) names each skipped test with its reason. The log
// below has ctest's exact block layout (cmake 3.25's LastTest.log): a GoogleTest skip with a two-line
// message, a parameterised name with its "# GetParam()" comment, a non-GoogleTest "SKIP: " entry, and
// a passing test whose output happens to contain the words a parser might mistake for a skip.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;

std::string block(int i, const std::string& name, const std::string& output, const std::string& verdict) {
  return std::to_string(i) + "/4 Testing: " + name + "\n" + std::to_string(i) + "/4 Test: " + name +
         "\nCommand: \"/bin/true\"\nDirectory: /tmp\n\"" + name + "\" start time: Dec 01 18:42 UTC\nOutput:\n" +
         std::string(58, '-') + "\n" + output + "<end of output>\nTest time =   0.01 sec\n" + std::string(58, '-') +
         "\n" + verdict + "\n\"" + name + "\" end time: Dec 01 18:42 UTC\n" + std::string(58, '-') + "\n\n";
}

const std::string kSkipVerdict = "Test Pass Reason:\nSkip regular expression found in output. Regex=[\\[  SKIPPED \\]]";

class SkipReport : public ::testing::Test {
 protected:
  ProgramRun report(const std::string& log) {
    std::ofstream(dir / "LastTest.log") << log;
    return run_program({MOELAB_SKIP_REPORT, (dir / "LastTest.log").string()}, dir, 30);
  }
  TempDir scratch{"moelab-skip-report"};
  const fs::path& dir = scratch.path();
};

TEST_F(SkipReport, ListsEachSkippedTestUnderItsReason) {
  const std::string log =
      "Start testing: Dec 01 18:42 UTC\n" + std::string(58, '-') + "\n" +
      block(1, "Shapes/CpuKernels.Gemv/avx512_1x64_b64  # GetParam() = (avx512, 1x64 block 64)",
            "[ RUN      ] Shapes/CpuKernels.Gemv/avx512_1x64_b64\n/src/tests/test_cpu_kernels.cpp:61: Skipped\n"
            "avx512 not run: this CPU lacks\navx512f avx512bw\n[  SKIPPED ] Shapes/CpuKernels.Gemv/avx512_1x64_b64 (0 ms)\n",
            kSkipVerdict) +
      block(2, "Shapes/CpuKernels.Dequantize/avx512_3x7_b64  # GetParam() = (avx512, 3x7 block 64)",
            "/src/tests/test_cpu_kernels.cpp:61: Skipped\navx512 not run: this CPU lacks\navx512f avx512bw\n"
            "[  SKIPPED ] Shapes/CpuKernels.Dequantize/avx512_3x7_b64 (0 ms)\n",
            kSkipVerdict) +
      block(3, "TraceH5py", "SKIP: no Python virtual environment at /x/.venv/bin/python (see scripts/setup.sh)\n",
            "Test Pass Reason:\nSkip regular expression found in output. Regex=[SKIP: ]") +
      block(4, "Diff.Passes", "the word Skipped and a line\nSKIP: inside a passing test's output\n", "Test Passed.") +
      "End testing: Dec 01 18:42 UTC\n";
  const auto r = report(log);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string expected =
      "\nskip report: 3 tests skipped, for 2 reasons:\n"
      "SKIP (2) avx512 not run: this CPU lacks avx512f avx512bw\n"
      "    Shapes/CpuKernels.Gemv/avx512_1x64_b64\n"
      "    Shapes/CpuKernels.Dequantize/avx512_3x7_b64\n"
      "SKIP (1) no Python virtual environment at /x/.venv/bin/python (see scripts/setup.sh)\n"
      "    TraceH5py\n";
  EXPECT_EQ(r.out, expected);
}

TEST_F(SkipReport, SaysWhenNothingWasSkippedAndIsQuietWhenNothingRan) {
  const auto none = report("Start testing: x\n" + block(1, "A.B", "ok\n", "Test Passed."));
  EXPECT_EQ(none.exit_code, 0);
  EXPECT_EQ(none.out, "skip report: no test skipped\n");
  // A log of no test at all (ctest -N writes one) gives no report.
  const auto listed_only = report("Start testing: Dec 01 18:42 UTC\n" + std::string(58, '-') + "\nEnd testing: Dec 01 18:42 UTC\n");
  EXPECT_EQ(listed_only.exit_code, 0);
  EXPECT_EQ(listed_only.out, "");
  // No log of this run (ctest -N ran nothing): no report, and never a failure of the ctest run.
  const auto missing = run_program({MOELAB_SKIP_REPORT, (dir / "absent.log.tmp").string()}, dir, 30);
  EXPECT_EQ(missing.exit_code, 0);
  EXPECT_EQ(missing.out, "");
}

TEST_F(SkipReport, ASkipWithoutAMessageIsListedAsSuch) {
  const auto r = report(block(1, "A.NoReason", "/src/a.cpp:3: Skipped\n\n[  SKIPPED ] A.NoReason (0 ms)\n", kSkipVerdict));
  EXPECT_NE(r.out.find("SKIP (1) (the test gave no reason)\n    A.NoReason\n"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace moelab::test
