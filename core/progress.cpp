#include "core/progress.hpp"

#include <unistd.h>

#include <cstdio>
#include <fmt/format.h>

#include "core/clock.hpp"

namespace moelab {

bool stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

Progress::Progress(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)), total_(total), enabled_(enabled && stderr_is_terminal()),
      start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

Progress::~Progress() { finish(); }

void Progress::advance(int64_t n) {
  done_ += n;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ > std::chrono::milliseconds(100)) {
    last_draw_ = now;
    draw(false);
  }
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  draw(true);
}

void Progress::draw(bool final) {
  if (!enabled_ || total_ <= 0) return;
  const double secs = seconds_since(start_);
  const double frac = double(done_) / double(total_);
  const int width = 30, filled = int(frac * width + 0.5);
  const double eta = done_ > 0 ? secs * (double(total_ - done_) / double(done_)) : 0.0;
  std::fprintf(stderr, "\r%s [%s%s] %lld/%lld %5.1fs%s", label_.c_str(), std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), (long long)done_, (long long)total_, secs,
               final ? "\n" : fmt::format(" eta {:.1f}s", eta).c_str());
  std::fflush(stderr);
}

}  // namespace moelab
