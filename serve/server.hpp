#pragma once
// `moelab serve`'s HTTP layer (cpp-httplib): an OpenAI-compatible API on one Engine.
//   POST /v1/completions       prompt as text or token ids (one or a list), echo, logprobs, stop, stream (SSE)
//   POST /v1/chat/completions  messages through Mixtral-Instruct's [INST] template (serve/chat.hpp)
//   GET  /v1/models, GET /health, GET /metrics (Prometheus text)
//   POST /tokenize, POST /detokenize, GET /tokenizer_info   (vLLM's, which lm-eval's remote tokenizer reads)
// Requests run one at a time through a bounded queue (serve/queue.hpp). Every error is OpenAI's JSON error
// body with its HTTP status (400 bad field, 401 API key, 404, 413 body too large, 429 queue full, 503
// shutting down). Reads and writes time out, so a slow or vanished client holds only its own connection.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace moelab {
class Engine;
class Tokenizer;
}  // namespace moelab

namespace moelab::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                        // 0: any free port (bind() says which)
  size_t max_queue = 32;                  // requests that may wait while one runs
  std::string api_key;                    // empty: no key needed
  size_t max_body = 8u << 20;             // bytes; a larger body gets 413
  double io_timeout = 30;                 // seconds a read or write may block
  int keep_alive_timeout = 5;             // seconds an idle keep-alive connection is kept
  std::string model_id = "moelab";        // what /v1/models lists and responses name
  bool log_requests = true;               // one line per request on stderr
  std::function<std::string()> extra_metrics;  // appended to /metrics (an engine's own counters)
};

class Server {
 public:
  // Sets SIGPIPE to be ignored in this process (a vanished client is then a failed write).
  Server(Engine& engine, const Tokenizer& tok, ServerOptions opts);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port; returns the port. Throws moelab::Error when it cannot.
  int bind();
  // Serves until stop(); returns once every connection has been answered and closed.
  void run();
  // From any thread: stop accepting, refuse queued requests (503), cancel the running one at its next token.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moelab::serve
