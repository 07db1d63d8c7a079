#pragma once
// One error type for every bad input: the message names the file (and tensor) and the problem,
// so the CLI can print it as one line and exit non-zero.
#include <stdexcept>
#include <string>

namespace moelab {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace moelab
