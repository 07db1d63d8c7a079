// `moelab serve` (serve/): the real server on an ephemeral loopback port, in process on a fixture model
// (or the bundled one), spoken to with cpp-httplib's client and with raw sockets; and the moelab binary
// itself for the command line, the URL it prints and SIGTERM.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

// Eigen (engine headers) before httplib.h: httplib includes <resolv.h>, whose `_res` macro breaks Eigen.
#include "core/checkpoint.hpp"
#include "core/sampling.hpp"
#include "core/tokenizer.hpp"
#include "evals/loglikelihood.hpp"
#include "fixture_util.hpp"
#include "process_util.hpp"
#include "reference/model.hpp"
#include "serve/chat.hpp"
#include "serve/completion.hpp"
#include "serve/response.hpp"
#include "serve/server.hpp"

#include <httplib.h>

namespace moelab {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// An engine that forwards to the reference, but whose forward() can be held closed by the test: a request
// stays "running" until the test opens the gate (for the queue, 429 and shutdown tests).
class GatedEngine final : public Engine {
 public:
  explicit GatedEngine(std::unique_ptr<Engine> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }
  const ModelConfig& config() const override { return inner_->config(); }
  MatrixRF forward(std::span<const int32_t> tokens, Probe* probe = nullptr) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      entered_++;
      cv_.notify_all();
      cv_.wait(lock, [&] { return open_; });
    }
    return inner_->forward(tokens, probe);
  }
  void reset() override { inner_->reset(); }
  void truncate(int position) override { inner_->truncate(position); }
  int position() const override { return inner_->position(); }
  int max_context() const override { return inner_->max_context(); }

  void close() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = false;
  }
  void open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  // Waits until forward() has been entered `n` times in all (false after 20 s).
  bool wait_entered(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(20), [&] { return entered_ >= n; });
  }

 private:
  std::unique_ptr<Engine> inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
  int entered_ = 0;
};

// A server on a model, in this process, on an ephemeral loopback port.
class ServeTest : public ::testing::Test {
 protected:
  void start(serve::ServerOptions o = {}, const std::string& model = test::model_dir("mixtral-4e-gqa-f32")) {
    ck = Checkpoint::open(model);
    tok = std::make_unique<Tokenizer>(ck->tokenizer_path());
    gated = new GatedEngine(std::make_unique<ref::Model<float>>(*ck));
    engine.reset(gated);
    o.host = "127.0.0.1";
    o.port = 0;
    o.log_requests = false;
    if (o.model_id == "moelab") o.model_id = "fixture";
    server = std::make_unique<serve::Server>(*engine, *tok, o);
    port = server->bind();
    runner = std::thread([this] { server->run(); });
  }
  void TearDown() override {
    if (gated) gated->open();
    if (server) server->stop();
    if (runner.joinable()) runner.join();
  }
  std::unique_ptr<httplib::Client> client(int read_timeout_s = 60) const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
    c->set_read_timeout(read_timeout_s, 0);
    c->set_write_timeout(10, 0);
    c->set_connection_timeout(10, 0);
    return c;
  }
  // POST a JSON body; returns (status, parsed body). A transport failure fails the test.
  std::pair<int, json> post(const std::string& path, const std::string& body, const httplib::Headers& h = {}) const {
    auto c = client();
    auto r = c->Post(path.c_str(), h, body, "application/json");
    if (!r) {
      ADD_FAILURE() << "no response to POST " << path << " (" << httplib::to_string(r.error()) << ")";
      return {0, json()};
    }
    json j = json::parse(r->body, nullptr, false);
    if (r->get_header_value("Content-Type") == "application/json") {
      EXPECT_FALSE(j.is_discarded()) << "not JSON: " << r->body;
    }
    return {r->status, j};
  }
  std::pair<int, json> post(const std::string& path, const json& body, const httplib::Headers& h = {}) const {
    return post(path, body.dump(), h);
  }
  json completion(const json& body) const {
    auto [status, j] = post("/v1/completions", body);
    EXPECT_EQ(status, 200) << j.dump();
    return j;
  }

  std::unique_ptr<Checkpoint> ck;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Engine> engine;
  GatedEngine* gated = nullptr;
  std::unique_ptr<serve::Server> server;
  std::thread runner;
  int port = 0;
};

// The payloads of a server-sent event stream's "data: " events, in order.
std::vector<std::string> sse_events(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    const size_t end = body.find("\n\n", pos);
    const std::string ev = body.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (ev.rfind("data: ", 0) == 0) out.push_back(ev.substr(6));
    if (end == std::string::npos) break;
    pos = end + 2;
  }
  return out;
}

// The error body's shape: {"error": {"message", "type", "param", "code"}}.
void expect_error_body(const json& j, const std::string& type, const std::string& param = "") {
  ASSERT_TRUE(j.is_object() && j.contains("error")) << j.dump();
  const json& e = j["error"];
  ASSERT_TRUE(e.contains("message") && e.contains("type") && e.contains("param") && e.contains("code")) << j.dump();
  EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << j.dump();
  EXPECT_EQ(e["type"], type) << j.dump();
  if (param.empty()) {
    EXPECT_TRUE(e["param"].is_null() || e["param"].is_string()) << j.dump();
  } else {
    EXPECT_EQ(e["param"], param) << j.dump();
  }
}

