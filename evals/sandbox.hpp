#pragma once
// Runs untrusted Python (HumanEval completions) so that nothing it does can harm moelab or the host.
// The kernel contains it (docs/evals.md, "HumanEval sandbox"); which mode depends on what the host allows:
//  - namespaces (moelab has CAP_SYS_ADMIN, e.g. root): the program's init is cloned into new user, PID,
//    mount, network, IPC and UTS namespaces (the user namespace maps root and nobody to themselves, so
//    RLIMIT_NPROC counts this sandbox's processes only). The root filesystem is read-only, /tmp is an empty read-only tmpfs
//    holding only the sample's own writable tmpfs directory, /root, /home and $HOME are hidden, the network
//    is a lone loopback that is down, and the program runs as nobody with no_new_privs and rlimits.
//    When the program exits (or the wall-clock limit passes) the namespace's init exits and the kernel
//    kills every process left in the namespace, setsid() or not.
//  - user-namespaces (unprivileged, where the kernel permits user namespaces): the same inside a new user
//    namespace; the program is the caller's own uid (shown as nobody), so hiding $HOME matters.
//  - process-group (no namespaces): rlimits, setsid, uid nobody when root, a network namespace if one can
//    be made, and moelab as child subreaper kills every descendant afterwards. Weaker: the program sees
//    the real filesystem (as nobody when root). moelab says so once on stderr.
// A Python audit hook is a second layer in every mode, never the only one. A program that leaves processes
// running when it exits fails. Any failure (exception, signal, limit, hang) is a failed sample, never an
// exception here. One sample at a time per process (the process-group sweep relies on it).
#include <optional>
#include <string>

namespace moelab::evals {

enum class SandboxMode { namespaces, user_namespaces, process_group };
const char* sandbox_mode_name(SandboxMode m);

struct SandboxLimits {
  double timeout_seconds = 10.0;
  long memory_bytes = 2L << 30;
  long max_file_bytes = 16L << 20;
  int max_processes = 32;  // processes the program may add (RLIMIT_NPROC above what the user already runs)
  // For tests: they turn layers off to show that a test can fail, or force the weaker mode.
  bool python_guard = true;          // the audit-hook layer
  bool isolate_network = true;       // false: the host's network, to show a network test can fail
  std::optional<SandboxMode> mode;   // unset: the strongest mode this host supports
  std::string label = "moelab-sandbox";  // on the program's command line (tests find its processes by it)
};

struct SandboxResult {
  bool passed = false;       // exit status 0 within the limits, no process left behind
  bool timed_out = false;
  int exit_code = -1;        // when it exited
  int signal = 0;            // when a signal ended it
  bool stray_processes = false;  // processes were still running when the program exited (all killed)
  SandboxMode mode = SandboxMode::process_group;
  bool network_isolated = false;
  bool dropped_privileges = false;  // runs as a uid other than moelab's (nobody)
  std::string output;        // the last bytes of stdout+stderr, for logs
  std::string error;         // why the sandbox itself could not run the program, if it could not
};

// The strongest mode this host supports (probed once; the first call may print one notice on stderr).
SandboxMode sandbox_mode();

// The python3 the sandbox executes: $MOELAB_PYTHON, else /usr/bin/python3, else python3 on PATH.
std::string sandbox_python();

SandboxResult run_python_sandboxed(const std::string& program, const SandboxLimits& limits = {});

// HumanEval's check program (HF evaluate code_eval, as lm-eval's humaneval task builds it):
// prompt + completion + "\n" + test + "\ncheck(entry_point)".
std::string humaneval_program(const std::string& prompt, const std::string& completion, const std::string& test,
                              const std::string& entry_point);

}  // namespace moelab::evals
