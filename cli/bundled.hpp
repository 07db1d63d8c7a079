#pragma once
// Files that ship with moelab's source tree (the default model, eval slices, reported scores, plot
// scripts), found from the build's compile-time knowledge of where that tree is.
#include <string>

namespace moelab::cli {

// <source tree>/rel, e.g. bundled_path("evals/data/hellaswag-val-200.txt").
std::string bundled_path(const std::string& rel);

}  // namespace moelab::cli
