#pragma once
// Progress on stderr for long work: a one-line bar with rate and ETA when stderr is a terminal; when
// it is redirected (nohup, a batch scheduler's log) and `enabled` was asked for regardless of the
// terminal, a plain line every 10 seconds (and one at the end after those), so a log shows the job is
// alive. The process-wide mode (--progress on the command line) can force the bar or the lines, or
// silence every Progress.
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
  // Text shown after the count on the next draw (a training loop's loss and tokens/s); "" for none.
  void set_detail(std::string detail) { detail_ = std::move(detail); }

 private:
  void draw(bool final);
  std::string label_, detail_;
  int64_t total_, done_ = 0;
  bool enabled_, terminal_, finished_ = false, printed_ = false;
  Unit unit_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

bool stderr_is_terminal();

// auto: a bar on a terminal, lines when stderr is redirected; bar / lines: that form either way; none: silent.
enum class ProgressMode { Auto, Bar, Lines, None };
void set_progress_mode(ProgressMode mode);
ProgressMode progress_mode();
// "auto", "bar", "lines", "none"; throws moelab::Error for anything else.
ProgressMode parse_progress_mode(const std::string& name);

}  // namespace moelab
