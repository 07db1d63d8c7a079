#include "serve/metrics.hpp"

#include <fmt/format.h>

namespace moelab::serve {

void Metrics::Histogram::observe(double v) {
  for (size_t i = 0; i < bounds->size(); ++i)
    if (v <= (*bounds)[i]) counts[i]++;
  count++;
  sum += v;
}

void Metrics::request_done(const std::string& endpoint, int status, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  requests_[{endpoint, status}]++;
  latency_[endpoint].observe(seconds);
}

void Metrics::queue_wait(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  queue_wait_.observe(seconds);
}

void Metrics::engine_time(double engine_seconds, double overhead_seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  engine_seconds_ += engine_seconds;
  overhead_.observe(overhead_seconds);
}

void Metrics::tokens(int64_t prompt, int64_t generated) {
  std::lock_guard<std::mutex> lock(mu_);
  prompt_tokens_ += prompt;
  generated_tokens_ += generated;
}

namespace {
void render_histogram(std::string& out, const std::string& name, const std::string& labels, uint64_t count, double sum,
                      const std::array<uint64_t, 14>& counts, const std::array<double, 14>& bounds = Metrics::kBuckets) {
  const std::string sep = labels.empty() ? "" : ",";
  for (size_t i = 0; i < bounds.size(); ++i)
    out += fmt::format("{}_bucket{{{}{}le=\"{}\"}} {}\n", name, labels, sep, bounds[i], counts[i]);
  out += fmt::format("{}_bucket{{{}{}le=\"+Inf\"}} {}\n", name, labels, sep, count);
  const std::string braces = labels.empty() ? "" : "{" + labels + "}";
  out += fmt::format("{}_sum{} {}\n{}_count{} {}\n", name, braces, sum, name, braces, count);
}
}  // namespace

std::string Metrics::render(size_t queue_depth, bool running, size_t max_queue, const std::string& extra) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  out += "# HELP moelab_requests_total HTTP requests answered, by endpoint and status.\n"
         "# TYPE moelab_requests_total counter\n";
  for (const auto& [key, n] : requests_)
    out += fmt::format("moelab_requests_total{{endpoint=\"{}\",status=\"{}\"}} {}\n", key.first, key.second, n);
  out += "# HELP moelab_prompt_tokens_total Prompt tokens run through the engine.\n"
         "# TYPE moelab_prompt_tokens_total counter\n";
  out += fmt::format("moelab_prompt_tokens_total {}\n", prompt_tokens_);
  out += "# HELP moelab_generated_tokens_total Tokens generated.\n# TYPE moelab_generated_tokens_total counter\n";
  out += fmt::format("moelab_generated_tokens_total {}\n", generated_tokens_);
  out += "# HELP moelab_queue_depth Requests waiting for the engine.\n# TYPE moelab_queue_depth gauge\n";
  out += fmt::format("moelab_queue_depth {}\n", queue_depth);
  out += "# HELP moelab_queue_capacity Requests that may wait (--max-queue); one more is refused with 429.\n"
         "# TYPE moelab_queue_capacity gauge\n";
  out += fmt::format("moelab_queue_capacity {}\n", max_queue);
  out += "# HELP moelab_requests_running Requests running on the engine (0 or 1).\n"
         "# TYPE moelab_requests_running gauge\n";
  out += fmt::format("moelab_requests_running {}\n", running ? 1 : 0);
  out += "# HELP moelab_request_duration_seconds Time from a request's arrival to its answer (a stream: to its end), "
         "by endpoint.\n# TYPE moelab_request_duration_seconds histogram\n";
  for (const auto& [endpoint, h] : latency_)
    render_histogram(out, "moelab_request_duration_seconds", fmt::format("endpoint=\"{}\"", endpoint), h.count, h.sum,
                     h.counts);
  out += "# HELP moelab_queue_wait_seconds Time a request waited for the engine.\n"
         "# TYPE moelab_queue_wait_seconds histogram\n";
  render_histogram(out, "moelab_queue_wait_seconds", "", queue_wait_.count, queue_wait_.sum, queue_wait_.counts);
  out += "# HELP moelab_engine_seconds_total Time completion requests spent running on the engine (forward calls, "
         "sampling, decoding; a stream's event writes).\n# TYPE moelab_engine_seconds_total counter\n";
  out += fmt::format("moelab_engine_seconds_total {}\n", engine_seconds_);
  out += "# HELP moelab_request_overhead_seconds A completion request's time outside the engine and the queue "
         "(reading and parsing, tokenizing, checking, building the answer).\n"
         "# TYPE moelab_request_overhead_seconds histogram\n";
  render_histogram(out, "moelab_request_overhead_seconds", "", overhead_.count, overhead_.sum, overhead_.counts,
                   kOverheadBuckets);
  out += extra;
  return out;
}

}  // namespace moelab::serve
