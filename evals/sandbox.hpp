#pragma once
// Runs untrusted Python (HumanEval completions) in a separate process so that nothing it does can
// harm moelab: fork + exec of python3 in a fresh temporary directory (removed afterwards), with
//  - a wall-clock limit (the whole process group is SIGKILLed when it passes) and RLIMIT_CPU,
//  - RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NOFILE, RLIMIT_CORE = 0,
//  - RLIMIT_NPROC: when moelab runs as root (which the kernel exempts from RLIMIT_NPROC) the child
//    first drops to the unprivileged user nobody, so the limit holds and root-owned files are read-only,
//  - no network: a new network namespace (unshare(CLONE_NEWNET), or with CLONE_NEWUSER when
//    unprivileged) when the kernel permits; SandboxResult says whether it did,
//  - a Python audit hook (installed before the program runs) that refuses writes outside the
//    temporary directory, sockets, subprocesses, fork and exec — a second layer, not the only one.
// Any failure of the program (exception, signal, limit, hang) is a failed sample, never an exception here.
#include <string>

namespace moelab::evals {

struct SandboxLimits {
  double timeout_seconds = 10.0;
  long memory_bytes = 2L << 30;
  long max_file_bytes = 16L << 20;
  int max_processes = 32;  // for the sandbox user (nobody) or added to the caller's count
  bool python_guard = true;  // the audit-hook layer; tests turn it off to check the OS limits alone
};

struct SandboxResult {
  bool passed = false;       // exit status 0 within the limits
  bool timed_out = false;
  int exit_code = -1;        // when it exited
  int signal = 0;            // when a signal ended it
  bool network_isolated = false;
  bool dropped_privileges = false;
  std::string output;        // the last bytes of stdout+stderr, for logs
  std::string error;         // why the sandbox itself could not run the program, if it could not
};

// The python3 the sandbox executes: $MOELAB_PYTHON, else /usr/bin/python3, else python3 on PATH.
std::string sandbox_python();

SandboxResult run_python_sandboxed(const std::string& program, const SandboxLimits& limits = {});

// HumanEval's check program (HF evaluate code_eval, as lm-eval's humaneval task builds it):
// prompt + completion + "\n" + test + "\ncheck(entry_point)".
std::string humaneval_program(const std::string& prompt, const std::string& completion, const std::string& test,
                              const std::string& entry_point);

}  // namespace moelab::evals
