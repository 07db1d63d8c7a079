#pragma once
// One way for a test that loops over kernel sets to run those this CPU has and say which it did not.
#include <iostream>

#include "optimized/cpu/kernels.hpp"

namespace moelab::test {

// True when this CPU runs `isa`; otherwise prints a SKIP line naming the CPU flags it lacks.
inline bool runs_here(cpu::Isa isa) {
  if (cpu::isa_supported(isa)) return true;
  std::cout << "[ SKIP     ] " << cpu::isa_name(isa) << " not run: this CPU lacks " << cpu::isa_features(isa) << "\n";
  return false;
}

}  // namespace moelab::test
