#pragma once
// The child side of the HumanEval sandbox (internal to evals/sandbox.cpp): everything that runs after
// fork/clone. The parent prepares every string and array beforehand, so the child only makes system calls.
#include <sys/types.h>

#include <cstddef>
#include <vector>

#include "evals/sandbox.hpp"

namespace moelab::evals::detail {

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

struct ChildPlan {
  SandboxMode mode = SandboxMode::process_group;
  bool isolate_network = true;
  bool drop_to_nobody = false;  // setgroups/setgid/setuid to nobody before exec (moelab is root)
  bool probe = false;           // namespace init: set up, then exit 0 without running anything
  uid_t outer_uid = 0;          // user-namespaces: the caller's ids, mapped to nobody inside
  gid_t outer_gid = 0;
  const char* dir = nullptr;    // the sample directory (cwd); inside the namespaces a private tmpfs
  const char* dir_tmpfs_options = nullptr;
  const char* program = nullptr;  // program.py and guard.py, written into the private directory
  size_t program_len = 0;
  const char* guard = nullptr;
  size_t guard_len = 0;
  std::vector<const char*> hidden;  // directories covered by an empty read-only tmpfs
  const char* python = nullptr;
  const char* const* argv = nullptr;
  const char* const* envp = nullptr;
  unsigned long rlimit_as = 0, rlimit_cpu = 0, rlimit_fsize = 0, rlimit_nproc = 0;
  int out_fd = -1;     // stdout and stderr of the program
  int err_fd = -1;     // setup failures, as text (close-on-exec)
  int status_fd = -1;  // namespace init: the program's wait status and whether processes were left
  int go_fd = -1;      // namespaces (root): the init waits here until moelab has written its id maps
};

struct InitReport {
  int wait_status = 0;
  int stray = 0;
};

// The body of the cloned namespace init (PID 1): mounts, then forks the program, reaps, reports, exits
// (which kills whatever is left in the namespace). Takes a ChildPlan*.
int namespace_init(void* plan);

// Limits, identity, exec of python3 (process-group mode calls it right after fork).
[[noreturn]] void exec_program(const ChildPlan& p);

}  // namespace moelab::evals::detail
