#include "core/spawn.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.hpp"

extern char** environ;

namespace moelab {

namespace {

// A posix_spawn_file_actions_t released on every path.
struct FileActions {
  posix_spawn_file_actions_t a;
  FileActions() { posix_spawn_file_actions_init(&a); }
  ~FileActions() { posix_spawn_file_actions_destroy(&a); }
  FileActions(const FileActions&) = delete;
  FileActions& operator=(const FileActions&) = delete;
};

}  // namespace

std::string describe_command(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    if (!out.empty()) out += ' ';
    const bool plain = !a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                                                         "_-./=:,+@%") == std::string::npos;
    if (plain) {
      out += a;
      continue;
    }
    out += '\'';
    for (char c : a) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    out += '\'';
  }
  return out;
}

int run_process(const std::vector<std::string>& argv, const SpawnOptions& o) {
  if (argv.empty() || argv[0].empty()) throw Error("run_process: no program to run");
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const auto& s : argv) args.push_back(const_cast<char*>(s.c_str()));
  args.push_back(nullptr);

  FileActions fa;
  const int flags = O_WRONLY | O_CREAT | O_TRUNC;
  if (!o.stdout_path.empty()) posix_spawn_file_actions_addopen(&fa.a, STDOUT_FILENO, o.stdout_path.c_str(), flags, 0644);
  if (!o.stderr_path.empty()) posix_spawn_file_actions_addopen(&fa.a, STDERR_FILENO, o.stderr_path.c_str(), flags, 0644);

  pid_t pid = -1;
  // posix_spawnp searches PATH only when argv[0] has no '/', as execvp does. glibc reports a failed
  // exec (not found, not executable) as this call's result.
  const int rc = posix_spawnp(&pid, args[0], &fa.a, nullptr, args.data(), environ);
  if (rc != 0) throw Error(fmt::format("cannot run {}: {}", argv[0], std::strerror(rc)));
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw Error(fmt::format("{}: waiting for the process failed: {}", argv[0], std::strerror(errno)));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 255;
}

}  // namespace moelab
