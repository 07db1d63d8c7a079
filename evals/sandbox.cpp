// The parent side of the HumanEval sandbox: which mode this host allows, the plan for the child,
// the wall-clock limit, and making sure nothing the program started outlives it.
#include "evals/sandbox.hpp"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "evals/sandbox_child.hpp"

namespace moelab::evals {

namespace fs = std::filesystem;
using detail::ChildPlan;
using detail::kNobody;
using detail::kNogroup;

namespace {

// Installed in front of the program: raises inside the program (so the test fails) on anything that
// reaches outside its directory. A second layer only: it misses e.g. _posixsubprocess.fork_exec.
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

constexpr int kNamespaceFlags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS;

using Clock = std::chrono::steady_clock;

struct ProcInfo {
  pid_t pid;
  pid_t ppid;
  uid_t uid;
  bool zombie;
};

std::vector<ProcInfo> list_processes() {
  std::vector<ProcInfo> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream f(e.path() / "status");
    ProcInfo p{pid_t(std::stol(name)), -1, uid_t(-1), false};
    for (std::string line; std::getline(f, line);) {
      if (line.rfind("State:", 0) == 0) p.zombie = line.find('Z') != std::string::npos;
      if (line.rfind("PPid:", 0) == 0) p.ppid = pid_t(std::stol(line.substr(5)));
      if (line.rfind("Uid:", 0) == 0) p.uid = uid_t(std::stoul(line.substr(4)));
    }
    if (p.ppid >= 0) out.push_back(p);
  }
  return out;
}

int count_processes_of(uid_t uid) {
  int n = 0;
  for (const auto& p : list_processes()) n += p.uid == uid && !p.zombie;
  return n;
}

std::string tail_of(int fd, size_t max_bytes) {
  struct stat st{};
  if (fstat(fd, &st) != 0) return {};
  const off_t size = st.st_size, from = size > off_t(max_bytes) ? size - off_t(max_bytes) : 0;
  std::string s(size_t(size - from), '\0');
  const ssize_t n = pread(fd, s.data(), s.size(), from);
  s.resize(n > 0 ? size_t(n) : 0);
  return s;
}

std::string read_all(int fd) {
  std::string s;
  char buf[512];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    s.append(buf, size_t(n));
  }
  return s;
}

std::string resolve_on_path(const std::string& exe) {
  if (exe.find('/') != std::string::npos) return exe;
  const char* path = std::getenv("PATH");
  std::stringstream ss(path ? path : "/usr/bin:/bin");
  for (std::string d; std::getline(ss, d, ':');)
    if (!d.empty() && access((d + "/" + exe).c_str(), X_OK) == 0) return d + "/" + exe;
  return exe;
}

bool is_under(const fs::path& p, const fs::path& dir) {
  const auto r = p.lexically_relative(dir);
  return !r.empty() && *r.begin() != "..";
}

// /root, /home and $HOME, unless python3 or /tmp lives there (then that one stays visible).
std::vector<std::string> directories_to_hide(const std::string& python) {
  std::error_code ec;
  fs::path py = fs::weakly_canonical(python, ec);
  std::vector<std::string> out;
  std::vector<std::string> candidates = {"/root", "/home"};
  if (const char* h = std::getenv("HOME"); h && h[0] == '/') candidates.push_back(fs::weakly_canonical(h, ec).string());
  for (const auto& c : candidates) {
    if (c == "/" || !fs::is_directory(c, ec) || is_under(py, c) || is_under("/tmp", c) || is_under(c, "/tmp")) continue;
    bool dup = false;
    for (const auto& o : out) dup |= is_under(c, o) || is_under(o, c);
    if (!dup) out.push_back(c);
  }
  return out;
}

// Process-group mode: can a network namespace be made (root without the rest, say)? Probed once.
bool process_group_network() {
  static const bool ok = [] {
    const pid_t pid = fork();
    if (pid == 0) _exit(unshare(CLONE_NEWNET) == 0 ? 0 : 1);
    int st = 0;
    if (pid < 0) return false;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }();
  return ok;
}

