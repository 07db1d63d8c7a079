#include "core/progress.hpp"

#include <unistd.h>

#include <cstdio>
#include <fmt/format.h>

#include "core/clock.hpp"

namespace moelab {

bool stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

Progress::Progress(std::string label, int64_t total, bool enabled, Unit unit)
    : label_(std::move(label)), total_(total), enabled_(enabled), terminal_(stderr_is_terminal()), unit_(unit),
      start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

Progress::~Progress() { finish(); }

void Progress::advance(int64_t n) {
  done_ += n;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ > (terminal_ ? std::chrono::milliseconds(100) : std::chrono::milliseconds(10'000))) {
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
  const double eta = done_ > 0 ? secs * (double(total_ - done_) / double(done_)) : 0.0;
  std::string count;
  if (unit_ == Unit::Bytes)
    count = fmt::format("{:.0f}/{:.0f} MiB {:.1f} MB/s", double(done_) / (1 << 20), double(total_) / (1 << 20),
                        secs > 0 ? double(done_) / secs / 1e6 : 0.0);
  else
    count = fmt::format("{}/{}", done_, total_);
  if (!terminal_) {  // plain lines for logs; a job done before the first one stays quiet
    if (final && !printed_) return;
    printed_ = true;
    std::fprintf(stderr, "%s: %s (%.0f%%) %.1fs%s\n", label_.c_str(), count.c_str(), 100 * frac, secs,
                 final ? "" : fmt::format(" eta {:.0f}s", eta).c_str());
    return;
  }
  const int width = 30, filled = int(frac * width + 0.5);
  std::fprintf(stderr, "\r%s [%s%s] %s %5.1fs%s", label_.c_str(), std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), count.c_str(), secs,
               final ? "\n" : fmt::format(" eta {:.1f}s", eta).c_str());
  std::fflush(stderr);
}

}  // namespace moelab