// A raw TCP connection to the server (for clients that stall or vanish).
struct RawSocket {
  int fd = -1;
  explicit RawSocket(int port) {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(uint16_t(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ~RawSocket() {
    if (fd >= 0) ::close(fd);
  }
  bool send_all(const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      const ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += size_t(n);
    }
    return true;
  }
  // Reads until `until` appears, the peer closes, or `seconds` pass. Returns what was read; `closed` says
  // whether the peer closed the connection.
  std::string read_until(const std::string& until, double seconds, bool* closed = nullptr) {
    std::string got;
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    if (closed) *closed = false;
    while (Clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      const int left = int(std::chrono::duration<double, std::milli>(deadline - Clock::now()).count());
      if (::poll(&p, 1, std::max(1, left)) <= 0) continue;
      char buf[4096];
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) {
        if (closed) *closed = true;
        break;
      }
      got.append(buf, size_t(n));
      if (!until.empty() && got.find(until) != std::string::npos) break;
    }
    return got;
  }
};

std::string http_post_raw(const std::string& path, const std::string& body) {
  return "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

// ---- log-likelihoods: echo equals moelab's own scoring ----

// The prompt's log-probabilities (echo, max_tokens 0) against evals::score_requests on the same engine
// and the same tokens, split into (context, continuation) at every position. Tolerance: none. The server
// forwards the prompt minus its last token in one call after reset(), which is exactly what score_one
// forwards for a (context, continuation) request that fits the context; both take log_softmax in double
// the same way (max, sum of exp, logit - max - log(sum)), so every log-probability is the same double.
TEST_F(ServeTest, EchoLogprobsEqualEvalLoglikelihood) {
  start();
  ref::Model<float> scorer(*ck);
  for (const std::string text : {"The license grants permission to copy.", "Question: what is 2+2?\nAnswer: 4",
                                 " free software, x y  z"}) {
    const auto ids = tok->encode(text, true);
    ASSERT_GE(ids.size(), 3u);
    const json j = completion({{"prompt", text}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 1}});
    const json& lp = j["choices"][0]["logprobs"];
    ASSERT_EQ(lp["token_logprobs"].size(), ids.size()) << j.dump();
    EXPECT_TRUE(lp["token_logprobs"][0].is_null());
    EXPECT_TRUE(lp["top_logprobs"][0].is_null());
    EXPECT_EQ(j["choices"][0]["text"], text);  // echo: the prompt as given
    EXPECT_EQ(j["usage"]["prompt_tokens"], ids.size());
    EXPECT_EQ(j["usage"]["completion_tokens"], 0);
    for (size_t k = 1; k < ids.size(); ++k) {
      const evals::Tokens ctx(ids.begin(), ids.begin() + k), cont(ids.begin() + k, ids.end());
      const auto want = evals::score_requests(scorer, {{ctx, cont}})[0];
      // lm-eval's local-completions: sum(token_logprobs[ctxlen:]) (here max_tokens is 0: nothing to drop).
      double got = 0;
      for (size_t i = k; i < ids.size(); ++i) got += lp["token_logprobs"][i].get<double>();
      EXPECT_EQ(got, want.logprob) << text << " split at " << k;
      for (size_t i = k; i < ids.size(); ++i)
        EXPECT_EQ(lp["token_logprobs"][i].get<double>(), want.token_logprobs[i - k]) << text << " token " << i;
      // is_greedy as the harness derives it: every token's log-prob equals the best of its top_logprobs.
      bool greedy = true;
      for (size_t i = k; i < ids.size(); ++i) {
        double best = -INFINITY;
        for (const auto& [key, v] : lp["top_logprobs"][i].items()) best = std::max(best, v.get<double>());
        greedy = greedy && lp["token_logprobs"][i].get<double>() == best;
      }
      EXPECT_EQ(greedy, want.is_greedy) << text << " split at " << k;
    }
  }
}

// lm-eval's local-completions asks for loglikelihoods as {"prompt": ids, "max_tokens": 1, "echo": true,
// "logprobs": 1, "temperature": 0} and sums token_logprobs[ctxlen:-1]: the prompt's part must be the same
// doubles as with max_tokens 0 (the last prompt token then runs as a separate decode step), and the one
// generated token is the greedy one.
TEST_F(ServeTest, EchoWithOneGeneratedTokenAsLmEvalAsks) {
  start();
  ref::Model<float> scorer(*ck);
  int eos_seen = 0;
  // The second text's greedy next token is EOS on this model: the generated EOS must still be listed (an
  // entry after the prompt's), or the harness's [:-1] would drop the continuation's last token instead.
  for (const std::string text : {"You may copy the work and the license", "Permission is granted to copy"}) {
    const auto ids = tok->encode(text, true);
    const evals::Tokens ctx(ids.begin(), ids.begin() + 4), cont(ids.begin() + 4, ids.end());
    const auto want = evals::score_requests(scorer, {{ctx, cont}})[0];
    const json j = completion(
        {{"prompt", ids}, {"max_tokens", 1}, {"echo", true}, {"logprobs", 1}, {"temperature", 0}, {"seed", 1234}});
    const json& lp = j["choices"][0]["logprobs"];
    ASSERT_EQ(lp["token_logprobs"].size(), ids.size() + 1) << j.dump();
    double got = 0;
    for (size_t i = 4; i + 1 < lp["token_logprobs"].size(); ++i) got += lp["token_logprobs"][i].get<double>();
    EXPECT_EQ(got, want.logprob) << text;
    // The generated token: greedy after the whole prompt, its log-prob the best in its top_logprobs.
    scorer.reset();
    const MatrixRF logits = scorer.forward(ids);
    const auto row = logits.row(logits.rows() - 1);
    const std::span<const float> last(row.data(), size_t(row.size()));
    const int32_t best = argmax(last);
    eos_seen += best == tok->eos_id();
    EXPECT_EQ(j["usage"]["completion_tokens"], 1);
    EXPECT_EQ(j["choices"][0]["finish_reason"], best == tok->eos_id() ? "stop" : "length") << text;
    EXPECT_EQ(j["choices"][0]["text"], text + tok->token_bytes(best));  // EOS: no text
    // A decode step after a 1-token-shorter prefill, against one prefill of the whole prompt: the KV
    // cache's consistency (FP32 rounding), not bit equality.
    EXPECT_NEAR(lp["token_logprobs"].back().get<double>(), evals::token_logprob(last, best), 1e-5);
    EXPECT_EQ(lp["tokens"].back(), tok->token_bytes(best));
  }
  EXPECT_EQ(eos_seen, 1) << "the fixture no longer generates EOS after the second text: pick another";
}

// Prompts as a list (of strings, of id lists): one choice each, in order, each as if sent alone; usage sums.
TEST_F(ServeTest, PromptListsGiveOneChoiceEach) {
  start();
  const json one = completion({{"prompt", "You may"}, {"max_tokens", 4}, {"temperature", 0}});
  const json two = completion({{"prompt", "The work"}, {"max_tokens", 4}, {"temperature", 0}});
  const json both = completion({{"prompt", {"You may", "The work"}}, {"max_tokens", 4}, {"temperature", 0}});
  ASSERT_EQ(both["choices"].size(), 2u);
  EXPECT_EQ(both["choices"][0]["index"], 0);
  EXPECT_EQ(both["choices"][1]["index"], 1);
  EXPECT_EQ(both["choices"][0]["text"], one["choices"][0]["text"]);
  EXPECT_EQ(both["choices"][1]["text"], two["choices"][0]["text"]);
  EXPECT_EQ(both["usage"]["prompt_tokens"],
            one["usage"]["prompt_tokens"].get<int>() + two["usage"]["prompt_tokens"].get<int>());
  EXPECT_EQ(both["usage"]["completion_tokens"],
            one["usage"]["completion_tokens"].get<int>() + two["usage"]["completion_tokens"].get<int>());
  const json ids = completion({{"prompt", {tok->encode("You may", true), tok->encode("The work", true)}},
                               {"max_tokens", 4},
                               {"temperature", 0}});
  EXPECT_EQ(ids["choices"][0]["text"], one["choices"][0]["text"]);
  EXPECT_EQ(ids["choices"][1]["text"], two["choices"][0]["text"]);
  // add_special_tokens false: no BOS before a text prompt.
  const json nobos = completion({{"prompt", "You may"}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 0},
                                 {"add_special_tokens", false}});
  EXPECT_EQ(nobos["usage"]["prompt_tokens"], tok->encode("You may", false).size());
}

// ---- generation ----

