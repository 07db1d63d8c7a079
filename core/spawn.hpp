#pragma once
// Runs a program with an argument vector and waits for it: no shell, so no argument (a file name with
// quotes, semicolons, spaces) is ever interpreted. The one way moelab starts another program.
#include <string>
#include <vector>

namespace moelab {

struct SpawnOptions {
  // Empty: the child inherits moelab's stream; otherwise the stream is redirected to this file
  // (created or truncated), e.g. "/dev/null".
  std::string stdout_path, stderr_path;
};

// Runs argv[0] (looked up in PATH when it contains no '/') with arguments argv[1..] and waits for it.
// Returns its exit status (0..255), or 128 + the signal number when a signal ended it. Throws
// moelab::Error naming the program when it cannot be started (not found, not executable, no fork).
int run_process(const std::vector<std::string>& argv, const SpawnOptions& options = {});

// The argument vector as one line for messages, each argument single-quoted for a POSIX shell where
// it needs it (for display only: never passed to a shell).
std::string describe_command(const std::vector<std::string>& argv);

}  // namespace moelab
