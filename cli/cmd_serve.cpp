// moelab serve: an OpenAI-compatible HTTP server on one engine (serve/, docs/serve.md).
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/options.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/tokenizer.hpp"
#include "serve/server.hpp"

namespace moelab::cli {

namespace {

// SIGINT/SIGTERM write one byte to this pipe; a watcher thread reads it and stops the server (a signal
// handler may not take the locks stopping needs). A second signal exits at once.
int g_signal_pipe[2] = {-1, -1};
std::atomic<int> g_signals{0};

extern "C" void on_stop_signal(int sig) {
  if (g_signals.fetch_add(1) > 0) _exit(128 + sig);
  const char b = char(sig);
  [[maybe_unused]] const ssize_t n = write(g_signal_pipe[1], &b, 1);
}

bool is_loopback(const std::string& host) {
  return host == "127.0.0.1" || host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

std::string engine_metrics(const Engine& engine) {
  const auto c = expert_cache_counters(engine);
  if (!c) return {};
  return fmt::format(
      "# HELP moelab_expert_cache_hit_rate cuda-nf4 expert cache: hits / (hits + misses) since the engine loaded.\n"
      "# TYPE moelab_expert_cache_hit_rate gauge\nmoelab_expert_cache_hit_rate {}\n"
      "# HELP moelab_expert_cache_hits_total cuda-nf4 expert cache hits.\n"
      "# TYPE moelab_expert_cache_hits_total counter\nmoelab_expert_cache_hits_total {}\n"
      "# HELP moelab_expert_cache_misses_total cuda-nf4 expert cache misses.\n"
      "# TYPE moelab_expert_cache_misses_total counter\nmoelab_expert_cache_misses_total {}\n"
      "# HELP moelab_expert_cache_bytes_copied_total Bytes of experts copied to the GPU.\n"
      "# TYPE moelab_expert_cache_bytes_copied_total counter\nmoelab_expert_cache_bytes_copied_total {}\n",
      c->hit_rate, c->hits, c->misses, c->bytes_copied);
}

}  // namespace

void register_serve(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "An OpenAI-compatible HTTP server (completions, chat, models, metrics)");
  static std::string model, model_name;
  static EngineOptions eo;
  static serve::ServerOptions so;
  static bool quiet = false;
  add_model_option(*cmd, model);
  cmd->add_option("--host", so.host, "Address to listen on (loopback by default; anything else is reachable by others)")
      ->capture_default_str();
  cmd->add_option("--port", so.port, "TCP port (0: any free port, printed at start)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--max-queue", so.max_queue,
                  "Requests that may wait while one runs; one more gets HTTP 429 (requests run one at a time)")
      ->capture_default_str()
      ->check(CLI::Range(0, 100000));
  cmd->add_option("--api-key", so.api_key, "Require \"Authorization: Bearer KEY\" on every endpoint but /health");
  cmd->add_option("--max-body", so.max_body, "Largest request body in bytes; a larger one gets HTTP 413")
      ->capture_default_str()
      ->check(CLI::Range(size_t(1024), size_t(1) << 32));
  cmd->add_option("--io-timeout", so.io_timeout, "Seconds a read from or write to a client may block")
      ->capture_default_str()
      ->check(CLI::Range(0.05, 3600.0));
  cmd->add_option("--model-name", model_name, "Model id in /v1/models and responses [default: the model folder's name]");
  cmd->add_flag("--quiet", quiet, "No line per request on stderr");
  add_engine_options(*cmd, eo);
  cmd->callback([] {
    if (model.empty()) model = default_model_dir();
    const auto ck = Checkpoint::open(model, /*show_progress=*/true);
    const Tokenizer tok(ck->tokenizer_path());
    auto engine = make_engine(*ck, eo);
    so.model_id = !model_name.empty() ? model_name
                                      : std::filesystem::path(model).lexically_normal().filename().string();
    if (so.model_id.empty()) so.model_id = std::filesystem::path(model).lexically_normal().parent_path().filename().string();
    if (so.model_id.empty()) so.model_id = "moelab";
    so.log_requests = !quiet;
    const Engine* eng = engine.get();
    so.extra_metrics = [eng] { return engine_metrics(*eng); };
    serve::Server server(*engine, tok, so);
    const int port = server.bind();

    if (pipe(g_signal_pipe) != 0) throw Error("serve: cannot create the signal pipe");
    fcntl(g_signal_pipe[1], F_SETFL, O_NONBLOCK);
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    struct sigaction old_int {}, old_term {};
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    std::thread watcher([&server] {
      char b = 0;
      while (read(g_signal_pipe[0], &b, 1) < 0 && errno == EINTR) {
      }
      if (b != 0) {
        std::fflush(stdout);
        fmt::print(stderr, "moelab serve: {} received: refusing new requests, stopping the running one\n",
                   b == SIGINT ? "SIGINT" : "SIGTERM");
      }
      server.stop();
    });

    const std::string shown = so.host.find(':') != std::string::npos ? "[" + so.host + "]" : so.host;
    fmt::print("moelab serve: listening on http://{}:{}/v1 (model {}, engine {}, context {} tokens, queue {}); "
               "Ctrl-C stops\n",
               shown, port, so.model_id, engine->name(), engine->max_context(), so.max_queue);
    std::fflush(stdout);
    if (!is_loopback(so.host))
      fmt::print(stderr, "moelab serve: warning: listening on {}, reachable from other machines{}\n", so.host,
                 so.api_key.empty() ? " without an API key (see --api-key)" : "");
    server.run();
    {  // wake the watcher when the server stopped for another reason
      const char zero = 0;
      [[maybe_unused]] const ssize_t n = write(g_signal_pipe[1], &zero, 1);
    }
    watcher.join();
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
    close(g_signal_pipe[0]);
    close(g_signal_pipe[1]);
    report_engine_counters(*engine);
    fmt::print("moelab serve: stopped\n");
    std::fflush(stdout);
  });
}

}  // namespace moelab::cli
