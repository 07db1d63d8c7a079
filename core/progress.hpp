#pragma once
// A one-line progress bar with rate and ETA on stderr, drawn only when stderr is a terminal
// (so logs and CI output stay clean).
#include <chrono>
#include <cstdint>
#include <string>

namespace moelab {

class Progress {
 public:
  Progress(std::string label, int64_t total, bool enabled = true);
  ~Progress();
  void advance(int64_t n = 1);
  void finish();

 private:
  void draw(bool final);
  std::string label_;
  int64_t total_, done_ = 0;
  bool enabled_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

bool stderr_is_terminal();

}  // namespace moelab