// Greedy completions equal `moelab generate` on the same prompt (the binary, spawned): the same text,
// the same number of tokens; with the prompt as text and as token ids.
TEST_F(ServeTest, GreedyCompletionEqualsMoelabGenerate) {
  const std::string model = MOELAB_BUNDLED_MODEL;
  start({}, model);
  test::TempDir dir("moelab-serve");
  for (const std::string prompt : {"int main(", "The license", "Subject"}) {
    const auto run = test::run_moelab({"generate", "-m", model, "-p", prompt, "-n", "40", "--temperature", "0",
                                       "--print-ids"},
                                      dir.path());
    ASSERT_EQ(run.status, 0) << run.err;
    ASSERT_EQ(run.out.rfind(prompt, 0), 0u) << run.out;
    const std::string want = run.out.substr(prompt.size(), run.out.size() - prompt.size() - 1);  // minus "\n"
    std::smatch m;
    ASSERT_TRUE(std::regex_search(run.err, m, std::regex("generated ids: ([0-9,]*)"))) << run.err;
    const size_t count = m[1].str().empty() ? 0 : size_t(std::count(m[1].first, m[1].second, ',') + 1);
    const json j = completion({{"prompt", prompt}, {"max_tokens", 40}, {"temperature", 0}});
    EXPECT_EQ(j["choices"][0]["text"], want) << prompt;
    // usage counts an EOS that ended the text (generate prints "(stopped at EOS)" and does not count it).
    const bool eos = run.err.find("(stopped at EOS)") != std::string::npos;
    EXPECT_EQ(j["usage"]["completion_tokens"], count + (eos ? 1 : 0)) << prompt;
    EXPECT_EQ(j["choices"][0]["finish_reason"], eos ? "stop" : "length") << prompt;
    const json k = completion({{"prompt", tok->encode(prompt, true)}, {"max_tokens", 40}, {"temperature", 0}});
    EXPECT_EQ(k["choices"][0]["text"], want) << prompt;
  }
}

// Stop strings: the text ends just before the first stop string (which may span tokens), finish_reason
// "stop"; a stop string that never appears changes nothing.
TEST_F(ServeTest, StopStrings) {
  start({}, MOELAB_BUNDLED_MODEL);
  const json base = completion({{"prompt", "The license"}, {"max_tokens", 60}, {"temperature", 0}, {"logprobs", 0}});
  const std::string full = base["choices"][0]["text"];
  ASSERT_GE(full.size(), 20u) << full;
  EXPECT_EQ(base["choices"][0]["finish_reason"], "length");
  // A stop string across a token boundary (the last two bytes of one token's text and the first of the
  // next), whose first occurrence is there: a stream must hold the first two bytes back until it knows.
  const json& toks = base["choices"][0]["logprobs"]["tokens"];
  std::string stop;
  size_t at = std::string::npos, offset = 0;
  for (size_t i = 0; i + 1 < toks.size() && at == std::string::npos; ++i) {
    const std::string a = toks[i], b = toks[i + 1];
    offset += a.size();
    if (a.size() < 2 || b.empty() || a.rfind("bytes:", 0) == 0 || b.rfind("bytes:", 0) == 0) continue;
    const std::string cand = a.substr(a.size() - 2) + b.substr(0, 1);
    if (full.find(cand) == offset - 2) stop = cand, at = offset - 2;
  }
  ASSERT_NE(at, std::string::npos) << "no stop string across a token boundary in " << json(full);
  for (const bool stream : {false, true}) {
    auto c = client();
    json body{{"prompt", "The license"}, {"max_tokens", 60}, {"temperature", 0}, {"stop", {"@@never@@", stop}},
              {"stream", stream}};
    auto r = c->Post("/v1/completions", body.dump(), "application/json");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    std::string text, finish;
    if (stream) {
      for (const auto& ev : sse_events(r->body)) {
        if (ev == "[DONE]") break;
        const json e = json::parse(ev);
        text += e["choices"][0]["text"].get<std::string>();
        if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
      }
    } else {
      const json j = json::parse(r->body);
      text = j["choices"][0]["text"];
      finish = j["choices"][0]["finish_reason"];
    }
    EXPECT_EQ(text, full.substr(0, at)) << "stop " << json(stop).dump() << (stream ? " (stream)" : "");
    EXPECT_EQ(finish, "stop");
  }
  const json none = completion({{"prompt", "The license"}, {"max_tokens", 60}, {"temperature", 0}, {"stop", "@@never@@"}});
  EXPECT_EQ(none["choices"][0]["text"], full);
}

// Streaming: the chunks' texts concatenate to the non-streamed text, their logprobs to its logprobs;
// one last chunk carries finish_reason; the stream ends with [DONE]. With echo, the prompt comes first.
TEST_F(ServeTest, StreamConcatenatesToNonStreamed) {
  start({}, MOELAB_BUNDLED_MODEL);
  for (const bool echo : {false, true}) {
    const json body{{"prompt", "int main("}, {"max_tokens", 50}, {"temperature", 0.8}, {"seed", 7},
                    {"logprobs", 2}, {"echo", echo}};
    const json whole = completion(body);
    json sbody = body;
    sbody["stream"] = true;
    sbody["stream_options"] = {{"include_usage", true}};
    auto c = client();
    auto r = c->Post("/v1/completions", sbody.dump(), "application/json");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    EXPECT_EQ(r->get_header_value("Content-Type"), "text/event-stream");
    const auto events = sse_events(r->body);
    ASSERT_GE(events.size(), 3u);
    EXPECT_EQ(events.back(), "[DONE]");
    std::string text, finish;
    std::vector<std::string> tokens;
    std::vector<json> token_logprobs;
    int finishes = 0;
    json usage;
    for (size_t i = 0; i + 1 < events.size(); ++i) {
      const json e = json::parse(events[i]);
      EXPECT_EQ(e["object"], "text_completion");
      if (e.contains("usage")) {
        usage = e["usage"];
        continue;
      }
      const json& ch = e["choices"][0];
      text += ch["text"].get<std::string>();
      if (!ch["finish_reason"].is_null()) {
        finish = ch["finish_reason"];
        finishes++;
      }
      if (!ch["logprobs"].is_null())
        for (size_t k = 0; k < ch["logprobs"]["tokens"].size(); ++k) {
          tokens.push_back(ch["logprobs"]["tokens"][k]);
          token_logprobs.push_back(ch["logprobs"]["token_logprobs"][k]);
        }
    }
    EXPECT_EQ(text, whole["choices"][0]["text"]) << "echo " << echo;
    EXPECT_EQ(finish, whole["choices"][0]["finish_reason"]);
    EXPECT_EQ(finishes, 1);
    EXPECT_EQ(json(tokens), whole["choices"][0]["logprobs"]["tokens"]);
    EXPECT_EQ(json(token_logprobs), whole["choices"][0]["logprobs"]["token_logprobs"]);
    EXPECT_EQ(usage, whole["usage"]);
  }
}

