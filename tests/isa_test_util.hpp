#pragma once
// How a test that runs a kernel set says which it did not run. Tests take the ISA as a parameter and
// call MOELAB_SKIP_UNLESS_RUNS_HERE(isa): on a CPU without it the test is SKIPPED with the missing flags
// as its reason, never passed. The ISA parameter also prints with that reason (PrintTo below), and
// ctest names a value-parameterised test with its printed parameter, so the reason shows in ctest's own
// list of skipped tests ("... # GetParam() = avx512, not run here: this CPU lacks avx512f avx512bw").
#include <gtest/gtest.h>

#include <iostream>
#include <ostream>
#include <string>

#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu {

// gtest prints parameters with PrintTo found by argument-dependent lookup: here, in Isa's namespace.
inline void PrintTo(Isa isa, std::ostream* os) {
  *os << isa_name(isa);
  if (!isa_supported(isa)) *os << ", not run here: this CPU lacks " << isa_features(isa);
}

}  // namespace moelab::cpu

namespace moelab::test {

inline std::string not_run_here(cpu::Isa isa) {
  return cpu::isa_name(isa) + " not run: this CPU lacks " + cpu::isa_features(isa);
}

// A test name part: "avx512_vnni" for "avx512-vnni".
inline std::string isa_test_name(cpu::Isa isa) {
  std::string n = cpu::isa_name(isa);
  for (auto& ch : n)
    if (ch == '-') ch = '_';
  return n;
}

// True when this CPU runs `isa`; otherwise prints a SKIP line naming the CPU flags it lacks. For loops
// inside one test that also do other work; a test about one ISA uses MOELAB_SKIP_UNLESS_RUNS_HERE.
inline bool runs_here(cpu::Isa isa) {
  if (cpu::isa_supported(isa)) return true;
  std::cout << "[ SKIP     ] " << not_run_here(isa) << "\n";
  return false;
}

}  // namespace moelab::test

// Ends the running test as SKIPPED, with the reason, when this CPU lacks `isa`.
#define MOELAB_SKIP_UNLESS_RUNS_HERE(isa) \
  if (!::moelab::cpu::isa_supported(isa)) GTEST_SKIP() << ::moelab::test::not_run_here(isa)
