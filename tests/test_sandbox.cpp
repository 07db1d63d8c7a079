// The HumanEval sandbox (evals/sandbox.*): hostile programs are failed samples, touch nothing on the host,
// and leave no process behind. Each test runs in every mode this host supports (the strongest it picks
// itself, user namespaces, the process-group fallback) and says which; a mode the host lacks is SKIPPED
// with its reason. Each program carries a unique marker on its command line; after every run no process
// on the host may carry it. Where a mode is documented as weaker (process-group: the real /tmp is
// writable), the test says so and checks what that mode promises.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <grp.h>
#include <gtest/gtest.h>
#include <iostream>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "evals/sandbox.hpp"

using namespace moelab::evals;
namespace fs = std::filesystem;

namespace {

std::string new_marker() {
  static std::atomic<int> n{0};
  return "moelab-sbx-test-" + std::to_string(getpid()) + "-" + std::to_string(n++);
}

// Processes on the host whose command line carries the marker.
std::vector<pid_t> processes_with(const std::string& marker) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream f(e.path() / "cmdline", std::ios::binary);
    std::string cmd((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (cmd.find(marker) != std::string::npos && pid_t(std::stol(name)) != getpid()) out.push_back(pid_t(std::stol(name)));
  }
  return out;
}

// Calls _posixsubprocess.fork_exec directly (no audit event), whatever its arity in this Python.
const char* kForkExec = R"PY(
import _posixsubprocess, os
def spawn(argv, exe):
    tail = {23: [True, False, -1, None, None, None, -1, None, False],
            22: [True, False, -1, None, None, None, -1, None],
            21: [True, False, None, None, None, -1, None]}
    for n in (23, 22, 21):
        r, w = os.pipe()
        try:
            return _posixsubprocess.fork_exec(argv, [exe], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, *tail[n])
        except TypeError as e:
            last = e
        finally:
            os.close(r)
            os.close(w)
    raise last
)PY";

// The user-namespaces mode is what an unprivileged user gets. Run as root it would be a different thing
// (the kernel exempts uid 0 from RLIMIT_NPROC even inside a user namespace), so as root the test runs the
// sandbox from a child that first becomes an unprivileged uid.
constexpr uid_t kUnprivileged = 64999;
void become_unprivileged() {  // in a forked child only
  if (setgroups(0, nullptr) != 0 || setresgid(kUnprivileged, kUnprivileged, kUnprivileged) != 0 ||
      setresuid(kUnprivileged, kUnprivileged, kUnprivileged) != 0)
    _exit(2);
}
SandboxResult run_unprivileged(const std::string& code, const SandboxLimits& l) {
  int p[2];
  if (pipe(p) != 0) return {};
  const pid_t c = fork();
  if (c == 0) {
    close(p[0]);
    become_unprivileged();
    const SandboxResult r = run_python_sandboxed(code, l);
    const std::string s = nlohmann::json{{"passed", r.passed}, {"timed_out", r.timed_out}, {"exit_code", r.exit_code},
                                         {"signal", r.signal}, {"stray", r.stray_processes}, {"mode", int(r.mode)},
                                         {"net", r.network_isolated}, {"dropped", r.dropped_privileges},
                                         {"output", r.output}, {"error", r.error}}.dump();
    (void)!write(p[1], s.data(), s.size());
    _exit(0);
  }
  close(p[1]);
  std::string s;
  char buf[4096];
  for (ssize_t n; (n = read(p[0], buf, sizeof buf)) > 0;) s.append(buf, size_t(n));
  close(p[0]);
  waitpid(c, nullptr, 0);
  SandboxResult r;
  if (s.empty()) {
    r.error = "the unprivileged child reported nothing";
    return r;
  }
  const auto j = nlohmann::json::parse(s);
  r.passed = j["passed"], r.timed_out = j["timed_out"], r.exit_code = j["exit_code"], r.signal = j["signal"];
  r.stray_processes = j["stray"], r.mode = SandboxMode(j["mode"].get<int>()), r.network_isolated = j["net"];
  r.dropped_privileges = j["dropped"], r.output = j["output"], r.error = j["error"];
  return r;
}