// Chat: Mixtral-Instruct's template, as ids; a chat request generates what a completion of those ids does.
TEST_F(ServeTest, ChatUsesTheInstTemplate) {
  start({}, MOELAB_BUNDLED_MODEL);
  const json msgs = json::array({{{"role", "user"}, {"content", "Hello"}},
                                 {{"role", "assistant"}, {"content", "Hi"}},
                                 {{"role", "user"}, {"content", "Count to 3"}}});
  std::vector<int32_t> want{tok->bos_id()};
  for (const auto& [text, eos] : std::vector<std::pair<std::string, bool>>{
           {"[INST] Hello [/INST]", false}, {"Hi", true}, {"[INST] Count to 3 [/INST]", false}}) {
    const auto seg = tok->encode(text, false);
    want.insert(want.end(), seg.begin(), seg.end());
    if (eos) want.push_back(tok->eos_id());
  }
  EXPECT_EQ(serve::apply_chat_template(*tok, {{"user", "Hello"}, {"assistant", "Hi"}, {"user", "Count to 3"}}), want);
  auto [status, chat] = post("/v1/chat/completions", json{{"messages", msgs}, {"max_tokens", 12}, {"temperature", 0}});
  ASSERT_EQ(status, 200) << chat.dump();
  EXPECT_EQ(chat["object"], "chat.completion");
  EXPECT_EQ(chat["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(chat["usage"]["prompt_tokens"], want.size());
  const json comp = completion({{"prompt", want}, {"max_tokens", 12}, {"temperature", 0}});
  EXPECT_EQ(chat["choices"][0]["message"]["content"], comp["choices"][0]["text"]);
  // Streamed: role first, then content deltas that concatenate to the same text.
  auto c = client();
  auto r = c->Post("/v1/chat/completions",
                   json{{"messages", msgs}, {"max_tokens", 12}, {"temperature", 0}, {"stream", true}}.dump(),
                   "application/json");
  ASSERT_TRUE(r);
  std::string text;
  const auto events = sse_events(r->body);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), "[DONE]");
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json e = json::parse(events[i]);
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    if (i == 0) {
      EXPECT_EQ(e["choices"][0]["delta"]["role"], "assistant");
    }
    if (e["choices"][0]["delta"].contains("content")) text += e["choices"][0]["delta"]["content"].get<std::string>();
  }
  EXPECT_EQ(text, comp["choices"][0]["text"]);
}

// ---- bad requests ----

// Every bad request gets its status and an OpenAI-style error body naming the field; the server keeps
// answering afterwards.
TEST_F(ServeTest, BadRequestsGetStatusAndErrorBody) {
  start();  // context 64 tokens, vocabulary 512
  struct Case {
    std::string path, body;
    int status;
    std::string param, code;
  };
  const std::string c = "/v1/completions", chat = "/v1/chat/completions";
  std::string long_prompt = "[1";
  for (int i = 0; i < 64; ++i) long_prompt += ",300";
  long_prompt += "]";
  std::string long_text;
  while (tok->encode(long_text, true).size() <= 64) long_text += "The license grants permission to copy. ";
  const std::vector<Case> cases{
      {c, R"({"prompt": "x", "max_tokens": 5)", 400, "", "invalid_json"},
      {c, "", 400, "", "invalid_json"},
      {c, "\xff\xfe{}", 400, "", "invalid_json"},
      {c, R"([1, 2])", 400, "", "invalid_type"},
      {c, R"({"max_tokens": 5})", 400, "prompt", "missing_field"},
      {c, R"({"prompt": 123})", 400, "prompt", "invalid_type"},
      {c, R"({"prompt": []})", 400, "prompt", "invalid_value"},
      {c, R"({"prompt": [1, "a"]})", 400, "prompt[1]", "invalid_type"},
      {c, R"({"prompt": ["a", 5]})", 400, "prompt[1]", "invalid_type"},
      {c, R"({"prompt": [[1, 2], []]})", 400, "prompt[1]", "invalid_value"},
      {c, R"({"prompt": "x", "max_tokens": "5"})", 400, "max_tokens", "invalid_type"},
      {c, R"({"prompt": "x", "max_tokens": 1.5})", 400, "max_tokens", "invalid_type"},
      {c, R"({"prompt": "x", "max_tokens": -1})", 400, "max_tokens", "invalid_value"},
      {c, R"({"prompt": "x", "temperature": "hot"})", 400, "temperature", "invalid_type"},
      {c, R"({"prompt": "x", "temperature": -0.5})", 400, "temperature", "invalid_value"},
      {c, R"({"prompt": "x", "top_p": 0})", 400, "top_p", "invalid_value"},
      // Finite doubles FP32 cannot hold (inf, 0): before, the sampler refused them after the prompt's forward
      // pass, a 500 server_error.
      {c, R"({"prompt": "x", "temperature": 1e39})", 400, "temperature", "invalid_value"},
      {c, R"({"prompt": "x", "top_p": 1e-50, "temperature": 0})", 400, "top_p", "invalid_value"},
      {c, R"({"prompt": "x", "top_k": -2})", 400, "top_k", "invalid_value"},
      {c, R"({"prompt": "x", "seed": "s"})", 400, "seed", "invalid_type"},
      {c, R"({"prompt": "x", "echo": "yes"})", 400, "echo", "invalid_type"},
      {c, R"({"prompt": "x", "stream": 1})", 400, "stream", "invalid_type"},
      {c, R"({"prompt": "x", "logprobs": 21})", 400, "logprobs", "invalid_value"},
      {c, R"({"prompt": "x", "logprobs": true})", 400, "logprobs", "invalid_type"},
      {c, R"({"prompt": "x", "stop": 5})", 400, "stop", "invalid_type"},
      {c, R"({"prompt": "x", "stop": ["a", 1]})", 400, "stop[1]", "invalid_type"},
      {c, R"({"prompt": "x", "stop": [""]})", 400, "stop", "invalid_value"},
      {c, R"({"prompt": "x", "n": 2})", 400, "n", "unsupported"},
      {c, R"({"prompt": "x", "model": 7})", 400, "model", "invalid_type"},
      {c, R"({"prompt": "x", "stream_options": {"include_usage": true}})", 400, "stream_options", "invalid_value"},
      {c, R"({"prompt": [1, 2, 512]})", 400, "prompt", "invalid_token_id"},
      {c, R"({"prompt": [1, -1]})", 400, "prompt", "invalid_token_id"},
      {c, R"({"prompt": [1, 99999999999]})", 400, "prompt", "invalid_token_id"},
      {c, R"({"prompt": [[1], [1, 600]]})", 400, "prompt[1]", "invalid_token_id"},
      {c, R"({"prompt": ")" + long_text + R"("})", 400, "prompt", "context_length_exceeded"},
      {c, R"({"prompt": )" + long_prompt + "}", 400, "prompt", "context_length_exceeded"},
      {c, R"({"prompt": "x", "max_tokens": 100})", 400, "max_tokens", "context_length_exceeded"},
      {c, R"({"prompt": "x", "max_tokens": 9223372036854775807})", 400, "max_tokens", "context_length_exceeded"},
      {c, R"({"prompt": "", "add_special_tokens": false})", 400, "prompt", "empty_prompt"},
      {chat, R"({"prompt": "x"})", 400, "messages", "missing_field"},
      {chat, R"({"messages": "hi"})", 400, "messages", "invalid_type"},
      {chat, R"({"messages": [{"role": "user"}]})", 400, "messages[0].content", "missing_field"},
      {chat, R"({"messages": [{"role": "robot", "content": "x"}]})", 400, "messages[0].role", "invalid_value"},
      {chat, R"({"messages": [{"role": "assistant", "content": "x"}]})", 400, "messages", "invalid_value"},
      {chat, R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})", 400, "messages",
       "invalid_value"},
      {chat, R"({"messages": [{"role": "user", "content": "x"}], "logprobs": 3})", 400, "logprobs", "invalid_type"},
      {"/tokenize", R"({"prompt": 5})", 400, "prompt", "invalid_type"},
      {"/detokenize", R"({"tokens": [1, 100000]})", 400, "tokens", "invalid_token_id"},
  };
  for (const auto& k : cases) {
    auto [status, j] = post(k.path, k.body);
    EXPECT_EQ(status, k.status) << k.path << " " << k.body << " -> " << j.dump();
    expect_error_body(j, "invalid_request_error", k.param);
    EXPECT_EQ(j["error"]["code"], k.code) << k.body << " -> " << j.dump();
  }
  // A body of nested brackets (2 MB, under --max-body's default): before, describing it in the error message
  // (dump recurses once per level) overflowed the stack and took the whole server down.
  for (const std::string& open : {std::string("["), std::string("{\"a\":")}) {
    std::string deep;
    for (int i = 0; i < 500000; ++i) deep += open;
    deep += "1";
    for (int i = 0; i < 500000; ++i) deep += open == "[" ? "]" : "}";
    for (const auto& [path, body] : std::vector<std::pair<std::string, std::string>>{
             {c, deep}, {chat, R"({"messages": )" + deep + "}"}}) {
      auto [status, j] = post(path, body);
      EXPECT_EQ(status, 400) << j.dump().substr(0, 200);
      expect_error_body(j, "invalid_request_error");
      EXPECT_EQ(j["error"]["code"], "invalid_json");
      EXPECT_EQ(j["error"]["message"], "the request body: JSON nested more than 64 levels deep");
    }
  }
  // Unknown endpoints and methods: 404 with the same error shape.
  auto cl = client();
  for (const auto& [method, path] : std::vector<std::pair<std::string, std::string>>{
           {"GET", "/v1/nothing"}, {"GET", "/v1/completions"}, {"POST", "/v1/models"}}) {
    auto r = method == "GET" ? cl->Get(path.c_str()) : cl->Post(path.c_str(), "{}", "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 404) << method << " " << path;
    expect_error_body(json::parse(r->body), "not_found_error");
  }
  // Still serving.
  const json ok = completion({{"prompt", "x"}, {"max_tokens", 2}});
  EXPECT_EQ(ok["choices"].size(), 1u);
}

