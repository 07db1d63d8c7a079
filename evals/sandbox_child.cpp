// The child side of the HumanEval sandbox: namespace setup (mounts, ids), then limits, identity and exec.
// Only system calls here: the parent prepared every string before fork/clone.
#include "evals/sandbox_child.hpp"

#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

namespace moelab::evals::detail {

namespace {

[[noreturn]] void fail(const ChildPlan& p, const char* what) {
  const int e = errno;
  char buf[256];
  const int n = snprintf(buf, sizeof buf, "%s: %s", what, strerror(e));
  if (n > 0) (void)!write(p.err_fd, buf, size_t(n));
  _exit(127);
}

bool write_all(int fd, const char* data, size_t len) {
  while (len > 0) {
    const ssize_t n = write(fd, data, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n, len -= size_t(n);
  }
  return true;
}

bool write_file(const char* path, const char* data, size_t len, mode_t mode) {
  const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return false;
  const bool ok = write_all(fd, data, len);
  return close(fd) == 0 && ok;
}

// User namespace: the caller's uid and gid become nobody/nogroup inside (no uid 0 exists there, so the
// program holds no capability after exec). Done by the init itself, which the kernel permits for its own ids.
void map_ids(const ChildPlan& p) {
  char buf[64];
  prctl(PR_SET_DUMPABLE, 1);  // else /proc/self/* belongs to root after a uid change, and is not writable
  if (!write_file("/proc/self/setgroups", "deny", 4, 0)) fail(p, "user namespace: setgroups deny");
  int n = snprintf(buf, sizeof buf, "%u %u 1\n", unsigned(kNobody), unsigned(p.outer_uid));
  if (!write_file("/proc/self/uid_map", buf, size_t(n), 0)) fail(p, "user namespace: uid_map");
  n = snprintf(buf, sizeof buf, "%u %u 1\n", unsigned(kNogroup), unsigned(p.outer_gid));
  if (!write_file("/proc/self/gid_map", buf, size_t(n), 0)) fail(p, "user namespace: gid_map");
}

// The mount namespace: nothing propagates back to the host; every mount read-only and nosuid; a fresh /proc
// showing only this PID namespace; /tmp an empty read-only tmpfs holding the sample's own writable tmpfs
// directory; home directories hidden under empty read-only tmpfs.
void setup_mounts(const ChildPlan& p) {
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) fail(p, "mount: make / private");
  struct mount_attr ro {};
  ro.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID;
  if (mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, &ro, sizeof ro) != 0) fail(p, "mount_setattr: read-only /");
  // Not fatal: some containers refuse a new proc in a user namespace; the old one is read-only above.
  (void)mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  const unsigned long tmp_flags = MS_NOSUID | MS_NODEV;
  if (mount("tmpfs", "/tmp", "tmpfs", tmp_flags, "mode=0755,size=64k,nr_inodes=64") != 0) fail(p, "mount: tmpfs /tmp");
  if (mkdir(p.dir, 0700) != 0) fail(p, "mkdir sample directory");
  if (mount("tmpfs", p.dir, "tmpfs", tmp_flags, p.dir_tmpfs_options) != 0) fail(p, "mount: tmpfs sample directory");
  if (chdir(p.dir) != 0) fail(p, "chdir sample directory");
  if (!write_file("program.py", p.program, p.program_len, 0644) || !write_file("guard.py", p.guard, p.guard_len, 0644))
    fail(p, "write program");
  if (p.drop_to_nobody && chown(".", kNobody, kNogroup) != 0) fail(p, "chown sample directory");
  if (mount(nullptr, "/tmp", nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | tmp_flags, nullptr) != 0)
    fail(p, "mount: read-only /tmp");
  for (const char* h : p.hidden)
    if (mount("tmpfs", h, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=4k") != 0)
      fail(p, "mount: hide home directory");
}

}  // namespace

int namespace_init(void* arg) {
  const ChildPlan& p = *static_cast<const ChildPlan*>(arg);
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // moelab gone: this init dies, and with it the namespace
  if (p.mode == SandboxMode::user_namespaces) map_ids(p);
  if (p.go_fd >= 0) {  // moelab maps root and nobody into our user namespace, then writes one byte
    char go = 0;
    if (read(p.go_fd, &go, 1) != 1) fail(p, "waiting for the id maps");
  }
  setup_mounts(p);
  if (p.probe) _exit(0);
  // The init holds none of moelab's stdio (a pipe or terminal) while the program runs.
  if (const int devnull = open("/dev/null", O_RDWR | O_CLOEXEC); devnull >= 0)
    dup2(devnull, 0), dup2(devnull, 1), dup2(devnull, 2);
  const pid_t program = fork();
  if (program < 0) fail(p, "fork");
  if (program == 0) exec_program(p);
  // PID 1 of the namespace: orphans come here. Reap until the program itself exits.
  InitReport report;
  for (;;) {
    int st = 0;
    const pid_t w = waitpid(-1, &st, 0);
    if (w == program) {
      report.wait_status = st;
      break;
    }
    if (w < 0 && errno != EINTR) fail(p, "waitpid");
  }
  // Anything still running now was left behind by the program: it fails, and dies when this init exits.
  for (;;) {
    const pid_t w = waitpid(-1, nullptr, WNOHANG);
    if (w > 0) continue;
    report.stray = w == 0;
    break;
  }
  (void)!write(p.status_fd, &report, sizeof report);
  _exit(0);
}

void exec_program(const ChildPlan& p) {
  setsid();  // own session and process group (process-group mode kills the group)
  if (chdir(p.dir) != 0) fail(p, "chdir");
  if (p.mode == SandboxMode::process_group && p.isolate_network && unshare(CLONE_NEWNET) != 0)
    fail(p, "unshare(CLONE_NEWNET)");
  const int devnull = open("/dev/null", O_RDONLY);
  if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(p.out_fd, 1) < 0 || dup2(p.out_fd, 2) < 0) fail(p, "redirect output");
  // Nothing of moelab's (model files, traces) stays open in the program; err_fd closes at exec.
  (void)close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
  auto lim = [&](int res, unsigned long v, const char* what) {
    const struct rlimit rl{rlim_t(v), rlim_t(v)};
    if (setrlimit(res, &rl) != 0) fail(p, what);
  };
  lim(RLIMIT_AS, p.rlimit_as, "RLIMIT_AS");
  lim(RLIMIT_CPU, p.rlimit_cpu, "RLIMIT_CPU");
  lim(RLIMIT_FSIZE, p.rlimit_fsize, "RLIMIT_FSIZE");
  lim(RLIMIT_NOFILE, 64, "RLIMIT_NOFILE");
  lim(RLIMIT_CORE, 0, "RLIMIT_CORE");
  lim(RLIMIT_NPROC, p.rlimit_nproc, "RLIMIT_NPROC");  // root is exempt: hence nobody below
  if (p.drop_to_nobody && (setgroups(0, nullptr) != 0 || setgid(kNogroup) != 0 || setuid(kNobody) != 0))
    fail(p, "drop to nobody");
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail(p, "no_new_privs");
  execve(p.python, const_cast<char* const*>(p.argv), const_cast<char* const*>(p.envp));
  fail(p, "exec python3");
}

}  // namespace moelab::evals::detail
