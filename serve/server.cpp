#include "serve/server.hpp"

#include <fmt/format.h>

// Eigen (through core/engine.hpp) before httplib.h: httplib includes <resolv.h>, whose `_res` macro would
// rewrite Eigen's parameters of that name.
#include "core/engine.hpp"

#include <httplib.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <optional>
#include <nlohmann/json.hpp>

#include "core/engine.hpp"
#include "core/error.hpp"
#include "core/tokenizer.hpp"
#include "serve/api_error.hpp"
#include "serve/completion.hpp"
#include "serve/metrics.hpp"
#include "serve/queue.hpp"
#include "serve/request.hpp"
#include "serve/response.hpp"

namespace moelab::serve {

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string dump(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

// When this thread started on its current request (set before routing; read by the logger).
thread_local Clock::time_point t_request_start{};

// A connection whose request was refused before its body was read: that body is still on the socket (and
// perhaps in httplib's read buffer), and httplib 0.11 keeps a connection alive unless the *request* asked to
// close, giving handlers no socket. So the connection is marked here (httplib serves one connection at a time
// per thread, all its requests on that thread): the logger, which runs once the answer is written, shuts it
// down, and any further "request" read from it (the body's bytes) is refused unrun, its answer going nowhere.
struct ConnectionId {
  std::string local_addr, remote_addr;
  int local_port = -1, remote_port = -1;
  bool operator==(const ConnectionId&) const = default;
};
ConnectionId connection_of(const httplib::Request& req) {
  return {req.local_addr, req.remote_addr, req.local_port, req.remote_port};
}
thread_local std::optional<ConnectionId> t_doomed;

// An address as httplib 0.11 writes req.remote_addr and req.local_addr (getnameinfo, numeric host).
std::string numeric_host(const sockaddr_storage& a, socklen_t len, int& port) {
  char host[NI_MAXHOST] = {}, serv[NI_MAXSERV] = {};
  if (::getnameinfo(reinterpret_cast<const sockaddr*>(&a), len, host, sizeof host, serv, sizeof serv,
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return "";
  port = std::atoi(serv);
  return host;
}

// Shuts down this process's TCP connection `c`, found among its descriptors by getsockname/getpeername
// (local and remote address and port: unique); httplib's next write on it fails and it closes the socket.
// Linux (/proc/self/fd). The descriptor is the calling thread's own connection, which only this thread closes.
void shutdown_connection(const ConnectionId& c) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd", ec)) {
    const int fd = std::atoi(entry.path().filename().c_str());
    sockaddr_storage local{}, peer{};
    socklen_t local_len = sizeof local, peer_len = sizeof peer;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
        ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0)
      continue;
    ConnectionId id;
    id.local_addr = numeric_host(local, local_len, id.local_port);
    id.remote_addr = numeric_host(peer, peer_len, id.remote_port);
    if (id == c) {
      ::shutdown(fd, SHUT_RDWR);
      return;
    }
  }
}

const char* reason(int status) {
  switch (status) {
    case 400: return "bad request";
    case 401: return "unauthorized";
    case 404: return "not found";
    case 405: return "method not allowed";
    case 408: return "request timeout";
    case 411: return "length required";
    case 413: return "request body too large";
    case 414: return "request URI too long";
    case 415: return "unsupported media type";
    case 429: return "too many requests";
    case 500: return "internal server error";
    case 503: return "service unavailable";
    default: return "error";
  }
}

const char* type_for(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

// Constant-time comparison of the presented key with the expected one.
bool same_key(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= (unsigned char)(a[i] ^ b[i % (b.empty() ? 1 : b.size())]);
  return diff == 0;
}

// Special tokens written as text ("<s>", "</s>") become their ids, as a Hugging Face tokenizer parses
// them by default; the text between them is encoded without special tokens.
std::vector<int32_t> encode_with_special_text(const Tokenizer& tok, const std::string& text, bool add_bos) {
  std::vector<std::pair<std::string, int32_t>> specials;
  for (const int32_t id : {tok.bos_id(), tok.eos_id()})
    if (id >= 0) specials.emplace_back(tok.piece(id), id);
  std::vector<int32_t> out;
  if (add_bos && tok.bos_id() >= 0) out.push_back(tok.bos_id());
  size_t pos = 0;
  std::string segment;
  const auto flush = [&] {
    if (!segment.empty()) {
      const auto ids = tok.encode(segment, false);
      out.insert(out.end(), ids.begin(), ids.end());
      segment.clear();
    }
  };
  while (pos < text.size()) {
    bool matched = false;
    for (const auto& [piece, id] : specials)
      if (!piece.empty() && text.compare(pos, piece.size(), piece) == 0) {
        flush();
        out.push_back(id);
        pos += piece.size();
        matched = true;
        break;
      }
    if (!matched) segment += text[pos++];
  }
  flush();
  return out;
}

}  // namespace

struct Server::Impl {
  Engine& engine;
  const Tokenizer& tok;
  ServerOptions opts;
  Completer completer;
  EngineQueue queue;
  Metrics metrics;
  httplib::Server http;
  std::atomic<bool> stopping{false};
  std::atomic<uint64_t> next_id{1};
  int64_t created = int64_t(std::time(nullptr));