// A body over --max-body: 413 with an error body, nothing read into memory past the limit; a body just
// under it is served.
TEST_F(ServeTest, BodyOverTheLimitIs413) {
  serve::ServerOptions o;
  o.max_body = 4096;
  start(o);
  const std::string pad(4096, ' ');
  auto [status, j] = post("/v1/completions", R"({"prompt": "x", "max_tokens": 1})" + pad);
  EXPECT_EQ(status, 413) << j.dump();
  expect_error_body(j, "invalid_request_error");
  const std::string small = R"({"prompt": "x", "max_tokens": 1})";
  auto [status2, j2] = post("/v1/completions", small + std::string(4096 - small.size(), ' '));
  EXPECT_EQ(status2, 200) << j2.dump();
  // A huge Content-Length that is never sent: answered at once, not waited for.
  RawSocket s(port);
  ASSERT_GE(s.fd, 0);
  ASSERT_TRUE(s.send_all("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n{"));
  const auto t0 = Clock::now();
  std::string got = s.read_until("}}", 10);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 3.0);
  bool closed = false;
  got += s.read_until("", 10, &closed);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 3.0) << "closed at once, not after keep-alive";
  EXPECT_EQ(got.rfind("HTTP/1.1 413 ", 0), 0u) << got;
  EXPECT_NE(got.find("{\"error\":{\"message\":"), std::string::npos) << got;
  EXPECT_TRUE(closed) << "the connection stays open after a refused body";
}

// Bodies whose size the server cannot know before reading them: chunked (411), without a Content-Length (411),
// or compressed (415: a small gzip body can inflate to gigabytes). httplib would read each of them into
// memory whole, past --max-body; each is refused before its body is read, and the connection is closed.
TEST_F(ServeTest, BodiesOfUnknownSizeAreRefusedBeforeReading) {
  serve::ServerOptions o;
  o.max_body = 4096;
  start(o);
  for (const auto& [request, status] : std::vector<std::pair<std::string, std::string>>{
           {"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", "411"},
           {"POST /v1/completions HTTP/1.1\r\n", "411"},
           {"POST /v1/completions HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 100\r\n", "415"},
           {"POST /v1/completions HTTP/1.1\r\nContent-Encoding: br\r\nContent-Length: 100\r\n", "415"},
           {"DELETE /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", "405"},
           {"POST /v1/completions HTTP/1.1\r\nContent-Length: 100000000000x\r\n", "400"},
           {"GET /health HTTP/1.1\r\nContent-Length: 20\r\n", "400"}}) {
    RawSocket s(port);
    ASSERT_GE(s.fd, 0);
    // The headers, then (once refused) a "body" that is a whole request of its own: only a refusal before
    // reading answers in time, and the inner request, still on the socket after the answer, must never run
    // (httplib would read it as the connection's next request).
    ASSERT_TRUE(s.send_all(request + "Host: x\r\nContent-Type: application/json\r\n\r\n"));
    const auto t0 = Clock::now();
    std::string got = s.read_until("}}", 10);
    s.send_all(http_post_raw("/v1/completions", R"({"prompt": "x", "max_tokens": 1})"));  // may find it shut
    bool closed = false;
    got += s.read_until("", 3, &closed);
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 2.5) << request;
    EXPECT_TRUE(closed) << request << ": the connection stays open after the refusal";
    EXPECT_EQ(got.rfind("HTTP/1.1 " + status + " ", 0), 0u) << request << " -> " << got;
    EXPECT_NE(got.find("{\"error\":{\"message\":"), std::string::npos) << got;
    EXPECT_EQ(got.find("HTTP/1.1", 1), std::string::npos) << "a second answer, to the body: " << got;
  }
  auto c = client();
  const auto metrics = c->Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_EQ(metrics->body.find("moelab_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"), std::string::npos)
      << "a request inside a refused body ran:\n" << metrics->body;
  // Content-Encoding: identity is no encoding; a plain body is served as before.
  auto [ok_status, ok] = post("/v1/completions", std::string(R"({"prompt": "x", "max_tokens": 1})"), httplib::Headers{{"Content-Encoding", "identity"}});
  EXPECT_EQ(ok_status, 200) << ok.dump();
}

