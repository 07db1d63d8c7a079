#pragma once
// Wall-clock intervals for timings and deadlines: the steady clock (never jumps with the system clock).
#include <chrono>

namespace moelab {

using SteadyClock = std::chrono::steady_clock;

// Seconds from t0 until now.
inline double seconds_since(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

}  // namespace moelab