  Impl(Engine& e, const Tokenizer& t, ServerOptions o)
      : engine(e), tok(t), opts(std::move(o)), completer(e, t), queue(opts.max_queue) {}

  std::string endpoint_label(const std::string& path) const {
    for (const char* known : {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                              "/detokenize", "/tokenizer_info"})
      if (path == known) return path;
    return "other";
  }

  void check_auth(const httplib::Request& req) const {
    if (opts.api_key.empty()) return;
    const std::string h = req.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    if (h.empty())
      throw ApiError(401, "missing API key: send the header \"Authorization: Bearer <key>\"", "authentication_error", "",
                     "missing_api_key");
    if (h.size() <= prefix.size() || h.compare(0, prefix.size(), prefix) != 0 ||
        !same_key(h.substr(prefix.size()), opts.api_key))
      throw ApiError(401, "incorrect API key", "authentication_error", "", "invalid_api_key");
  }

  static void send_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    res.set_content(dump(ojson(e.body())), "application/json");
  }

  // Runs `body` with the request's errors answered as OpenAI's error JSON, and counts the request (before
  // the answer is written, so a client that reads /metrics next sees it; a stream counts itself at its end).
  template <class F>
  void guarded(const httplib::Request& req, httplib::Response& res, F&& body) {
    const auto t0 = Clock::now();
    bool streaming = false;
    try {
      streaming = body();
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const moelab::Error& e) {
      send_error(res, ApiError(500, e.what(), "server_error"));
    } catch (const std::bad_alloc&) {
      send_error(res, ApiError(500, "out of memory", "server_error"));
    } catch (const std::exception& e) {
      send_error(res, ApiError(500, fmt::format("internal error: {}", e.what()), "server_error"));
    }
    if (!streaming) metrics.request_done(endpoint_label(req.path), res.status == -1 ? 200 : res.status, since(t0));
  }

  ResponseMeta meta(bool chat) {
    return ResponseMeta{fmt::format("{}-{:x}{:06x}", chat ? "chatcmpl" : "cmpl", created, next_id++), opts.model_id,
                        int64_t(std::time(nullptr))};
  }

  void completions(const httplib::Request& req, httplib::Response& res, bool chat) {
    guarded(req, res, [&] {
      check_auth(req);
      const json body = parse_json_body(req.body);
      auto prepared = std::make_shared<PreparedRequest>(
          completer.prepare(chat ? parse_chat_request(body) : parse_completion_request(body)));
      std::shared_ptr<EngineQueue::Ticket> ticket = queue.try_enter();
      if (!ticket)
        throw ApiError(429,
                       fmt::format("the server is busy: {} requests are already waiting (--max-queue); retry later",
                                   queue.max_waiting()),
                       "rate_limit_error", "", "queue_full");
      const ResponseMeta m = meta(chat);
      if (prepared->req.stream) {
        stream(req, res, prepared, std::move(ticket), m, chat);
        return true;
      }
      const auto t0 = Clock::now();
      ticket->wait_turn();
      const double waited = since(t0);
      metrics.queue_wait(waited);
      const auto t1 = Clock::now();
      std::vector<ChoiceResult> choices;
      for (size_t i = 0; i < prepared->prompt_ids.size(); ++i) {
        choices.push_back(completer.run(*prepared, i, {}, queue.cancel_flag()));
        metrics.tokens(choices.back().prompt_tokens, choices.back().completion_tokens);
      }
      const double ran = since(t1);
      ticket.reset();
      const bool lp = prepared->req.logprobs.has_value();
      res.set_content(dump(chat ? chat_json(m, choices.front(), lp) : completion_json(m, choices, lp)),
                      "application/json");
      const double total = t_request_start == Clock::time_point{} ? since(t0) : since(t_request_start);
      metrics.engine_time(ran, std::max(0.0, total - waited - ran));
      return false;
    });
  }