// Chat log-probabilities: "bytes" holds the token's own bytes (a client rebuilds a character split over
// byte-fallback tokens from them), never the bytes of its "bytes:\xNN" display form; top_logprobs lists
// exactly the number asked for (the completions API's extra entry for the chosen token is not chat's).
TEST(ServeResponse, ChatLogprobBytesAreTheTokensOwn) {
  serve::LogprobEntry e;
  e.token = serve::token_display("\xE2");
  e.bytes = "\xE2";
  e.logprob = -0.5;
  e.top = std::vector<serve::TopLogprob>{{"a", -0.1, "a", false}, {e.token, -0.5, "\xE2", true}};
  serve::ChoiceResult choice;
  choice.text = "x";
  choice.logprobs = {e};
  const auto j = serve::chat_json(serve::ResponseMeta{}, choice, true);
  const auto& c = j["choices"][0]["logprobs"]["content"][0];
  EXPECT_EQ(c["token"], "bytes:\\xe2");
  EXPECT_EQ(c["bytes"], nlohmann::ordered_json::array({0xE2})) << c.dump();
  ASSERT_EQ(c["top_logprobs"].size(), 1u) << c.dump();
  EXPECT_EQ(c["top_logprobs"][0]["bytes"], nlohmann::ordered_json::array({'a'}));
  // The completions API keeps the chosen token beside the top N, as OpenAI's legacy API does.
  const auto legacy = serve::completion_logprobs_json({e});
  EXPECT_EQ(legacy["top_logprobs"][0].size(), 2u) << legacy.dump();
}

// --api-key: a missing or wrong key is 401 (with an error body) on every endpoint but /health.
TEST_F(ServeTest, ApiKey) {
  serve::ServerOptions o;
  o.api_key = "sekret-key";
  start(o);
  const json body{{"prompt", "x"}, {"max_tokens", 1}};
  auto [s1, j1] = post("/v1/completions", body);
  EXPECT_EQ(s1, 401);
  expect_error_body(j1, "authentication_error");
  EXPECT_EQ(j1["error"]["code"], "missing_api_key");
  auto [s2, j2] = post("/v1/completions", body, {{"Authorization", "Bearer sekret-kez"}});
  EXPECT_EQ(s2, 401);
  EXPECT_EQ(j2["error"]["code"], "invalid_api_key");
  auto [s3, j3] = post("/v1/completions", body, {{"Authorization", "sekret-key"}});
  EXPECT_EQ(s3, 401);
  auto [s4, j4] = post("/v1/completions", body, {{"Authorization", "Bearer sekret-key"}});
  EXPECT_EQ(s4, 200) << j4.dump();
  auto c = client();
  for (const char* path : {"/v1/models", "/metrics", "/tokenizer_info"}) {
    auto r = c->Get(path);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 401) << path;
    auto ok = c->Get(path, {{"Authorization", "Bearer sekret-key"}});
    ASSERT_TRUE(ok);
    EXPECT_EQ(ok->status, 200) << path;
  }
  auto h = c->Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
}

// One request runs, --max-queue wait, the next is refused with 429 at once; when the engine frees up the
// waiting ones run in order. The queue depth shows in /metrics.
TEST_F(ServeTest, FullQueueIs429) {
  serve::ServerOptions o;
  o.max_queue = 1;
  start(o);
  gated->close();
  std::pair<int, json> a, b;
  std::thread ta([&] { a = post("/v1/completions", json{{"prompt", "one"}, {"max_tokens", 2}}); });
  ASSERT_TRUE(gated->wait_entered(1));  // a runs (held inside forward)
  std::thread tb([&] { b = post("/v1/completions", json{{"prompt", "two"}, {"max_tokens", 2}}); });
  // b waits in the queue: the depth shows 1.
  bool queued = false;
  for (int i = 0; i < 200 && !queued; ++i) {
    auto r = client()->Get("/metrics");
    queued = r && r->body.find("moelab_queue_depth 1\n") != std::string::npos &&
             r->body.find("moelab_requests_running 1\n") != std::string::npos;
    if (!queued) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(queued);
  const auto t0 = Clock::now();
  auto [s, j] = post("/v1/completions", json{{"prompt", "three"}, {"max_tokens", 2}});
  EXPECT_EQ(s, 429);
  expect_error_body(j, "rate_limit_error");
  EXPECT_EQ(j["error"]["code"], "queue_full");
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 5.0);
  auto [ss, sj] = post("/v1/completions", json{{"prompt", "four"}, {"max_tokens", 2}, {"stream", true}});
  EXPECT_EQ(ss, 429);  // a stream is refused before its headers
  gated->open();
  ta.join();
  tb.join();
  EXPECT_EQ(a.first, 200) << a.second.dump();
  EXPECT_EQ(b.first, 200) << b.second.dump();
  auto m = client()->Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_NE(m->body.find("moelab_requests_total{endpoint=\"/v1/completions\",status=\"429\"} 2\n"), std::string::npos)
      << m->body;
  EXPECT_NE(m->body.find("moelab_queue_depth 0\n"), std::string::npos);
}

