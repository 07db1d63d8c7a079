#pragma once
// Files that ship with moelab (the default model, eval slices, reported scores, plot scripts): under
// <prefix>/share/moelab for an installed binary (`cmake --install`), else in the source tree the build
// came from (known at compile time).
#include <string>

namespace moelab::cli {

// <bundled root>/rel, e.g. bundled_path("evals/data/hellaswag-val-200.txt").
std::string bundled_path(const std::string& rel);

}  // namespace moelab::cli
