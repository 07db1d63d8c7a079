#include "evals/sandbox.hpp"

#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace moelab::evals {

namespace fs = std::filesystem;

namespace {

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

// Installed in front of the program. Raises inside the program (so the test fails) on anything
// that reaches outside its directory. Paths are resolved against the sandbox directory.
const char* kGuard = R"PY(import sys as _s, os as _o
def _moelab_guard():
    root = _o.path.realpath(_o.getcwd())
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg")
    def inside(p):
        try:
            p = _o.fsdecode(p) if not isinstance(p, int) else None
        except Exception:
            return False
        if p is None:
            return True
        q = _o.path.realpath(_o.path.join(root, p))
        return q == root or q.startswith(root + _o.sep)
    def hook(event, args):
        if event.startswith(blocked):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                     (isinstance(flags, int) and flags & (_o.O_WRONLY | _o.O_RDWR | _o.O_CREAT | _o.O_APPEND | _o.O_TRUNC))
            if writes and not inside(path):
                raise PermissionError("sandbox: writing outside the sandbox directory is not allowed")
        if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                     "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"):
            for a in args[:2]:
                if isinstance(a, (str, bytes, _o.PathLike)) and not inside(a):
                    raise PermissionError("sandbox: " + event + " outside the sandbox directory is not allowed")
    _s.addaudithook(hook)
_moelab_guard()
del _moelab_guard
)PY";

int count_processes_of(uid_t uid) {
  int n = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    struct stat st;
    const std::string name = e.path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    if (stat(e.path().c_str(), &st) == 0 && st.st_uid == uid) ++n;
  }
  return n;
}

std::string tail_of(const fs::path& p, size_t max_bytes) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  return s.size() > max_bytes ? s.substr(s.size() - max_bytes) : s;
}

[[noreturn]] void child_fail(int fd, const char* what) {
  const int e = errno;
  char buf[256];
  const int n = snprintf(buf, sizeof buf, "%s: %s", what, strerror(e));
  if (n > 0) (void)!write(fd, buf, size_t(n));
  _exit(127);
}

}  // namespace

std::string sandbox_python() {
  if (const char* p = std::getenv("MOELAB_PYTHON"); p && *p) return p;
  if (access("/usr/bin/python3", X_OK) == 0) return "/usr/bin/python3";
  return "python3";
}

std::string humaneval_program(const std::string& prompt, const std::string& completion, const std::string& test,
                              const std::string& entry_point) {
  return prompt + completion + "\n" + test + "\ncheck(" + entry_point + ")";
}

