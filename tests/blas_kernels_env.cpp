// The kernel set OpenBLAS runs the trainer's products on, made a test parameter: ctest runs
// moelab_train_tests' product and FP32-parity tests once per set with OPENBLAS_CORETYPE forcing it
// (tests/CMakeLists.txt, "TrainOnBlasKernels"). Before any test this environment checks the forced set:
// on a CPU without its instructions every test is SKIPPED, with the missing flags as the reason (running
// them would be an illegal instruction); a set OpenBLAS does not know (it silently falls back to its
// own choice) fails. Without OPENBLAS_CORETYPE it does nothing: OpenBLAS picks the set for this CPU.
#include <cblas.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace {

// The CPU flags each forced set's kernels use (OpenBLAS's kernel/x86_64 KERNEL.<core> files: Prescott
// SSE3, Sandybridge AVX, Haswell and Zen AVX2 + FMA, SkylakeX and Cooperlake AVX-512).
const std::map<std::string, std::vector<const char*>>& required_flags() {
  static const std::map<std::string, std::vector<const char*>> m = {
      {"Prescott", {"sse3"}},
      {"Sandybridge", {"avx"}},
      {"Haswell", {"avx2", "fma"}},
      {"Zen", {"avx2", "fma"}},
      {"SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}},
  };
  return m;
}

bool cpu_has(const std::string& flag) {
  // __builtin_cpu_supports takes a string literal only.
  if (flag == "sse3") return __builtin_cpu_supports("sse3");
  if (flag == "avx") return __builtin_cpu_supports("avx");
  if (flag == "avx2") return __builtin_cpu_supports("avx2");
  if (flag == "fma") return __builtin_cpu_supports("fma");
  if (flag == "avx512f") return __builtin_cpu_supports("avx512f");
  if (flag == "avx512cd") return __builtin_cpu_supports("avx512cd");
  if (flag == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (flag == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (flag == "avx512vl") return __builtin_cpu_supports("avx512vl");
  return false;
}

class BlasKernelsEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    const char* forced = std::getenv("OPENBLAS_CORETYPE");
    if (!forced || !*forced) return;
    const auto it = required_flags().find(forced);
    ASSERT_NE(it, required_flags().end()) << "OPENBLAS_CORETYPE=" << forced << ": not a kernel set these tests know";
    std::string lacking;
    for (const char* flag : it->second)
      if (!cpu_has(flag)) lacking += std::string(lacking.empty() ? "" : " ") + flag;
    if (!lacking.empty()) {
      // The "SKIP: " line is what ctest's skip report quotes as the reason (tests/skip_report.cpp).
      std::printf("SKIP: OpenBLAS kernel set %s not run: this CPU lacks %s\n", forced, lacking.c_str());
      std::fflush(stdout);
      GTEST_SKIP() << "OpenBLAS kernel set " << forced << " not run: this CPU lacks " << lacking;
    }
    ASSERT_EQ(std::string(openblas_get_corename()), std::string(forced))
        << "OpenBLAS did not take OPENBLAS_CORETYPE=" << forced;
    std::printf("[ INFO     ] trainer products on OpenBLAS kernel set %s\n", openblas_get_corename());
  }
};

const auto* const kRegistered = ::testing::AddGlobalTestEnvironment(new BlasKernelsEnvironment);

}  // namespace
