#include "core/progress.hpp"

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"

namespace moelab {

bool stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

namespace {
std::atomic<ProgressMode> g_mode{ProgressMode::Auto};
}

// Plain lines every 10 s; MOELAB_PROGRESS_INTERVAL=SECONDS changes that (a batch log may want fewer, a
// test more).
static std::chrono::steady_clock::duration line_interval() {
  static const std::chrono::steady_clock::duration interval = [] {
    const char* env = std::getenv("MOELAB_PROGRESS_INTERVAL");
    double s = 10;
    if (env && *env) {
      char* end = nullptr;
      const double v = std::strtod(env, &end);
      if (end && *end == '\0' && std::isfinite(v) && v >= 0) s = v;
    }
    return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
  }();
  return interval;
}

void set_progress_mode(ProgressMode mode) { g_mode = mode; }
ProgressMode progress_mode() { return g_mode; }

ProgressMode parse_progress_mode(const std::string& name) {
  if (name == "auto") return ProgressMode::Auto;
  if (name == "bar") return ProgressMode::Bar;
  if (name == "lines") return ProgressMode::Lines;
  if (name == "none") return ProgressMode::None;
  throw Error(fmt::format("--progress: '{}' is not one of auto, bar, lines, none", name));
}

Progress::Progress(std::string label, int64_t total, bool enabled, Unit unit)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled && progress_mode() != ProgressMode::None),
      terminal_(progress_mode() == ProgressMode::Bar     ? true
                : progress_mode() == ProgressMode::Lines ? false
                                                         : stderr_is_terminal()),
      unit_(unit),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

Progress::~Progress() { finish(); }

void Progress::advance(int64_t n) {
  done_ += n;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ > (terminal_ ? std::chrono::milliseconds(100) : line_interval())) {
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
  if (!detail_.empty()) count += "  " + detail_;
  if (!terminal_) {  // plain lines for logs; a job done before the first one stays quiet
    if (final && !printed_) return;
    printed_ = true;
    const std::string rate = unit_ == Unit::Bytes ? "" : fmt::format(", {:.2f}/s", secs > 0 ? double(done_) / secs : 0.0);
    std::fprintf(stderr, "%s: %s (%.0f%%) %.1fs%s%s\n", label_.c_str(), count.c_str(), 100 * frac, secs, rate.c_str(),
                 final ? "" : fmt::format(", eta {:.0f}s", eta).c_str());
    return;
  }
  const int width = 30, filled = int(frac * width + 0.5);
  std::fprintf(stderr, "\r%s [%s%s] %s %5.1fs%s", label_.c_str(), std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), count.c_str(), secs,
               final ? "\n" : fmt::format(" eta {:.1f}s", eta).c_str());
  std::fflush(stderr);
}

}  // namespace moelab
