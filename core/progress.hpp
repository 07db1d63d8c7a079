#pragma once
// Progress on stderr for long work: a one-line bar with rate and ETA when stderr is a terminal; when
// it is redirected (nohup, a batch scheduler's log) and `enabled` was asked for regardless of the
// terminal, a plain line every 10 seconds (and one at the end after those), so a log shows the job is
// alive. Callers that want no lines in logs pass enabled = stderr_is_terminal().
#include <chrono>
#include <cstdint>
#include <string>

namespace moelab {

class Progress {
 public:
  enum class Unit { Items, Bytes };  // Bytes: counts shown in MiB with a MB/s rate
  Progress(std::string label, int64_t total, bool enabled = true, Unit unit = Unit::Items);
  ~Progress();
  void advance(int64_t n = 1);
  void finish();

 private:
  void draw(bool final);
  std::string label_;
  int64_t total_, done_ = 0;
  bool enabled_, terminal_, finished_ = false, printed_ = false;
  Unit unit_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

bool stderr_is_terminal();

}  // namespace moelab