// Everything the child needs, prepared before fork/clone (the strings live here).
struct Prepared {
  std::string dir, dir_tmpfs_options, python, bootstrap, label, tmpdir_env;
  std::vector<std::string> hidden;
  std::vector<const char*> argv, envp;
  ChildPlan plan;
};

void prepare(Prepared& pr, SandboxMode mode, const std::string& dir, const std::string& program,
             const SandboxLimits& limits) {
  const bool root = geteuid() == 0;
  pr.dir = dir;
  pr.dir_tmpfs_options = "mode=0700,nr_inodes=4096,size=" + std::to_string(std::max(4 * limits.max_file_bytes, 1L << 20));
  pr.python = resolve_on_path(sandbox_python());
  pr.bootstrap = std::string("import sys\n") +
                 (limits.python_guard ? "exec(compile(open('guard.py').read(), 'guard.py', 'exec'))\n" : "") +
                 "__name__ = '__main__'\n"
                 "sys.argv = ['program.py']\n"
                 "exec(compile(open('program.py').read(), 'program.py', 'exec'))\n";
  pr.label = limits.label;
  pr.tmpdir_env = "TMPDIR=" + dir;
  pr.argv = {pr.python.c_str(), "-I", "-B", "-c", pr.bootstrap.c_str(), pr.label.c_str(), nullptr};
  pr.envp = {"PATH=/usr/bin:/bin", "HOME=/nonexistent", "LANG=C.UTF-8", "PYTHONHASHSEED=0", pr.tmpdir_env.c_str(), nullptr};
  if (mode != SandboxMode::process_group) pr.hidden = directories_to_hide(pr.python);
  ChildPlan& p = pr.plan;
  p.mode = mode;
  p.isolate_network = limits.isolate_network && (mode != SandboxMode::process_group || process_group_network());
  p.drop_to_nobody = root && mode != SandboxMode::user_namespaces;
  p.outer_uid = geteuid();
  p.outer_gid = getegid();
  p.dir = pr.dir.c_str();
  p.dir_tmpfs_options = pr.dir_tmpfs_options.c_str();
  p.program = program.data();
  p.program_len = program.size();
  p.guard = kGuard;
  p.guard_len = strlen(kGuard);
  for (const auto& h : pr.hidden) p.hidden.push_back(h.c_str());
  p.python = pr.python.c_str();
  p.argv = pr.argv.data();
  p.envp = pr.envp.data();
  p.rlimit_as = static_cast<unsigned long>(limits.memory_bytes);
  p.rlimit_cpu = static_cast<unsigned long>(limits.timeout_seconds) + 1;
  p.rlimit_fsize = static_cast<unsigned long>(limits.max_file_bytes);
  // RLIMIT_NPROC counts the uid's processes in its user namespace: in the namespace modes only the sandbox's
  // (user-namespaces: the init too), in process-group mode every nobody's on the host (or the caller's).
  const int base = mode == SandboxMode::namespaces        ? 0
                   : mode == SandboxMode::user_namespaces ? 1
                                                          : count_processes_of(p.drop_to_nobody ? kNobody : geteuid());
  p.rlimit_nproc = static_cast<unsigned long>(base + limits.max_processes);
}

bool write_text(const std::string& path, const std::string& text) {
  const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = write(fd, text.data(), text.size()) == ssize_t(text.size());
  return close(fd) == 0 && ok;
}

