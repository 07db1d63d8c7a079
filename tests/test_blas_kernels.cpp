// The trainer's guard against an OpenBLAS kernel set this CPU cannot run (train/blas_kernels.hpp): the flag
// check against the kernel's own view of the CPU (/proc/cpuinfo), the table's lookups, the refusal's
// wording, and `moelab finetune` under OPENBLAS_CORETYPE forcing such a set: one error line and exit
// status 1, where without the guard the first sgemm is an illegal instruction (SIGILL, status 132).
#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "process_util.hpp"
#include "train/blas_kernels.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
using train::blas_kernel_flags;
using train::blas_kernel_sets;
using train::blas_kernels_refusal;
using train::missing_flags;

// The flags of /proc/cpuinfo's first "flags" line: the Linux kernel's view of the CPU, which (like GCC's
// __builtin_cpu_supports) leaves out AVX and AVX-512 when the OS does not save their registers. Empty when
// the file cannot be read.
std::set<std::string> proc_cpuinfo_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    std::set<std::string> flags;
    for (std::string w; words >> w;) flags.insert(w);
    return flags;
  }
  return {};
}

// /proc/cpuinfo's name for a __builtin_cpu_supports flag (the two differ for these).
std::string cpuinfo_name(const std::string& flag) {
  if (flag == "sse3") return "pni";
  if (flag == "avx512bf16") return "avx512_bf16";
  return flag;
}

// A CPU with exactly `flags`.
auto cpu_with(std::set<std::string> flags) {
  return [flags = std::move(flags)](const std::string& f) { return flags.count(f) > 0; };
}

TEST(BlasKernels, CpuFlagCheckAgreesWithProcCpuinfo) {
  const auto proc = proc_cpuinfo_flags();
  if (proc.empty()) GTEST_SKIP() << "no flags line in /proc/cpuinfo to compare with";
  std::set<std::string> all;
  for (const auto& set : blas_kernel_sets())
    for (const auto& f : *blas_kernel_flags(set)) all.insert(f);
  ASSERT_GE(all.size(), 5u);
  for (const auto& f : all) EXPECT_EQ(train::cpu_has_flag(f), proc.count(cpuinfo_name(f)) > 0) << f;
  EXPECT_FALSE(train::cpu_has_flag("no-such-flag"));
}

TEST(BlasKernels, TableLookupIsCaseInsensitiveAndKnowsOpenBlasSets) {
  // Every name openblas_get_corename() of Debian's OpenBLAS 0.3.21 (x86-64) can return.
  for (const char* name : {"Prescott", "Atom", "Core2", "Penryn", "Dunnington", "Nehalem", "Opteron", "Opteron_SSE3",
                           "Barcelona", "Nano", "Sandybridge", "Bobcat", "Bulldozer", "Piledriver", "Haswell",
                           "Steamroller", "Excavator", "Zen", "SkylakeX", "Cooperlake"})
    EXPECT_NE(blas_kernel_flags(name), nullptr) << name;
  ASSERT_NE(blas_kernel_flags("skylakex"), nullptr);
  EXPECT_EQ(blas_kernel_flags("skylakex"), blas_kernel_flags("SkylakeX"));  // as OpenBLAS matches the variable
  EXPECT_EQ(blas_kernel_flags("SapphireRapids"), nullptr);                  // not in 0.3.21: not judged
  EXPECT_EQ(blas_kernel_flags("Bogus"), nullptr);
  EXPECT_EQ(blas_kernel_flags(""), nullptr);
}