  void stream(const httplib::Request& req, httplib::Response& res, std::shared_ptr<PreparedRequest> prepared,
              std::shared_ptr<EngineQueue::Ticket> ticket, ResponseMeta m, bool chat) {
    res.set_header("Cache-Control", "no-cache");
    const auto started = Clock::now();
    const std::string label = endpoint_label(req.path);
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, prepared, ticket, m, chat, started, label](size_t, httplib::DataSink& sink) mutable {
          // Counted as 200 (the status line went out with the headers), whatever the events then said.
          struct Count {
            Impl* self;
            const std::string& label;
            Clock::time_point t0;
            const double &waited, &ran;
            ~Count() {
              const double total = since(t0);
              self->metrics.request_done(label, 200, total);
              self->metrics.engine_time(ran, std::max(0.0, total - waited - ran));
            }
          };
          const auto send = [&](const ojson& j) {
            const std::string event = "data: " + dump(j) + "\n\n";
            return sink.write(event.data(), event.size());
          };
          const bool lp = prepared->req.logprobs.has_value();
          int64_t prompt_tokens = 0, completion_tokens = 0;
          double waited = 0, ran = 0;
          const Count count{this, label, started, waited, ran};
          try {
            const auto t0 = Clock::now();
            ticket->wait_turn();
            waited = since(t0);
            metrics.queue_wait(waited);
            const auto t1 = Clock::now();
            struct Ran {  // the engine's share, however the run ends
              double& ran;
              Clock::time_point t1;
              ~Ran() { ran = since(t1); }
            };
            Ran measure{ran, t1};
            for (size_t i = 0; i < prepared->prompt_ids.size(); ++i) {
              bool first = true;
              const auto on_delta = [&](const Delta& d) {
                const bool ok = send(chat ? chat_chunk_json(m, &d, first, lp, "") : completion_chunk_json(m, i, d, lp, ""));
                first = false;
                return ok;
              };
              const ChoiceResult r = completer.run(*prepared, i, on_delta, queue.cancel_flag());
              metrics.tokens(r.prompt_tokens, r.completion_tokens);
              prompt_tokens += r.prompt_tokens;
              completion_tokens += r.completion_tokens;
              const Delta end{};
              if (!send(chat ? chat_chunk_json(m, nullptr, first, false, r.finish_reason)
                             : completion_chunk_json(m, i, end, false, r.finish_reason)))
                throw ClientGone();
            }
            ticket.reset();
            if (prepared->req.include_usage) {
              ojson u{{"id", m.id},
                      {"object", chat ? "chat.completion.chunk" : "text_completion"},
                      {"created", m.created},
                      {"model", m.model},
                      {"choices", ojson::array()},
                      {"usage", usage_json(prompt_tokens, completion_tokens)}};
              if (!send(u)) throw ClientGone();
            }
          } catch (const ClientGone&) {
            return false;  // the connection is gone: nothing more to write
          } catch (const ApiError& e) {
            ticket.reset();
            if (!send(ojson(e.body()))) return false;
          } catch (const std::exception& e) {
            ticket.reset();
            if (!send(ojson(ApiError(500, fmt::format("internal error: {}", e.what()), "server_error").body())))
              return false;
          }
          ticket.reset();
          static const std::string done = "data: [DONE]\n\n";
          if (!sink.write(done.data(), done.size())) return false;
          sink.done();
          return true;
        });
  }

  void routes() {
    http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) { completions(req, res, false); });
    http.Post("/v1/chat/completions",
              [this](const httplib::Request& req, httplib::Response& res) { completions(req, res, true); });
    http.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(req, res, [&] {
        check_auth(req);
        const ojson model{{"id", opts.model_id},        {"object", "model"},
                          {"created", created},         {"owned_by", "moelab"},
                          {"root", opts.model_id},      {"max_model_len", engine.max_context()}};
        res.set_content(dump(ojson{{"object", "list"}, {"data", ojson::array({model})}}), "application/json");
        return false;
      });
    });
    http.Get("/health", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(req, res, [&] {
        if (stopping) {
          res.status = 503;
          res.set_content(R"({"status":"shutting down"})", "application/json");
        } else {
          res.set_content(R"({"status":"ok"})", "application/json");
        }
        return false;
      });
    });
    http.Get("/metrics", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(req, res, [&] {
        check_auth(req);
        const std::string extra = opts.extra_metrics ? opts.extra_metrics() : std::string();
        res.set_content(metrics.render(queue.waiting(), queue.running(), queue.max_waiting(), extra),
                        "text/plain; version=0.0.4; charset=utf-8");
        return false;
      });
    });
    http.Post("/tokenize", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(req, res, [&] {
        check_auth(req);
        const json body = parse_json_body(req.body);
        if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object", "invalid_request_error");
        const auto it = body.find("prompt");
        if (it == body.end() || !it->is_string()) throw bad_field("prompt", "'prompt' must be a string", "invalid_type");
        bool add = true;
        if (const auto a = body.find("add_special_tokens"); a != body.end() && !a->is_null()) {
          if (!a->is_boolean()) throw bad_field("add_special_tokens", "'add_special_tokens' must be a boolean", "invalid_type");
          add = a->get<bool>();
        }
        const auto ids = encode_with_special_text(tok, it->get<std::string>(), add);
        res.set_content(dump(ojson{{"tokens", ids}, {"count", ids.size()}, {"max_model_len", engine.max_context()}}),
                        "application/json");
        return false;
      });
    });
    http.Post("/detokenize", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(req, res, [&] {
        check_auth(req);
        const json body = parse_json_body(req.body);
        if (!body.is_object()) throw ApiError(400, "the request body must be a JSON object", "invalid_request_error");
        const auto it = body.find("tokens");
        if (it == body.end() || !it->is_array()) throw bad_field("tokens", "'tokens' must be an array of token ids", "invalid_type");
        std::vector<int32_t> ids;
        for (size_t i = 0; i < it->size(); ++i) {
          const json& v = (*it)[i];
          if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= completer.vocab())
            throw bad_field("tokens", fmt::format("tokens[{}] is not a token id from 0 to {}", i, completer.vocab() - 1),
                            "invalid_token_id");
          ids.push_back(int32_t(v.get<int64_t>()));
        }
        res.set_content(dump(ojson{{"prompt", tok.decode(ids)}}), "application/json");
        return false;
      });
    });
    http.Get("/tokenizer_info", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(req, res, [&] {
        check_auth(req);
        const auto piece = [&](int id) { return id >= 0 ? ojson(tok.piece(id)) : ojson(nullptr); };
        res.set_content(dump(ojson{{"tokenizer_class", "LlamaTokenizer"},
                                   {"bos_token", piece(tok.bos_id())},
                                   {"eos_token", piece(tok.eos_id())},
                                   {"pad_token", nullptr},
                                   {"model_max_length", engine.max_context()},
                                   {"vocab_size", completer.vocab()}}),
                        "application/json");
        return false;
      });
    });
  }

  void configure() {
    const size_t threads = std::min<size_t>(opts.max_queue + 16, 1024);
    http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    http.set_payload_max_length(opts.max_body);
    const auto us = [](double s) { return std::chrono::microseconds(int64_t(s * 1e6)); };
    http.set_read_timeout(us(opts.io_timeout));
    http.set_write_timeout(us(opts.io_timeout));
    http.set_keep_alive_timeout(opts.keep_alive_timeout);
    http.set_keep_alive_max_count(1000);
    // httplib writes a response's headers and body in separate sends: without TCP_NODELAY, Nagle's algorithm
    // holds the body until the client's delayed ACK (~40 ms on Linux), longer than a small model's request.
    http.set_tcp_nodelay(true);
    // Before the body is read: a declared length over the limit is refused at once (httplib itself would
    // read and discard the whole body first, however long the client takes to send it), and the connection
    // is closed, since the body is never read (t_doomed).
    // httplib 0.11 applies the body limit to a declared Content-Length only: a chunked body, a POST without a
    // length (read until the client closes) and a compressed one (inflated while read: a 5 MB gzip bomb is
    // 5 GB) would each be held in memory whole, whatever --max-body says. So a body must come with its
    // length (411 otherwise) and uncompressed (415); every OpenAI client and lm-eval's requests send it so.
    http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      t_request_start = Clock::now();
      const ConnectionId conn = connection_of(req);
      const auto refuse = [&](int status) {
        res.status = status;
        res.set_header("Connection", "close");
        if (status == 405) res.set_header("Allow", "GET, POST, HEAD, OPTIONS");
        t_doomed = conn;
        return httplib::Server::HandlerResponse::Handled;  // the error handler writes the body
      };
      // Bytes of a refused request's body, read as a request: never run (their answer goes nowhere). Once the
      // connection is shut down its addresses cannot be read (getpeername: not connected), so a request without
      // them on this thread is that connection's too; a new connection always has them.
      if (t_doomed && (*t_doomed == conn || conn.remote_port < 0 || conn.remote_addr.empty())) return refuse(400);
      t_doomed.reset();  // a new connection on this thread
      // Only GET and POST have routes; another method (whose body httplib would read too) ends here.
      if (req.method != "GET" && req.method != "POST" && req.method != "HEAD" && req.method != "OPTIONS")
        return refuse(405);
      if (req.has_header("Transfer-Encoding")) return refuse(411);
      const std::string encoding = req.get_header_value("Content-Encoding");
      if (!encoding.empty() && encoding != "identity") return refuse(415);
      if (req.method == "POST" && !req.has_header("Content-Length")) return refuse(411);
      const std::string length = req.get_header_value("Content-Length");
      if (!length.empty()) {
        // Digits only: httplib reads "100000000000x" as 1e11 and would wait for that many bytes.
        if (length.size() > 19 || length.find_first_not_of("0123456789") != std::string::npos) return refuse(400);
        const unsigned long long n = std::strtoull(length.c_str(), nullptr, 10);
        if (n > opts.max_body) return refuse(413);
        // GET, HEAD and OPTIONS bodies are never read by httplib 0.11: one would be parsed as the next request.
        if (n > 0 && req.method != "POST") return refuse(400);
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    // Errors httplib answers itself (404, 413, a request it cannot parse) and our own error statuses pass here;
    // a body already set is ours.
    http.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      metrics.request_done(endpoint_label(req.path), res.status,
                           t_request_start == Clock::time_point{} ? 0.0 : since(t_request_start));
      std::string message = reason(res.status);
      if (res.status == 404) message = fmt::format("no such endpoint: {} {}", req.method, req.path);
      if (res.status == 400 && t_doomed)
        message = "a request this server cannot read: a Content-Length of digits only, and a body on POST only";
      if (res.status == 405) message = fmt::format("method not allowed: {} {} (only GET and POST are served)",
                                                   req.method.substr(0, 40), req.path.substr(0, 200));
      if (res.status == 413) message = "the request body is larger than the server accepts (--max-body)";
      if (res.status == 411)
        message = "send the request body with a Content-Length header (chunked transfer encoding is not accepted)";
      if (res.status == 415)
        message = fmt::format("the request body must not be compressed (Content-Encoding: {})",
                              req.get_header_value("Content-Encoding").substr(0, 40));
      res.set_content(dump(ojson(ApiError::error_body(message, type_for(res.status), "", ""))), "application/json");
      return httplib::Server::HandlerResponse::Handled;
    }));
    http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown error";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      res.status = 500;
      res.set_content(dump(ojson(ApiError::error_body("internal error: " + what, "server_error", "", ""))),
                      "application/json");
    });
    http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      const double secs = t_request_start == Clock::time_point{} ? 0.0 : since(t_request_start);
      t_request_start = {};
      // The refused request's own answer (later ones on the shut connection have no addresses).
      if (t_doomed && *t_doomed == connection_of(req)) shutdown_connection(*t_doomed);
      if (opts.log_requests) {
        std::fflush(stdout);
        fmt::print(stderr, "[serve] {} {} {} {:.3f}s\n", req.method, req.path, res.status, secs);
      }
    });
    routes();
  }
};

Server::Server(Engine& engine, const Tokenizer& tok, ServerOptions opts)
    : impl_(std::make_unique<Impl>(engine, tok, std::move(opts))) {
  // A client that vanishes mid-answer must be a failed write, not SIGPIPE ending the process (httplib sends
  // without MSG_NOSIGNAL).
  std::signal(SIGPIPE, SIG_IGN);
  impl_->configure();
}

Server::~Server() {
  stop();
}

int Server::bind() {
  auto& o = impl_->opts;
  if (o.port == 0) {
    const int port = impl_->http.bind_to_any_port(o.host);
    if (port <= 0) throw Error(fmt::format("serve: cannot bind to {} (any port)", o.host));
    o.port = port;
    return port;
  }
  if (!impl_->http.bind_to_port(o.host, o.port))
    throw Error(fmt::format("serve: cannot bind to {}:{} (in use, or not an address of this machine)", o.host, o.port));
  return o.port;
}

void Server::run() {
  if (impl_->stopping) return;
  impl_->http.listen_after_bind();
}

void Server::stop() {
  impl_->stopping = true;
  impl_->queue.shutdown();
  impl_->http.stop();
}

}  // namespace moelab::serve