SandboxResult run_python_sandboxed(const std::string& program, const SandboxLimits& limits) {
  SandboxResult r;
  char tmpl[] = "/tmp/moelab-sandbox-XXXXXX";
  if (!mkdtemp(tmpl)) {
    r.error = std::string("mkdtemp: ") + strerror(errno);
    return r;
  }
  const fs::path dir = tmpl;
  const bool root = geteuid() == 0;
  {
    std::ofstream(dir / "guard.py") << kGuard;
    std::ofstream(dir / "program.py") << program;
    // The program runs as: python3 -I -B -c "exec(guard); exec(program)" so the hook precedes it.
  }
  if (root) {
    (void)!chown(dir.c_str(), kNobody, kNogroup);
    chmod(dir.c_str(), 0700);
  }
  const std::string python = sandbox_python();
  const std::string bootstrap =
      std::string("import sys\n")
      + std::string(limits.python_guard ? "exec(compile(open('guard.py').read(), 'guard.py', 'exec'))\n" : "") +
      "__name__ = '__main__'\n"
      "sys.argv = ['program.py']\n"
      "exec(compile(open('program.py').read(), 'program.py', 'exec'))\n";
  const int nproc_base = root ? 0 : count_processes_of(geteuid());
  prctl(PR_SET_CHILD_SUBREAPER, 1);  // orphans of the program come back to us to be reaped
  int errpipe[2];
  if (pipe2(errpipe, O_CLOEXEC) != 0) {
    r.error = std::string("pipe: ") + strerror(errno);
    fs::remove_all(dir);
    return r;
  }
  int netpipe[2];
  (void)!pipe2(netpipe, O_CLOEXEC);
  const pid_t pid = fork();
  if (pid < 0) {
    r.error = std::string("fork: ") + strerror(errno);
    close(errpipe[0]), close(errpipe[1]), close(netpipe[0]), close(netpipe[1]);
    fs::remove_all(dir);
    return r;
  }
  if (pid == 0) {
    close(errpipe[0]);
    close(netpipe[0]);
    setpgid(0, 0);
    // A network namespace as root needs CAP_SYS_ADMIN; otherwise one inside a new user namespace,
    // made after dropping to nobody (so nobody's uid stays the real one for RLIMIT_NPROC).
    char net = unshare(CLONE_NEWNET) == 0 ? 1 : 0;
    if (chdir(dir.c_str()) != 0) child_fail(errpipe[1], "chdir");
    const int out = open("output.txt", O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (out < 0) child_fail(errpipe[1], "open output");
    if (root && fchown(out, kNobody, kNogroup) != 0) child_fail(errpipe[1], "fchown");
    const int devnull = open("/dev/null", O_RDONLY);
    dup2(devnull, 0), dup2(out, 1), dup2(out, 2);
    close(out), close(devnull);
    if (root) {
      if (setgroups(0, nullptr) != 0 || setgid(kNogroup) != 0 || setuid(kNobody) != 0) child_fail(errpipe[1], "drop to nobody");
    }
    if (!net && unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0) net = 1;
    (void)!write(netpipe[1], &net, 1);
    auto lim = [&](int res, rlim_t v, const char* what) {
      struct rlimit rl{v, v};
      if (setrlimit(res, &rl) != 0) child_fail(errpipe[1], what);
    };
    lim(RLIMIT_AS, rlim_t(limits.memory_bytes), "RLIMIT_AS");
    lim(RLIMIT_CPU, rlim_t(limits.timeout_seconds) + 1, "RLIMIT_CPU");
    lim(RLIMIT_FSIZE, rlim_t(limits.max_file_bytes), "RLIMIT_FSIZE");
    lim(RLIMIT_NOFILE, 64, "RLIMIT_NOFILE");
    lim(RLIMIT_CORE, 0, "RLIMIT_CORE");
    lim(RLIMIT_NPROC, rlim_t(nproc_base + limits.max_processes), "RLIMIT_NPROC");
    const char* env[] = {"PATH=/usr/bin:/bin", "HOME=/nonexistent", "LANG=C.UTF-8", "PYTHONHASHSEED=0", nullptr};
    execle(python.c_str(), python.c_str(), "-I", "-B", "-c", bootstrap.c_str(), (char*)nullptr, env);
    child_fail(errpipe[1], "exec python3");
  }
  close(errpipe[1]);
  close(netpipe[1]);
  setpgid(pid, pid);  // also from the parent, so the group exists before we may kill it
  char net = 0;
  if (read(netpipe[0], &net, 1) == 1) r.network_isolated = net == 1;
  close(netpipe[0]);
  r.dropped_privileges = root;
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration<double>(limits.timeout_seconds);
  int status = 0;
  for (;;) {
    const pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
    if (clock::now() >= deadline) {
      r.timed_out = true;
      kill(-pid, SIGKILL);
      waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  // Anything the program left behind in its process group (forked children), until none is left.
  // A child that left the group with setsid() escapes this; RLIMIT_NPROC and RLIMIT_CPU bound it.
  const auto give_up = clock::now() + std::chrono::seconds(2);
  // moelab is their subreaper (set below), so the killed ones are reaped here, not left as zombies.
  while (kill(-pid, SIGKILL) == 0 && clock::now() < give_up) {
    while (waitpid(-pid, nullptr, WNOHANG) > 0) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  char buf[512];
  const ssize_t n = read(errpipe[0], buf, sizeof buf);
  close(errpipe[0]);
  if (n > 0) r.error.assign(buf, size_t(n));
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.passed = !r.timed_out && r.error.empty() && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  r.output = tail_of(dir / "output.txt", 4096);
  std::error_code ec;
  fs::remove_all(dir, ec);
  return r;
}

}  // namespace moelab::evals