// Every namespace mode has its own user namespace: RLIMIT_NPROC then counts this sandbox's processes only,
// not every nobody on the host. As root, moelab maps root and nobody to themselves (the init keeps root's
// ids, with capabilities only inside; the program becomes nobody); unprivileged, the init maps itself.
pid_t clone_namespace_init(ChildPlan& plan, std::vector<char>& stack, std::string& error) {
  int flags = kNamespaceFlags | CLONE_NEWUSER | SIGCHLD;
  if (plan.isolate_network) flags |= CLONE_NEWNET;
  stack.resize(1 << 18);
  int go[2] = {-1, -1};
  if (plan.mode == SandboxMode::namespaces && pipe2(go, O_CLOEXEC) != 0) {
    error = std::string("pipe: ") + strerror(errno);
    return -1;
  }
  plan.go_fd = go[0];
  const pid_t pid = clone(detail::namespace_init, stack.data() + stack.size(), flags, &plan);
  if (pid < 0) error = std::string("clone: ") + strerror(errno);
  if (plan.mode == SandboxMode::namespaces) {
    close(go[0]);
    const std::string map = "0 0 1\n" + std::to_string(kNobody) + " " + std::to_string(kNobody) + " 1\n";
    const std::string gmap = "0 0 1\n" + std::to_string(kNogroup) + " " + std::to_string(kNogroup) + " 1\n";
    const std::string proc = "/proc/" + std::to_string(pid);
    if (pid > 0 && (!write_text(proc + "/uid_map", map) || !write_text(proc + "/gid_map", gmap))) {
      error = std::string("writing the sandbox's id maps: ") + strerror(errno);
      kill(pid, SIGKILL);
      while (waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
      close(go[1]);
      return -1;
    }
    if (pid > 0) (void)!write(go[1], "g", 1);
    close(go[1]);
  }
  return pid;
}

// Can the namespace init be set up here? Runs the whole setup, then exits; "" when it worked.
std::string probe(SandboxMode mode) {
  static const std::string nothing;
  Prepared pr;
  prepare(pr, mode, "/tmp/moelab-sandbox-probe", nothing, SandboxLimits{});
  int errpipe[2];
  if (pipe2(errpipe, O_CLOEXEC) != 0) return std::string("pipe: ") + strerror(errno);
  pr.plan.err_fd = errpipe[1];
  pr.plan.probe = true;
  std::vector<char> stack;
  std::string why;
  const pid_t pid = clone_namespace_init(pr.plan, stack, why);
  close(errpipe[1]);
  if (pid > 0) {
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    why = read_all(errpipe[0]);
    if (why.empty() && !(WIFEXITED(st) && WEXITSTATUS(st) == 0)) why = "setup did not complete";
  }
  close(errpipe[0]);
  return why;
}

// Process-group mode: moelab is the child subreaper, so every orphan of the program becomes our child.
// Kill each living child of ours that runs as the sandbox uid, reap, repeat until none is left.
// Returns whether any was still running.
bool kill_descendants(uid_t uid) {
  bool any_alive = false;
  const auto give_up = Clock::now() + std::chrono::seconds(5);
  for (;;) {
    bool found = false;
    for (const auto& p : list_processes()) {
      if (p.ppid != getpid() || p.uid != uid) continue;
      found = true;
      any_alive |= !p.zombie;
      kill(p.pid, SIGKILL);
      waitpid(p.pid, nullptr, WNOHANG);
    }
    if (!found || Clock::now() > give_up) return any_alive;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

}  // namespace

const char* sandbox_mode_name(SandboxMode m) {
  switch (m) {
    case SandboxMode::namespaces: return "namespaces";
    case SandboxMode::user_namespaces: return "user-namespaces";
    case SandboxMode::process_group: return "process-group";
  }
  return "?";
}

SandboxMode sandbox_mode() {
  static const SandboxMode mode = [] {
    std::string why;
    if (geteuid() == 0) {
      why = probe(SandboxMode::namespaces);
      if (why.empty()) return SandboxMode::namespaces;
    }
    const std::string why_user = probe(SandboxMode::user_namespaces);
    if (why_user.empty()) return SandboxMode::user_namespaces;
    std::fprintf(stderr,
                 "moelab: the HumanEval sandbox cannot use Linux namespaces here (%s); falling back to rlimits, "
                 "a process group and uid nobody (when root): weaker, the programs see the real filesystem\n",
                 (why.empty() ? why_user : why + "; " + why_user).c_str());
    return SandboxMode::process_group;
  }();
  return mode;
}

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
  const SandboxMode mode = limits.mode ? *limits.mode : sandbox_mode();
  r.mode = mode;
  // Namespace modes: the sample directory exists only in the namespace's private /tmp. Process-group mode:
  // a fresh directory on the host, removed afterwards.
  const bool private_dir = mode != SandboxMode::process_group;
  std::string dir = "/tmp/moelab-sandbox-" + std::to_string(getpid());
  char tmpl[] = "/tmp/moelab-sandbox-XXXXXX";
  if (!private_dir) {
    if (!mkdtemp(tmpl)) {
      r.error = std::string("mkdtemp: ") + strerror(errno);
      return r;
    }
    dir = tmpl;
  }
  Prepared pr;
  prepare(pr, mode, dir, program, limits);
  ChildPlan& plan = pr.plan;
  std::error_code ec;
  if (!private_dir) {
    std::ofstream(dir + "/guard.py") << kGuard;
    std::ofstream(dir + "/program.py") << program;
    if (plan.drop_to_nobody) (void)!chown(dir.c_str(), kNobody, kNogroup);
  }
  // The output goes to an unlinked temporary file: nothing is left on disk even if moelab is killed.
  char out_tmpl[] = "/tmp/moelab-sandbox-output-XXXXXX";
  const int out = mkostemp(out_tmpl, O_CLOEXEC);
  if (out >= 0) unlink(out_tmpl);
  int errpipe[2] = {-1, -1}, statuspipe[2] = {-1, -1};
  if (out < 0 || pipe2(errpipe, O_CLOEXEC) != 0 || pipe2(statuspipe, O_CLOEXEC) != 0) {
    r.error = std::string("sandbox setup: ") + strerror(errno);
    for (int fd : {out, errpipe[0], errpipe[1], statuspipe[0], statuspipe[1]})
      if (fd >= 0) close(fd);
    if (!private_dir) fs::remove_all(dir, ec);
    return r;
  }
  plan.out_fd = out;
  plan.err_fd = errpipe[1];
  plan.status_fd = statuspipe[1];

  std::vector<char> stack;
  pid_t pid;
  if (mode == SandboxMode::process_group) {
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    pid = fork();
    if (pid == 0) detail::exec_program(plan);
    if (pid < 0) r.error = std::string("fork: ") + strerror(errno);
  } else {
    pid = clone_namespace_init(plan, stack, r.error);
  }
  close(errpipe[1]);
  close(statuspipe[1]);
  r.network_isolated = plan.isolate_network;
  r.dropped_privileges = plan.drop_to_nobody || mode == SandboxMode::user_namespaces;
  int status = 0;
  if (pid > 0) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(limits.timeout_seconds);
    for (;;) {
      const pid_t w = waitpid(pid, &status, WNOHANG);
      if (w == pid || (w < 0 && errno != EINTR)) break;
      if (Clock::now() >= deadline) {
        // Namespace modes: killing the init kills every process in the namespace; waitpid returns
        // only once they are all gone.
        r.timed_out = true;
        kill(pid, SIGKILL);
        if (mode == SandboxMode::process_group) kill(-pid, SIGKILL);
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (mode == SandboxMode::process_group) {
      // The program's children (its group, setsid or not) are ours now: the sweep sees them alive.
      r.stray_processes = kill_descendants(plan.drop_to_nobody ? kNobody : geteuid());
      kill(-pid, SIGKILL);
    } else {
      detail::InitReport rep;
      if (read(statuspipe[0], &rep, sizeof rep) == ssize_t(sizeof rep)) {
        status = rep.wait_status;
        r.stray_processes = rep.stray != 0;
      } else if (!r.timed_out) {
        status = -1;
      }
    }
  }
  r.error += read_all(errpipe[0]);
  if (status == -1 && r.error.empty()) r.error = "the sandbox's init ended without reporting the program's status";
  close(errpipe[0]);
  close(statuspipe[0]);
  if (status != -1 && !r.timed_out) {
    if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  }
  r.passed = pid > 0 && !r.timed_out && !r.stray_processes && r.error.empty() && r.exit_code == 0 && r.signal == 0;
  r.output = tail_of(out, 4096);
  close(out);
  if (!private_dir) fs::remove_all(dir, ec);
  return r;
}

}  // namespace moelab::evals