// stop() (what SIGINT/SIGTERM call) while one request runs and one waits: the running one ends at its
// next token with a 503 error body, the waiting one gets 503, run() returns; nothing hangs.
TEST_F(ServeTest, StopWhileRequestsRunAndWait) {
  start();
  gated->close();
  std::pair<int, json> a, b;
  std::thread ta([&] { a = post("/v1/completions", json{{"prompt", "one"}, {"max_tokens", 20}}); });
  ASSERT_TRUE(gated->wait_entered(1));
  std::thread tb([&] { b = post("/v1/completions", json{{"prompt", "two"}, {"max_tokens", 2}}); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // b is queued
  const auto t0 = Clock::now();
  std::thread stopper([&] { server->stop(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  gated->open();  // the running forward call finishes; the next token sees the stop
  stopper.join();
  runner.join();
  ta.join();
  tb.join();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 15.0);
  EXPECT_EQ(a.first, 503) << a.second.dump();
  expect_error_body(a.second, "server_error");
  EXPECT_EQ(b.first, 503) << b.second.dump();
  EXPECT_EQ(b.second["error"]["code"], "shutting_down");
  server.reset();
}

// A client that sends half a request and stalls, or starts a stream and vanishes, holds only its own
// connection: others are answered meanwhile, the stalled one is closed after the I/O timeout.
TEST_F(ServeTest, SlowAndVanishedClientsDoNotBlockOthers) {
  serve::ServerOptions o;
  o.io_timeout = 1;
  start(o, MOELAB_BUNDLED_MODEL);
  std::vector<std::unique_ptr<RawSocket>> stalled;
  for (int i = 0; i < 4; ++i) {
    stalled.push_back(std::make_unique<RawSocket>(port));
    ASSERT_GE(stalled.back()->fd, 0);
    ASSERT_TRUE(stalled.back()->send_all("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pro"));
  }
  // A stream whose client disconnects after the first event.
  {
    RawSocket gone(port);
    ASSERT_TRUE(gone.send_all(http_post_raw(
        "/v1/completions", R"({"prompt": "The", "max_tokens": 900, "temperature": 0.9, "stream": true})")));
    EXPECT_NE(gone.read_until("data: ", 20).find("data: "), std::string::npos);
  }
  const auto t0 = Clock::now();
  const json j = completion({{"prompt", "The license"}, {"max_tokens", 5}, {"temperature", 0}});
  EXPECT_EQ(j["usage"]["completion_tokens"], 5);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 10.0);
  for (auto& s : stalled) {
    bool closed = false;
    const std::string got = s->read_until("", 10, &closed);
    EXPECT_TRUE(closed) << "a stalled connection was not closed after the read timeout";
    (void)got;
  }
}

// /v1/models, /health, /metrics (counters that match what was served), /tokenize and friends.
TEST_F(ServeTest, ModelsHealthMetricsTokenizer) {
  serve::ServerOptions o;
  o.model_id = "tiny";
  start(o);
  auto c = client();
  auto models = c->Get("/v1/models");
  ASSERT_TRUE(models);
  const json mj = json::parse(models->body);
  EXPECT_EQ(mj["object"], "list");
  EXPECT_EQ(mj["data"][0]["id"], "tiny");
  EXPECT_EQ(mj["data"][0]["max_model_len"], 64);
  auto h = c->Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  int64_t prompt = 0, generated = 0;
  for (int i = 0; i < 3; ++i) {
    const json j = completion({{"prompt", "You may copy"}, {"max_tokens", 3 + i}, {"model", "tiny"}});
    EXPECT_EQ(j["model"], "tiny");
    prompt += j["usage"]["prompt_tokens"].get<int64_t>();
    generated += j["usage"]["completion_tokens"].get<int64_t>();
  }
  post("/v1/completions", std::string("{"));
  auto m = c->Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->get_header_value("Content-Type").rfind("text/plain; version=0.0.4", 0), 0u);
  const std::string& t = m->body;
  EXPECT_NE(t.find("moelab_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 3\n"), std::string::npos) << t;
  EXPECT_NE(t.find("moelab_requests_total{endpoint=\"/v1/completions\",status=\"400\"} 1\n"), std::string::npos) << t;
  EXPECT_NE(t.find(fmt::format("moelab_prompt_tokens_total {}\n", prompt)), std::string::npos) << t;
  EXPECT_NE(t.find(fmt::format("moelab_generated_tokens_total {}\n", generated)), std::string::npos) << t;
  EXPECT_NE(t.find("moelab_request_duration_seconds_count{endpoint=\"/v1/completions\"} 4\n"), std::string::npos) << t;
  EXPECT_NE(t.find("moelab_request_duration_seconds_bucket{endpoint=\"/v1/completions\",le=\"+Inf\"} 4\n"),
            std::string::npos);
  EXPECT_NE(t.find("moelab_queue_wait_seconds_count 3\n"), std::string::npos) << t;
  EXPECT_NE(t.find("moelab_request_overhead_seconds_count 3\n"), std::string::npos) << t;
  EXPECT_NE(t.find("moelab_request_overhead_seconds_bucket{le=\"+Inf\"} 3\n"), std::string::npos) << t;
  std::smatch engine_s;
  ASSERT_TRUE(std::regex_search(t, engine_s, std::regex("moelab_engine_seconds_total ([0-9.e+-]+)\n"))) << t;
  EXPECT_GT(std::stod(engine_s[1]), 0.0);
  // Every sample line is NAME{labels} VALUE or NAME VALUE; every family has HELP and TYPE.
  std::istringstream lines(t);
  std::string line;
  const std::regex sample(R"(^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [0-9.e+-]+$)");
  while (std::getline(lines, line)) {
    if (line.rfind("#", 0) != 0) {
      EXPECT_TRUE(std::regex_match(line, sample)) << line;
    }
  }
  // The tokenizer endpoints vLLM has (lm-eval's remote tokenizer): special tokens written as text are ids.
  auto [s1, tk] = post("/tokenize", json{{"prompt", "<s>You may"}, {"add_special_tokens", false}});
  EXPECT_EQ(s1, 200);
  auto want = tok->encode("You may", false);
  want.insert(want.begin(), tok->bos_id());
  EXPECT_EQ(tk["tokens"], json(want));
  auto [s2, dt] = post("/detokenize", json{{"tokens", want}});
  EXPECT_EQ(dt["prompt"], "You may");
  auto info = c->Get("/tokenizer_info");
  ASSERT_TRUE(info);
  EXPECT_EQ(json::parse(info->body)["eos_token"], "</s>");
}

// ---- the command ----

// `moelab serve --port 0` prints its URL; SIGTERM while a stream runs: the stream ends (its last event
// [DONE], after either the finish or a shutting_down error), the process exits 0 and says it stopped.
TEST(ServeCli, SigtermWhileStreamingEndsCleanly) {
  test::TempDir dir("moelab-serve-cli");
  const auto out = dir.path() / "stdout.txt", err = dir.path() / "stderr.txt";
  const pid_t pid = test::spawn_program({MOELAB_BIN, "serve", "--port", "0", "-m", MOELAB_BUNDLED_MODEL}, out, err);
  ASSERT_GT(pid, 0);
  int port = 0;
  for (int i = 0; i < 600 && port == 0; ++i) {
    std::smatch m;
    const std::string text = test::read_file_bytes(out);
    if (std::regex_search(text, m, std::regex(R"(listening on http://127\.0\.0\.1:([0-9]+)/v1)"))) port = std::stoi(m[1]);
    else std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (port == 0) ::kill(pid, SIGKILL);
  ASSERT_GT(port, 0) << test::read_file_bytes(out) << test::read_file_bytes(err);
  RawSocket s(port);
  ASSERT_GE(s.fd, 0);
  ASSERT_TRUE(s.send_all(http_post_raw(
      "/v1/completions", R"({"prompt": "The", "max_tokens": 1000, "temperature": 1.0, "seed": 3, "stream": true})")));
  std::string got = s.read_until("data: ", 30);
  ASSERT_NE(got.find("data: "), std::string::npos) << got;
  // An idle keep-alive connection too: it must not hold the exit.
  RawSocket idle(port);
  ASSERT_TRUE(idle.send_all("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  EXPECT_NE(idle.read_until("\"ok\"", 10).find("\"ok\""), std::string::npos);
  const auto t0 = Clock::now();
  ::kill(pid, SIGTERM);
  bool closed = false;
  got += s.read_until("data: [DONE]", 30, &closed);
  EXPECT_NE(got.find("data: [DONE]"), std::string::npos) << got.substr(got.size() > 600 ? got.size() - 600 : 0);
  const bool finished = got.find("\"finish_reason\":\"length\"") != std::string::npos ||
                        got.find("\"finish_reason\":\"stop\"") != std::string::npos;
  const bool refused = got.find("\"code\":\"shutting_down\"") != std::string::npos;
  EXPECT_TRUE(finished || refused) << got.substr(got.size() > 600 ? got.size() - 600 : 0);
  const auto run = test::wait_program(pid, 30, out, err);
  EXPECT_FALSE(run.timed_out);
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 20.0);
  EXPECT_NE(run.err.find("SIGTERM received"), std::string::npos) << run.err;
  EXPECT_NE(run.out.find("moelab serve: stopped"), std::string::npos) << run.out;
}

// The server's resident memory in kB (/proc/PID/status VmRSS), 0 when unreadable.
long rss_kb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return 0;
}

// A bounded soak (loopback only, count- and time-limited): 6 concurrent clients, 4 rounds of 15 requests
// each, mixing well-formed completions (every answer checked against the text the server gave alone),
// streams whose client disconnects after the first event, random bytes, malformed JSON and bodies cut
// short. Every well-formed request is answered correctly, every bad one with 400 or a closed connection;
// the server's memory after the last round is within 8 MB of what it was after the first (no growth per
// request), and SIGTERM then ends it with exit 0.
TEST(ServeCli, SoakConcurrentClientsGarbageAndDisconnects) {
  test::TempDir dir("moelab-serve-soak");
  const auto out = dir.path() / "stdout.txt", err = dir.path() / "stderr.txt";
  const pid_t pid = test::spawn_program({MOELAB_BIN, "serve", "--port", "0", "--quiet", "--io-timeout", "2",
                                         "--max-queue", "64", "-m", MOELAB_BUNDLED_MODEL},
                                        out, err);
  ASSERT_GT(pid, 0);
  int port = 0;
  for (int i = 0; i < 600 && port == 0; ++i) {
    std::smatch m;
    const std::string text = test::read_file_bytes(out);
    if (std::regex_search(text, m, std::regex(R"(listening on http://127\.0\.0\.1:([0-9]+)/v1)"))) port = std::stoi(m[1]);
    else std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (port == 0) ::kill(pid, SIGKILL);
  ASSERT_GT(port, 0) << test::read_file_bytes(err);
  const std::vector<std::string> prompts{"int main(", "The license", "Subject", "#!/bin/sh"};
  std::map<std::string, std::string> expected;  // each prompt's greedy text, asked alone
  {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    for (const auto& p : prompts) {
      auto r = c.Post("/v1/completions", json{{"prompt", p}, {"max_tokens", 12}, {"temperature", 0}}.dump(),
                      "application/json");
      ASSERT_TRUE(r && r->status == 200);
      expected[p] = json::parse(r->body)["choices"][0]["text"];
    }
  }
  const auto deadline = Clock::now() + std::chrono::seconds(240);
  std::atomic<int> good{0}, wrong{0}, bad_answered{0};
  std::vector<long> rss;
  for (int round = 0; round < 4; ++round) {
    std::vector<std::thread> clients;
    for (int t = 0; t < 6; ++t)
      clients.emplace_back([&, t, round] {
        httplib::Client c("127.0.0.1", port);
        c.set_read_timeout(60, 0);
        std::mt19937 rng(uint32_t(round * 100 + t));
        for (int i = 0; i < 15 && Clock::now() < deadline; ++i) {
          switch ((t + i) % 5) {
            case 0:
            case 1: {  // well-formed
              const std::string& p = prompts[size_t(rng() % prompts.size())];
              auto r = c.Post("/v1/completions", json{{"prompt", p}, {"max_tokens", 12}, {"temperature", 0}}.dump(),
                              "application/json");
              const bool ok = r && r->status == 200 && json::parse(r->body)["choices"][0]["text"] == expected[p];
              (ok ? good : wrong)++;
              break;
            }
            case 2: {  // a stream dropped after its first event
              RawSocket s(port);
              s.send_all(http_post_raw("/v1/completions",
                                       R"({"prompt": "The", "max_tokens": 200, "temperature": 1, "stream": true})"));
              s.read_until("data: ", 20);
              break;
            }
            case 3: {  // random bytes: a whole "request" (answered 400 or closed), and a fragment abandoned
              RawSocket s(port);
              std::string junk(size_t(50 + rng() % 400), '\0');
              for (auto& ch : junk) ch = char(rng());
              s.send_all(junk + "\r\n\r\n");
              bool closed = false;
              const std::string got = s.read_until("\r\n\r\n", 5, &closed);
              if (closed || got.find(" 400 ") != std::string::npos) bad_answered++;
              RawSocket gone(port);
              gone.send_all(junk.substr(0, junk.size() / 2));
              break;
            }
            case 4: {  // malformed JSON, and a body cut short
              auto r = c.Post("/v1/completions", std::string(R"({"prompt": "x", "max_tokens": )"), "application/json");
              if (r && r->status == 400) bad_answered++;
              RawSocket s(port);
              s.send_all("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"prompt\"");
              break;
            }
          }
        }
      });
    for (auto& c : clients) c.join();
    rss.push_back(rss_kb(pid));
  }
  EXPECT_LT(Clock::now(), deadline) << "the soak ran out of time";
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GE(good.load(), 4 * 6 * 6);
  EXPECT_GE(bad_answered.load(), 4 * 6 * 3);
  ASSERT_GT(rss.front(), 0);
#ifndef __SANITIZE_ADDRESS__
  EXPECT_LT(rss.back() - rss.front(), 8 * 1024) << "RSS after each round (kB): " << json(rss).dump();
#else
  // An AddressSanitizer build (scripts/sanitize.sh) keeps freed memory in its quarantine (256 MB by default)
  // so use-after-free is caught: RSS grows by design there (490 MB over the rounds, measured). That build
  // checks leaks with LeakSanitizer at the server's exit instead.
#endif
  std::printf("soak: %d well-formed answered correctly, %d bad ones answered or closed; RSS after each round (kB): %s\n",
              good.load(), bad_answered.load(), json(rss).dump().c_str());
  // Still serving, then a clean stop.
  httplib::Client c("127.0.0.1", port);
  auto h = c.Get("/health");
  EXPECT_TRUE(h && h->status == 200);
  ::kill(pid, SIGTERM);
  const auto run = test::wait_program(pid, 30, out, err);
  EXPECT_FALSE(run.timed_out);
  EXPECT_EQ(run.exit_code, 0) << run.err;
}

// A port already taken: one error line, exit 1, no hang.
TEST(ServeCli, PortInUseIsOneErrorLine) {
  const int blocker = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(blocker, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(blocker, 1), 0);
  socklen_t len = sizeof a;
  ::getsockname(blocker, reinterpret_cast<sockaddr*>(&a), &len);
  const int taken = ntohs(a.sin_port);
  test::TempDir dir("moelab-serve-cli");
  const auto r = test::run_program({MOELAB_BIN, "serve", "--port", std::to_string(taken), "-m",
                                    test::model_dir("mixtral-4e-gqa-f32")},
                                   dir.path(), 60);
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find(fmt::format("moelab: error: serve: cannot bind to 127.0.0.1:{}", taken)), std::string::npos)
      << r.err;
  ::close(blocker);
}

}  // namespace
}  // namespace moelab
