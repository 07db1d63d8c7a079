#pragma once
// Counters for GET /metrics, in Prometheus' text exposition format (version 0.0.4): requests by endpoint
// and status, prompt and generated tokens, queue depth and the running request, and latency histograms
// (whole request, time waiting in the queue). Thread-safe.
#include <array>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace moelab::serve {

class Metrics {
 public:
  static constexpr std::array<double, 14> kBuckets{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                   1,     2.5,  5,     10,   30,  60,  300};

  void request_done(const std::string& endpoint, int status, double seconds);
  void queue_wait(double seconds);
  void tokens(int64_t prompt, int64_t generated);

  // The exposition text; `queue_depth`, `running` and `max_queue` are read by the caller at that moment,
  // `extra` (may be empty) is appended as is (an engine's own counters).
  std::string render(size_t queue_depth, bool running, size_t max_queue, const std::string& extra) const;

 private:
  struct Histogram {
    std::array<uint64_t, kBuckets.size()> counts{};
    uint64_t count = 0;
    double sum = 0;
    void observe(double v);
  };
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::map<std::string, Histogram> latency_;
  Histogram queue_wait_;
  int64_t prompt_tokens_ = 0, generated_tokens_ = 0;
};

}  // namespace moelab::serve