SandboxResult run_in_mode(const std::string& code, const SandboxLimits& l) {
  if (l.mode == SandboxMode::user_namespaces && geteuid() == 0) return run_unprivileged(code, l);
  return run_python_sandboxed(code, l);
}

struct ModeParam {
  std::optional<SandboxMode> mode;  // unset: the strongest this host supports
};
std::string param_name(const ::testing::TestParamInfo<ModeParam>& i) {
  if (!i.param.mode) return "Strongest";
  return *i.param.mode == SandboxMode::user_namespaces ? "UserNamespaces" : "ProcessGroup";
}

class EvalSandbox : public ::testing::TestWithParam<ModeParam> {
 protected:
  void SetUp() override {
    if (access(sandbox_python().c_str(), X_OK) != 0) GTEST_SKIP() << "no python3 at " << sandbox_python();
    mode_ = GetParam().mode.value_or(sandbox_mode());
    if (GetParam().mode) {  // can this host run the forced mode at all?
      SandboxLimits l;
      l.mode = mode_;
      const auto r = run_in_mode("pass\n", l);
      if (!r.error.empty()) GTEST_SKIP() << sandbox_mode_name(mode_) << " mode unavailable here: " << r.error;
    }
    std::cout << "[ sandbox  ] mode " << sandbox_mode_name(mode_)
              << (GetParam().mode ? " (forced)" : " (the strongest this host supports)")
              << (mode_ == SandboxMode::user_namespaces && geteuid() == 0 ? ", run as uid 64999" : "") << "\n";
    RecordProperty("sandbox_mode", sandbox_mode_name(mode_));
  }
  bool kernel_holds_filesystem() const { return mode_ != SandboxMode::process_group; }

  // Runs code with the marker on its command line, then checks that nothing carrying it survives.
  SandboxResult run(const std::string& code, const std::string& marker, double timeout = 5.0, bool guard = false,
                    bool network = true, int max_processes = 32) {
    SandboxLimits l;
    l.timeout_seconds = timeout;
    l.memory_bytes = 1L << 30;
    l.python_guard = guard;
    l.isolate_network = network;
    l.max_processes = max_processes;
    l.mode = mode_;
    l.label = marker;
    SandboxResult r = run_in_mode(code, l);
    EXPECT_EQ(r.mode, mode_);
    const auto left = processes_with(marker);
    EXPECT_TRUE(left.empty()) << left.size() << " process(es) outlived the sample, first pid " << left[0];
    return r;
  }
  SandboxMode mode_ = SandboxMode::process_group;
};

}  // namespace

TEST(EvalSandboxMode, SaysWhichModeThisHostGets) {
  std::cout << "[ sandbox  ] this host: " << sandbox_mode_name(sandbox_mode()) << "\n";
  if (geteuid() == 0 && sandbox_mode() != SandboxMode::namespaces)
    GTEST_LOG_(WARNING) << "running as root without namespaces: the sandbox is in a weaker mode";
  SUCCEED();
}

TEST_P(EvalSandbox, CorrectSolutionPassesWrongOneFails) {
  const std::string m = new_marker();
  const std::string prompt = "def add(a, b):\n", test = "def check(f):\n    assert f(2, 3) == 5\n";
  for (bool guard : {true, false}) {
    const auto good = run(humaneval_program(prompt, "    return a + b\n", test, "add"), m, 5.0, guard);
    EXPECT_TRUE(good.passed) << good.output << good.error;
    const auto bad = run(humaneval_program(prompt, "    return a * b\n", test, "add"), m, 5.0, guard);
    EXPECT_FALSE(bad.passed);
    EXPECT_NE(bad.output.find("AssertionError"), std::string::npos) << bad.output;
  }
  EXPECT_FALSE(run("def f(:\n", m).passed);  // syntax error
  // What a test harness needs still works: its own directory, tempfile, reading the standard library.
  const auto files = run(
      "import tempfile, json, os\n"
      "open('inside.txt', 'w').write('ok')\n"
      "assert open('inside.txt').read() == 'ok'\n"
      "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n"
      "print(json.dumps({'cwd': os.getcwd()}))\n",
      m);
  EXPECT_TRUE(files.passed) << files.output << files.error;
}

TEST_P(EvalSandbox, InfiniteLoopIsKilledAtTheTimeLimit) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = run("while True:\n    pass\n", new_marker(), 1.0);
  EXPECT_FALSE(r.passed);
  EXPECT_TRUE(r.timed_out);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
}

