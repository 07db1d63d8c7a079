// The kernel set OpenBLAS runs the trainer's products on, made a test parameter: ctest runs
// moelab_train_tests' product and FP32-parity tests once per set with OPENBLAS_CORETYPE forcing it
// (tests/CMakeLists.txt, "TrainOnBlasKernels"). Before any test this environment checks the forced set
// with the trainer's own table (train/blas_kernels.hpp): on a CPU without its instructions every test is
// SKIPPED, with the missing flags as the reason (running them would be an illegal instruction, which the
// trainer refuses); a set the table does not know (OpenBLAS may silently fall back to its own choice)
// fails. Without OPENBLAS_CORETYPE it does nothing: OpenBLAS picks the set for this CPU.
#include <cblas.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "train/blas_kernels.hpp"

namespace {

class BlasKernelsEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    const char* forced = std::getenv("OPENBLAS_CORETYPE");
    if (!forced || !*forced) return;
    const auto* flags = moelab::train::blas_kernel_flags(forced);
    ASSERT_NE(flags, nullptr) << "OPENBLAS_CORETYPE=" << forced << ": not a kernel set these tests know";
    const auto missing = moelab::train::missing_flags(*flags);
    if (!missing.empty()) {
      const std::string lacking = fmt::format("{}", fmt::join(missing, " "));
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
