#include "cli/trace_run.hpp"

#include <fmt/format.h>
#include <signal.h>

#include <algorithm>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "analysis/prefetch_guess.hpp"
#include "analysis/timing.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "core/progress.hpp"
#include "core/json_bounded.hpp"

namespace moelab::cli {
namespace {

// Hands each window's logits to TraceRunOptions::on_window_logits while the engine still holds them.
class WindowLogitsTap : public Probe {
 public:
  WindowLogitsTap(const TraceRunOptions& o) : o_(o) {}
  void set_window(const std::string* domain, std::span<const int32_t> tokens) {
    domain_ = domain;
    tokens_ = tokens;
  }
  void on_layer(const LayerObservation&) override {}
  void on_logits(const MatrixRF& logits, double) override {
    if (o_.on_window_logits) o_.on_window_logits(*domain_, tokens_, logits);
  }

 private:
  const TraceRunOptions& o_;
  const std::string* domain_ = nullptr;
  std::span<const int32_t> tokens_;
};

// The checkpoint's config.json, stored in the trace so that appends can be checked against it.
nlohmann::json read_config_json(const ModelConfig& cfg) {
  std::ifstream in(cfg.source);
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = parse_json_bounded(ss.str(), cfg.source, false);
  if (!in || j.is_discarded()) throw Error(fmt::format("{}: cannot read the config again", cfg.source));
  return j;
}

// A path as the trace records it: absolute and normalized (symlinks kept: they name what the user chose).
std::string absolute_path(const std::string& p) {
  std::error_code ec;
  const auto a = std::filesystem::absolute(p, ec);
  auto n = (ec ? std::filesystem::path(p) : a).lexically_normal();
  if (!n.has_filename() && n != n.root_path()) n = n.parent_path();  // "dir/" -> "dir"
  return n.string();
}

// One sequence of the trace: a window of one text's tokens.
struct Window {
  size_t text = 0;  // index into the inputs
  std::vector<int32_t> tokens;
};

std::vector<Window> cut_windows(const std::vector<analysis::TraceText>& texts, const Tokenizer& tok, int window,
                                int64_t max_tokens, int64_t& empty_texts) {
  std::vector<Window> out;
  int64_t total = 0;
  empty_texts = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    if (texts[i].text.empty()) {
      ++empty_texts;
      continue;
    }
    const auto ids = tok.encode(texts[i].text, /*add_bos=*/true);
    for (size_t at = 0; at < ids.size(); at += size_t(window)) {
      int64_t n = std::min<int64_t>(window, int64_t(ids.size() - at));
      if (max_tokens > 0) n = std::min(n, max_tokens - total);
      if (n <= 0) return out;
      out.push_back({i, std::vector<int32_t>(ids.begin() + int64_t(at), ids.begin() + int64_t(at) + n)});
      total += n;
    }
  }
  return out;
}

// SIGINT and SIGTERM while tracing: the window being computed is finished and written, everything
// buffered is flushed, and then the run stops with an error saying what was kept. A second signal
// (SA_RESETHAND) kills at once, as usual.
volatile std::sig_atomic_t g_stop_signal = 0;
void on_stop_signal(int sig) { g_stop_signal = sig; }

class StopOnSignals {
 public:
  StopOnSignals() {
    g_stop_signal = 0;
    struct sigaction sa{};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopOnSignals() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }
  StopOnSignals(const StopOnSignals&) = delete;
  StopOnSignals& operator=(const StopOnSignals&) = delete;
  int signal() const { return g_stop_signal; }

 private:
  struct sigaction old_int_{}, old_term_{};
};

}  // namespace

analysis::TraceHeader trace_header(const Checkpoint& ck, const std::string& engine_name, int window,
                                   const TraceRunOptions& o, const std::vector<analysis::TraceText>& texts) {
  const auto& cfg = ck.config();
  analysis::TraceHeader header;
  header.model_config = read_config_json(cfg);
  header.num_layers = cfg.num_layers;
  header.top_k = cfg.top_k;
  header.num_experts = cfg.num_experts;
  header.engine = engine_name;
  header.model_path = absolute_path(ck.dir());
  header.tokenizer_sha256 = analysis::sha256_file(ck.tokenizer_path());
  for (const auto& in : o.inputs) header.inputs.push_back(absolute_path(in));
  if (!o.adapter.empty()) {
    header.adapter = absolute_path(o.adapter);
    header.adapter_sha256 = analysis::sha256_file((std::filesystem::path(o.adapter) / kAdapterWeightsFile).string(),
                                                  "adapter weights");
  }
  header.tool_version = MOELAB_VERSION;
  header.window = window;
  header.router_logits = o.router_logits;
  header.prefetch_guess = o.prefetch_guess;
  for (const auto& t : texts)
    if (std::find(header.domain_names.begin(), header.domain_names.end(), t.domain) == header.domain_names.end())
      header.domain_names.push_back(t.domain);
  return header;
}