TEST_P(EvalSandbox, LargeAllocationFails) {
  const auto r = run("x = bytearray(16 * 1024**3)\nprint(len(x))\n", new_marker());
  EXPECT_FALSE(r.passed);
  EXPECT_NE(r.output.find("MemoryError"), std::string::npos) << r.output;
}

// The escape of issue 13: _posixsubprocess.fork_exec is not an audit event, so the hook never sees the
// shell. The program passes only if the shell's write to /tmp worked; it also leaves a sleep running.
TEST_P(EvalSandbox, ForkExecBypassRunsNoShellOnTheHost) {
  for (bool guard : {true, false}) {
    const std::string m = new_marker();
    const std::string target = "/tmp/" + m + ".txt";
    const auto r = run(std::string(kForkExec) +
                           "spawn([b'" + m + "', b'900'], b'/bin/sleep')\n"
                           "pid = spawn([b'/bin/sh', b'-c', b'id > " + target + "'], b'/bin/sh')\n"
                           "_, st = os.waitpid(pid, 0)\n"
                           "assert os.waitstatus_to_exitcode(st) == 0, 'the shell could not write'\n",
                       m, 5.0, guard);
    EXPECT_FALSE(r.passed) << r.output;
    EXPECT_TRUE(r.stray_processes) << "the sleep started through fork_exec should count as left behind";
    if (kernel_holds_filesystem()) {
      EXPECT_NE(r.output.find("the shell could not write"), std::string::npos) << r.output;
      EXPECT_FALSE(fs::exists(target)) << "the shell wrote on the host";
    } else {
      std::cout << "[ sandbox  ] process-group mode: the real /tmp is writable to nobody ("
                << (fs::exists(target) ? "the shell wrote " + target : "not written") << ")\n";
    }
    fs::remove(target);
  }
}

TEST_P(EvalSandbox, SetsidOrphanAndDoubleForkDie) {
  for (bool setsid : {true, false}) {
    const std::string m = new_marker();
    const auto r = run(std::string("import os, time\n"
                                   "if os.fork() == 0:\n") +
                           (setsid ? "    os.setsid()\n" : "") +
                           "    if os.fork() == 0:\n"
                           "        os.execv('/bin/sleep', ['" + m + "', '900'])\n"
                           "    os._exit(0)\n"
                           "os.wait()\n"
                           "time.sleep(0.3)\n",
                       m);
    EXPECT_FALSE(r.passed) << "a program that leaves a process running fails";
    EXPECT_TRUE(r.stray_processes);
    EXPECT_EQ(r.exit_code, 0) << r.output;  // it failed for the orphan, not for itself
  }
}

