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
  // The server's own time per request is far below a forward call's: finer buckets.
  static constexpr std::array<double, 14> kOverheadBuckets{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                           0.01,    0.025,  0.05,    0.1,   0.25,  0.5,    1};

  void request_done(const std::string& endpoint, int status, double seconds);
  void queue_wait(double seconds);
  void tokens(int64_t prompt, int64_t generated);
  // A completion request's time inside the engine (Completer::run: forward calls, sampling, decoding; for a
  // stream also the writes of its events), and its time outside both the engine and the queue (reading and
  // parsing the body, tokenizing, checking, building the answer).
  void engine_time(double engine_seconds, double overhead_seconds);

  // The exposition text; `queue_depth`, `running` and `max_queue` are read by the caller at that moment,
  // `extra` (may be empty) is appended as is (an engine's own counters).
  std::string render(size_t queue_depth, bool running, size_t max_queue, const std::string& extra) const;

 private:
  struct Histogram {
    const std::array<double, 14>* bounds = &kBuckets;
    std::array<uint64_t, 14> counts{};
    uint64_t count = 0;
    double sum = 0;
    void observe(double v);
  };
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::map<std::string, Histogram> latency_;
  Histogram queue_wait_;
  Histogram overhead_{&kOverheadBuckets};
  double engine_seconds_ = 0;
  int64_t prompt_tokens_ = 0, generated_tokens_ = 0;
};

}  // namespace moelab::serve