TraceRunResult trace_texts(Engine& engine, const Checkpoint& ck, const Tokenizer& tok,
                           const std::vector<analysis::TraceText>& texts, const std::string& out,
                           const TraceRunOptions& o) {
  const auto& cfg = ck.config();
  if (o.router_logits && !cfg.is_moe())
    throw Error(fmt::format("{}: --router-logits needs an MoE model; {} has no router", ck.dir(), cfg.arch_name()));
  TraceRunResult r;
  r.window = o.window > 0 ? o.window : std::min(512, engine.max_context());
  if (r.window > engine.max_context())
    throw Error(fmt::format("--window {} exceeds the engine's context of {} tokens (see --context)", r.window,
                            engine.max_context()));
  const auto windows = cut_windows(texts, tok, r.window, o.max_tokens, r.empty_texts);
  if (windows.empty()) throw Error("trace: the inputs hold no text");

  // Read before the file is created: a checkpoint whose routers cannot be read fails without writing anything.
  const std::optional<analysis::PrefetchGuesser> guesser =
      o.prefetch_guess ? std::optional(analysis::PrefetchGuesser::from_checkpoint(ck)) : std::nullopt;
  const auto header = trace_header(ck, engine.name(), r.window, o, texts);
  const StopOnSignals stop;  // from before the file is created: a signal from then on ends the run cleanly
  analysis::TraceWriter writer(out, header, analysis::TraceWriterOptions{.append = o.append});
  r.appended = writer.appended();
  r.recovered = writer.recovered();
  r.tokens_before = writer.tokens_before();
  r.sequences_before = writer.sequences_before();
  r.dropped_tokens = writer.dropped_tokens();
  if (r.recovered)
    fmt::print(stderr, "note: {} had not been closed (its writer died); repaired it: kept {} tokens in {} sequences, "
                       "dropped {} uncommitted or unreadable rows\n", out, r.tokens_before, r.sequences_before,
               r.dropped_tokens);

  int64_t total = 0;
  for (const auto& w : windows) total += int64_t(w.tokens.size());
  Progress progress("trace", total);
  const auto start = SteadyClock::now();
  int64_t done_tokens = 0, done_sequences = 0;
  WindowLogitsTap tap(o);
  analysis::ProbeFanout also({o.timing, o.on_window_logits ? &tap : nullptr});
  for (const auto& w : windows) {
    if (stop.signal()) break;
    const auto& domain = texts[w.text].domain;
    tap.set_window(&domain, w.tokens);
    const auto t0 = SteadyClock::now();
    const auto routing = analysis::route_window(engine, w.tokens, o.router_logits, &also, guesser ? &*guesser : nullptr);
    if (o.timing) o.timing->add_call(int64_t(w.tokens.size()), seconds_since(t0));
    writer.add_sequence(writer.domain_id(domain), w.tokens, routing.experts, routing.gates, routing.router_logits,
                        routing.prefetch_guess);
    r.per_domain[domain].first += int64_t(w.tokens.size());
    r.per_domain[domain].second += 1;
    progress.advance(int64_t(w.tokens.size()));
    done_tokens += int64_t(w.tokens.size());
    ++done_sequences;
  }
  writer.close();
  progress.finish();
  if (const int sig = stop.signal())
    throw Error(fmt::format("trace: stopped by {} after {} of {} sequences; the {} tokens traced by then are written "
                            "to {}", sig == SIGTERM ? "SIGTERM" : "SIGINT", done_sequences, windows.size(), done_tokens,
                            out));
  r.seconds = seconds_since(start);
  r.tokens = total;
  r.sequences = int64_t(windows.size());
  return r;
}

std::string describe(const TraceRunResult& r, const std::string& engine_name) {
  std::string domains;
  for (const auto& [name, c] : r.per_domain)
    domains += fmt::format("{}{} {} tokens / {} seq", domains.empty() ? "" : ", ", name.empty() ? "(unlabeled)" : name,
                           c.first, c.second);
  return fmt::format("traced {} tokens in {} sequences of at most {} tokens ({}) in {:.2f} s, {:.1f} tokens/s, engine {}",
                     r.tokens, r.sequences, r.window, domains, r.seconds, double(r.tokens) / r.seconds, engine_name);
}

}  // namespace moelab::cli