// moelab itself killed (-9) while the program runs: the namespace's init has PDEATHSIG, so all die.
TEST_P(EvalSandbox, NothingOutlivesAKilledMoelab) {
  if (!kernel_holds_filesystem())
    GTEST_SKIP() << "process-group mode cannot outlive its parent's kill -9 (documented in docs/evals.md)";
  const std::string m = new_marker();
  const pid_t moelab = fork();
  ASSERT_GE(moelab, 0);
  if (moelab == 0) {
    SandboxLimits l;
    l.mode = mode_;
    l.label = m;
    l.python_guard = false;
    l.timeout_seconds = 60;
    if (mode_ == SandboxMode::user_namespaces && geteuid() == 0) become_unprivileged();
    run_python_sandboxed("import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['" + m +
                             "-sleep', '900'])\nos.execv('/bin/sleep', ['" + m + "-sleep', '900'])\n",
                         l);
    _exit(0);
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (processes_with(m + "-sleep").size() < 2 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(processes_with(m + "-sleep").size(), 2u) << "the program did not start its two sleeps";
  kill(moelab, SIGKILL);
  waitpid(moelab, nullptr, 0);
  const auto gone_by = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (!processes_with(m).empty() && std::chrono::steady_clock::now() < gone_by)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(processes_with(m).empty()) << "the program's processes outlived moelab";
}

TEST_P(EvalSandbox, WritingOutsideTheSampleDirFails) {
  const std::string m = new_marker();
  const std::string target = "/tmp/" + m + ".txt";
  EXPECT_FALSE(run("open('" + target + "', 'w').write('x')\n", m, 5.0, true).passed);  // the hook
  EXPECT_FALSE(fs::exists(target));
  if (kernel_holds_filesystem()) {
    const auto bare = run("open('" + target + "', 'w').write('x')\n", m);  // the kernel alone
    EXPECT_FALSE(bare.passed);
    EXPECT_NE(bare.output.find("Read-only file system"), std::string::npos) << bare.output;
    EXPECT_FALSE(fs::exists(target));
    const auto var_tmp = run("open('/var/tmp/" + m + "', 'w').write('x')\n", m);
    EXPECT_FALSE(var_tmp.passed);
    EXPECT_FALSE(fs::exists("/var/tmp/" + m));
  } else {
    std::cout << "[ sandbox  ] process-group mode: without the hook /tmp is writable (not tested)\n";
  }
  if (geteuid() == 0 || kernel_holds_filesystem()) {  // read-only root, or nobody
    EXPECT_FALSE(run("open('/etc/" + m + "', 'w').write('x')\n", m).passed);
    EXPECT_FALSE(fs::exists("/etc/" + m));
    EXPECT_FALSE(run("import os\nos.remove('/etc/hostname')\n", m).passed);
  }
  // The sample's own directory is gone from the host afterwards.
  const auto cwd = run("import os\nprint('cwd=' + os.getcwd())\n", m);
  ASSERT_TRUE(cwd.passed) << cwd.output << cwd.error;
  std::smatch sm;
  ASSERT_TRUE(std::regex_search(cwd.output, sm, std::regex("cwd=(\\S+)"))) << cwd.output;
  EXPECT_FALSE(fs::exists(sm[1].str())) << sm[1].str();
}

TEST_P(EvalSandbox, FilePlantedInHomeIsNotReadable) {
  const std::string m = new_marker();
  const char* home_env = std::getenv("HOME");
  fs::path home = home_env && *home_env ? home_env : "/root";
  const bool unprivileged = mode_ == SandboxMode::user_namespaces && geteuid() == 0;
  if (unprivileged) home = "/var/tmp/" + m + "-home";  // the unprivileged user's own home, outside /tmp
  if (!fs::is_directory(home) && !unprivileged) GTEST_SKIP() << "no home directory at " << home;
  if (!kernel_holds_filesystem() && geteuid() != 0)
    GTEST_SKIP() << "process-group mode without root runs as this user: it can read " << home;
  fs::create_directories(home);
  const fs::path secret = home / ("." + m + "-secret");
  std::ofstream(secret) << "secret-" << m << "\n";
  fs::permissions(secret, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read);
  const std::string old_home = home_env ? home_env : "";
  if (unprivileged) {  // owned by that user, who could read it outside the sandbox
    ASSERT_EQ(chown(home.c_str(), kUnprivileged, kUnprivileged), 0);
    ASSERT_EQ(chown(secret.c_str(), kUnprivileged, kUnprivileged), 0);
    setenv("HOME", home.c_str(), 1);
  }
  const auto r = run("print(open('" + secret.string() + "').read())\n", m);
  if (unprivileged) {
    setenv("HOME", old_home.c_str(), 1);
    fs::remove_all(home);
  } else {
    fs::remove(secret);
  }
  EXPECT_FALSE(r.passed);
  EXPECT_EQ(r.output.find("secret-"), std::string::npos) << "the program read the file: " << r.output;
}

// The test's own listener on loopback: a plain connect reaches it (the guard-off variant proves it), the
// sandboxed connect must not.
TEST_P(EvalSandbox, NetworkIsIsolated) {
  const int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  ASSERT_GE(ls, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(listen(ls, 8), 0);
  ASSERT_EQ(getsockname(ls, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const std::string m = new_marker();
  const std::string code = "import socket\ns = socket.create_connection(('127.0.0.1', " +
                           std::to_string(ntohs(a.sin_port)) + "), timeout=2)\ns.sendall(b'hello')\nprint('connected')\n";
  auto accepted = [&] {
    const int c = accept(ls, nullptr, nullptr);
    if (c >= 0) close(c);
    return c >= 0;
  };
  // Guard off, network not isolated: the same code reaches the listener, so this test can fail.
  const auto open_net = run(code, m, 5.0, false, false);
  EXPECT_TRUE(open_net.passed) << open_net.output << open_net.error;
  EXPECT_FALSE(open_net.network_isolated);
  EXPECT_TRUE(accepted()) << "the unsandboxed connect did not arrive";

  EXPECT_FALSE(run(code, m, 5.0, true).passed);  // the hook refuses sockets in any mode
  const auto r = run(code, m);                    // the kernel alone
  // The namespace modes always make a network namespace; only the process-group fallback may lack one.
  if (kernel_holds_filesystem()) {
    EXPECT_TRUE(r.network_isolated) << sandbox_mode_name(mode_);
  }
  if (!r.network_isolated) {
    close(ls);
    GTEST_SKIP() << sandbox_mode_name(mode_) << " mode here cannot make a network namespace";
  }
  EXPECT_FALSE(r.passed) << r.output;
  EXPECT_EQ(r.output.find("connected"), std::string::npos) << r.output;
  EXPECT_FALSE(accepted()) << "a sandboxed connect reached the host's loopback";
  close(ls);
}

// Children that stay alive hold process slots: the fork fails with EAGAIN at the cap (RLIMIT_NPROC),
// well before the time limit, and every child dies with the sample.
TEST_P(EvalSandbox, ForkBombHitsTheProcessCap) {
  const std::string m = new_marker();
  constexpr int kCap = 12;
  // Process-group mode: RLIMIT_NPROC counts all of nobody's processes on the host, so the cap is kCap above
  // those running at the start (another test process under ctest -j). The namespace modes count only the
  // sandbox's own (its user namespace), so their cap is exact.
  int nobody_before = 0;
  if (geteuid() == 0 && mode_ == SandboxMode::process_group)
    for (const auto& e : fs::directory_iterator("/proc")) {
      struct stat st{};
      const std::string name = e.path().filename();
      nobody_before += name.find_first_not_of("0123456789") == std::string::npos && stat(e.path().c_str(), &st) == 0 &&
                       st.st_uid == 65534;
    }
  const auto r = run("import os, sys, time\n"
                     "n = 0\n"
                     "try:\n"
                     "    while True:\n"
                     "        if os.fork() == 0:\n"
                     "            time.sleep(900)\n"
                     "            os._exit(0)\n"
                     "        n += 1\n"
                     "except OSError as e:\n"
                     "    print('capped after', n, 'forks, errno', e.errno, flush=True)\n"
                     "    sys.exit(3)\n",
                     m, 20.0, false, true, kCap);
  EXPECT_FALSE(r.passed);
  EXPECT_FALSE(r.timed_out) << "the cap should stop it, not the clock";
  std::smatch sm;
  ASSERT_TRUE(std::regex_search(r.output, sm, std::regex("capped after (\\d+) forks, errno (\\d+)"))) << r.output;
  EXPECT_GE(std::stoi(sm[1]), 1);
  EXPECT_LE(std::stoi(sm[1]) + 1, kCap + nobody_before) << "the program and its children: more than the cap";
  // In the namespace modes nothing else counts against the cap: the program and its children fill it
  // exactly, so a cap that was not applied (or applied off by some) fails here.
  if (kernel_holds_filesystem()) {
    EXPECT_EQ(std::stoi(sm[1]) + 1, kCap) << "the fork failed before the cap";
  }
  std::cout << "[ sandbox  ] capped after " << sm[1] << " forks (cap " << kCap << ", nobody ran " << nobody_before
            << " processes before)\n";
  EXPECT_EQ(std::stoi(sm[2]), EAGAIN);
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_TRUE(r.stray_processes);
  // Every process forking forever: stopped at the clock, nothing left; the machine still runs programs.
  const auto bomb = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", m, 2.0);
  EXPECT_FALSE(bomb.passed);
  EXPECT_TRUE(bomb.timed_out) << "every process forks forever: only the clock ends it";
  EXPECT_TRUE(run("print('still fine')\n", m).passed);
}

INSTANTIATE_TEST_SUITE_P(Modes, EvalSandbox,
                         ::testing::Values(ModeParam{std::nullopt}, ModeParam{SandboxMode::user_namespaces},
                                           ModeParam{SandboxMode::process_group}),
                         param_name);