TEST(BlasKernels, MissingFlagsAreThoseTheCpuLacksInTableOrder) {
  const auto avx2_cpu = cpu_with({"sse3", "avx", "avx2", "fma"});
  EXPECT_EQ(missing_flags(*blas_kernel_flags("SkylakeX"), avx2_cpu),
            (std::vector<std::string>{"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}));
  EXPECT_EQ(missing_flags(*blas_kernel_flags("Cooperlake"), avx2_cpu).back(), "avx512bf16");
  EXPECT_TRUE(missing_flags(*blas_kernel_flags("Haswell"), avx2_cpu).empty());
  EXPECT_TRUE(missing_flags(*blas_kernel_flags("Prescott"), avx2_cpu).empty());
  EXPECT_EQ(missing_flags(*blas_kernel_flags("Excavator"), avx2_cpu), std::vector<std::string>{"fma4"});
  EXPECT_EQ(missing_flags(*blas_kernel_flags("Haswell"), cpu_with({"sse3", "avx", "fma"})),
            std::vector<std::string>{"avx2"});
  EXPECT_EQ(missing_flags(*blas_kernel_flags("Sandybridge"), cpu_with({})), std::vector<std::string>{"avx"});
}

TEST(BlasKernels, RefusalNamesTheVariableTheSetTheFlagsAndTheRemedy) {
  const auto avx2_cpu = cpu_with({"sse3", "avx", "avx2", "fma"});
  const std::string why = blas_kernels_refusal("SkylakeX", "skylakex", avx2_cpu);
  EXPECT_NE(why.find("OPENBLAS_CORETYPE=skylakex"), std::string::npos) << why;
  EXPECT_NE(why.find("SkylakeX kernels"), std::string::npos) << why;
  EXPECT_NE(why.find("avx512f avx512cd avx512bw avx512dq avx512vl"), std::string::npos) << why;
  EXPECT_NE(why.find("unset OPENBLAS_CORETYPE"), std::string::npos) << why;
  EXPECT_EQ(why.find('\n'), std::string::npos) << why;  // one line
  // A set this CPU runs, and names the table does not know (OpenBLAS's fallback, or a newer OpenBLAS's).
  EXPECT_EQ(blas_kernels_refusal("Haswell", "Haswell", avx2_cpu), "");
  EXPECT_EQ(blas_kernels_refusal("SapphireRapids", "SapphireRapids", cpu_with({})), "");
  // Not forced (OpenBLAS's own choice, which should never happen to lack flags): still refused, worded so.
  const std::string own = blas_kernels_refusal("SkylakeX", nullptr, avx2_cpu);
  EXPECT_NE(own.find("OpenBLAS chose its SkylakeX kernels"), std::string::npos) << own;
  EXPECT_EQ(blas_kernels_refusal("SkylakeX", "", avx2_cpu), own);
}

// Runs `args` (no shell) with this process's environment plus `name`=`value`, outputs in `dir`. The
// variable is set for the child alone: setenv here would race with other threads and leak into later tests.
ProgramRun run_with_env(const std::vector<std::string>& args, const std::string& name, const std::string& value,
                        const fs::path& dir) {
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, (name + "=").c_str(), name.size() + 1) != 0) env_strings.emplace_back(*e);
  env_strings.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  return wait_program(spawn_program(args, out, err, envp.data()), 120, out, err);
}

// The set to force: SkylakeX when this CPU lacks AVX-512 (the common case), else any set it lacks (an
// AVX-512 CPU made since 2012 lacks the Bulldozer family's FMA4); empty when it lacks none.
std::pair<std::string, std::vector<std::string>> a_kernel_set_this_cpu_lacks() {
  std::vector<std::string> candidates = blas_kernel_sets();
  candidates.insert(candidates.begin(), "SkylakeX");
  for (const auto& set : candidates) {
    auto lacking = missing_flags(*blas_kernel_flags(set));
    if (!lacking.empty()) return {set, lacking};
  }
  return {};
}

TEST(BlasKernelsCli, FinetuneWithAKernelSetThisCpuLacksIsOneErrorLine) {
  const auto [forced, lacking] = a_kernel_set_this_cpu_lacks();
  if (forced.empty()) GTEST_SKIP() << "this CPU runs every OpenBLAS kernel set in the table: none to force that it lacks";

  TempDir dir("moelab-blas-kernels-cli");
  {
    std::ofstream data(dir.file("train.jsonl"));
    for (int i = 0; i < 4; ++i) data << "{\"text\": \"Line " << i << " of a tiny corpus.\"}\n";
  }
  const ProgramRun r = run_with_env({MOELAB_BIN, "finetune", "--model", std::string(MOELAB_FIXTURES) + "/models/mixtral-4e-gqa-f32",
                                     "--data", dir.file("train.jsonl"), "-o", dir.file("out"), "--max-steps", "1",
                                     "--max-seq-len", "16", "--batch-size", "2", "--threads", "1", "--progress", "none"},
                                    "OPENBLAS_CORETYPE", forced, dir.path());
  ASSERT_FALSE(r.timed_out);
  EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << " (SIGILL is " << SIGILL << ")\n" << r.err;
  EXPECT_EQ(r.exit_code, 1) << r.err;
  const std::string lacking_text = fmt::format("{}", fmt::join(lacking, " "));
  const std::string expected_start = "moelab: error: OPENBLAS_CORETYPE=" + forced + " forces OpenBLAS's " + forced +
                                     " kernels, which use instructions this CPU lacks (" + lacking_text + ")";
  EXPECT_EQ(r.err.rfind(expected_start, 0), 0u) << r.err;
  EXPECT_NE(r.err.find("unset OPENBLAS_CORETYPE"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_FALSE(fs::exists(dir.path() / "out" / "adapter_model.safetensors"));
}

// The demo checks before its first step, not at step 7 after the others have run.
TEST(BlasKernelsCli, DemoRefusesAKernelSetThisCpuLacksBeforeItsFirstStep) {
  const auto [forced, lacking] = a_kernel_set_this_cpu_lacks();
  if (forced.empty()) GTEST_SKIP() << "this CPU runs every OpenBLAS kernel set in the table: none to force that it lacks";
  TempDir dir("moelab-blas-kernels-demo");
  const ProgramRun r = run_with_env({MOELAB_BIN, "demo", "-o", dir.file("report"), "--threads", "1", "--progress", "none"},
                                    "OPENBLAS_CORETYPE", forced, dir.path());
  ASSERT_FALSE(r.timed_out);
  EXPECT_EQ(r.signal, 0) << r.err;
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(r.err.rfind("moelab: error: OPENBLAS_CORETYPE=" + forced + " forces", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.out.find("== [1/8]"), std::string::npos) << r.out;  // no step ran
}

}  // namespace
}  // namespace moelab::test
