#pragma once
// Helpers the tests share for files and child processes: a scratch folder per test, read a whole file,
// and run a program from an argument vector (posix_spawn, no shell) with its stdout and stderr in files
// and a time limit (core/spawn.hpp's run_process has neither the limit nor the captured output).
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/spawn.hpp"

extern char** environ;

namespace moelab::test {

// A fresh folder under the system temp directory, removed with everything in it on destruction; its name
// holds the process id and a counter, so tests running in parallel (ctest -j) never share one.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "moelab-test") {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            (prefix + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string str() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// The whole file as bytes ("" when it cannot be opened: the caller's assertion on the content says so).
inline std::string read_file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct ProgramRun {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  bool timed_out = false;
  std::string out, err;
};

// Starts argv[0] with argv (no shell, stdin from /dev/null); stdout and stderr go to the two files; the
// environment is `envp` (null-terminated; null: this process's). Returns the pid, or -1 when the program
// could not be started.
inline pid_t spawn_program(const std::vector<std::string>& args, const std::filesystem::path& out_file,
                           const std::filesystem::path& err_file, char* const* envp = nullptr) {
  std::vector<std::string> all = args;
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp ? envp : environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc == 0 ? pid : -1;
}

// Waits for `pid` at most `seconds` (then kills it and says so in timed_out), and reads its outputs.
inline ProgramRun wait_program(pid_t pid, double seconds, const std::filesystem::path& out_file,
                               const std::filesystem::path& err_file) {
  ProgramRun r;
  if (pid < 0) {
    r.err = "could not start the program";
    return r;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  int status = 0;
  for (;;) {
    const pid_t w = ::waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (std::chrono::steady_clock::now() > deadline) {
      r.timed_out = true;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.out = read_file_bytes(out_file);
  r.err = read_file_bytes(err_file);
  return r;
}

// spawn_program + wait_program with the outputs in `dir` (stdout.txt, stderr.txt).
inline ProgramRun run_program(const std::vector<std::string>& args, const std::filesystem::path& dir,
                              double seconds = 120) {
  const auto out = dir / "stdout.txt", err = dir / "stderr.txt";
  return wait_program(spawn_program(args, out, err), seconds, out, err);
}

#ifdef MOELAB_BIN
// The moelab binary with `args` (no shell), stdout and stderr in files in `dir`; status as
// core/spawn.hpp's run_process reports it (exit code, or 128 + the signal).
struct MoelabRun {
  int status;
  std::string out, err;
};
inline MoelabRun run_moelab(std::vector<std::string> args, const std::filesystem::path& dir) {
  args.insert(args.begin(), MOELAB_BIN);
  const auto out = dir / "stdout.txt", err = dir / "stderr.txt";
  const int status = run_process(args, {.stdout_path = out.string(), .stderr_path = err.string()});
  return {status, read_file_bytes(out), read_file_bytes(err)};
}
#endif

}  // namespace moelab::test
