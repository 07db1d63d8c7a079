#include "serve/request.hpp"

#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "serve/api_error.hpp"
#include "core/json_bounded.hpp"

namespace moelab::serve {

namespace {

using nlohmann::json;

// A short description of a JSON value for an error message: its type, and the value when short. An array or
// object is described by its size only: dump recurses once per nesting level, and a 2 MB body of nested
// brackets would overflow the stack (the parser and the destructor do not recurse).
std::string describe(const json& v) {
  if (v.is_structured())
    return fmt::format("{} of {} {}{}", v.type_name(), v.size(), v.is_array() ? "element" : "member",
                       v.size() == 1 ? "" : "s");
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return fmt::format("{} {}", v.type_name(), text);
}

ApiError wrong_type(const std::string& field, const std::string& expected, const json& got) {
  return bad_field(field, fmt::format("'{}' must be {}, got {}", field, expected, describe(got)), "invalid_type");
}

// A field present and not null, else nullptr.
const json* field(const json& body, const char* name) {
  const auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

bool get_bool(const json& body, const char* name, bool fallback) {
  const json* v = field(body, name);
  if (!v) return fallback;
  if (!v->is_boolean()) throw wrong_type(name, "a boolean", *v);
  return v->get<bool>();
}

// An integer (JSON integer, or a float with an integral value such as 16.0).
int64_t get_int(const json& v, const std::string& name) {
  if (v.is_number_integer()) {
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
      throw bad_field(name, fmt::format("'{}' is out of range: {}", name, v.dump()));
    return v.get<int64_t>();
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return int64_t(d);
  }
  throw wrong_type(name, "an integer", v);
}

double get_number(const json& v, const std::string& name) {
  if (!v.is_number()) throw wrong_type(name, "a number", v);
  const double d = v.get<double>();
  if (!std::isfinite(d)) throw bad_field(name, fmt::format("'{}' must be finite", name));
  return d;
}

std::vector<int64_t> get_ids(const json& arr, const std::string& name) {
  std::vector<int64_t> ids;
  ids.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    if (!arr[i].is_number_integer())
      throw wrong_type(fmt::format("{}[{}]", name, i), "a token id (an integer)", arr[i]);
    ids.push_back(get_int(arr[i], name));
  }
  return ids;
}

std::vector<Prompt> get_prompts(const json& body) {
  const json* v = field(body, "prompt");
  if (!v) throw bad_field("prompt", "'prompt' is required", "missing_field");
  std::vector<Prompt> out;
  if (v->is_string()) {
    out.push_back({true, v->get<std::string>(), {}});
    return out;
  }
  if (!v->is_array())
    throw wrong_type("prompt", "a string, an array of strings, an array of token ids or an array of arrays of token ids",
                     *v);
  if (v->empty()) throw bad_field("prompt", "'prompt' must not be an empty array");
  const json& first = v->front();
  if (first.is_number()) {  // one prompt of token ids
    out.push_back({false, {}, get_ids(*v, "prompt")});
    return out;
  }
  if (v->size() > kMaxPrompts)
    throw bad_field("prompt", fmt::format("'prompt' holds {} prompts; at most {} per request", v->size(), kMaxPrompts));
  for (size_t i = 0; i < v->size(); ++i) {
    const json& p = (*v)[i];
    const std::string name = fmt::format("prompt[{}]", i);
    if (first.is_string()) {
      if (!p.is_string()) throw wrong_type(name, "a string (like prompt[0])", p);
      out.push_back({true, p.get<std::string>(), {}});
    } else if (first.is_array()) {
      if (!p.is_array()) throw wrong_type(name, "an array of token ids (like prompt[0])", p);
      if (p.empty()) throw bad_field(name, fmt::format("'{}' must not be empty", name));
      out.push_back({false, {}, get_ids(p, name)});
    } else {
      throw wrong_type(name, "a string, a token id or an array of token ids", p);
    }
  }
  return out;
}

std::vector<std::string> get_stop(const json& body) {
  const json* v = field(body, "stop");
  std::vector<std::string> out;
  if (!v) return out;
  if (v->is_string()) {
    out.push_back(v->get<std::string>());
  } else if (v->is_array()) {
    if (v->size() > kMaxStops)
      throw bad_field("stop", fmt::format("'stop' holds {} strings; at most {}", v->size(), kMaxStops));
    for (size_t i = 0; i < v->size(); ++i) {
      if (!(*v)[i].is_string()) throw wrong_type(fmt::format("stop[{}]", i), "a string", (*v)[i]);
      out.push_back((*v)[i].get<std::string>());
    }
  } else {
    throw wrong_type("stop", "a string or an array of strings", *v);
  }
  for (const auto& s : out)
    if (s.empty()) throw bad_field("stop", "'stop' strings must not be empty");
  return out;
}

// Fields common to both endpoints: sampling, stop, stream, seed, and the refusals.
void parse_common(const json& body, CompletionRequest& r) {
  if (const json* v = field(body, "model"); v && !v->is_string()) throw wrong_type("model", "a string", *v);
  if (const json* v = field(body, "user"); v && !v->is_string()) throw wrong_type("user", "a string", *v);
  if (const json* v = field(body, "max_tokens")) {
    r.max_tokens = get_int(*v, "max_tokens");
    r.max_tokens_given = true;
  } else if (const json* w = field(body, "max_completion_tokens")) {
    r.max_tokens = get_int(*w, "max_completion_tokens");
    r.max_tokens_given = true;
  }
  if (r.max_tokens < 0) throw bad_field("max_tokens", fmt::format("'max_tokens' must be 0 or more, got {}", r.max_tokens));
  if (const json* v = field(body, "temperature")) {
    r.temperature = get_number(*v, "temperature");
    // The sampler works in FP32: a value FP32 cannot hold (1e39 becomes inf, 1e-50 becomes 0) is refused here, as
    // the client's error, not by the sampler after the prompt's forward pass as a server error.
    if (r.temperature < 0 || !std::isfinite(float(r.temperature)))
      throw bad_field("temperature", fmt::format("'temperature' must be 0 or more and at most {:g}, got {}",
                                                 std::numeric_limits<float>::max(), r.temperature));
  }
  if (const json* v = field(body, "top_p")) {
    r.top_p = get_number(*v, "top_p");
    if (!(r.top_p > 0 && r.top_p <= 1) || !(float(r.top_p) > 0))
      throw bad_field("top_p", fmt::format("'top_p' must be in (0, 1] and at least {:g}, got {}",
                                           std::numeric_limits<float>::denorm_min(), r.top_p));
  }
  if (const json* v = field(body, "top_k")) {
    r.top_k = get_int(*v, "top_k");
    if (r.top_k < -1) throw bad_field("top_k", fmt::format("'top_k' must be -1 or 0 (no limit) or more, got {}", r.top_k));
    if (r.top_k == -1) r.top_k = 0;
    if (r.top_k > std::numeric_limits<int>::max()) r.top_k = 0;  // more than any vocabulary: no limit
  }
  if (const json* v = field(body, "seed")) r.seed = uint64_t(get_int(*v, "seed"));
  r.stop = get_stop(body);
  r.stream = get_bool(body, "stream", false);
  if (const json* v = field(body, "stream_options")) {
    if (!v->is_object()) throw wrong_type("stream_options", "an object", *v);
    if (!r.stream) throw bad_field("stream_options", "'stream_options' is only allowed with \"stream\": true");
    r.include_usage = get_bool(*v, "include_usage", false);
  }
  if (const json* v = field(body, "n"); v && get_int(*v, "n") != 1)
    throw bad_field("n", "'n' must be 1: one choice per prompt (send the prompt again for more samples)", "unsupported");
  if (const json* v = field(body, "best_of"); v && get_int(*v, "best_of") != 1)
    throw bad_field("best_of", "'best_of' must be 1", "unsupported");
  for (const char* penalty : {"presence_penalty", "frequency_penalty"})
    if (const json* v = field(body, penalty); v && get_number(*v, penalty) != 0)
      throw bad_field(penalty, fmt::format("'{}' is not supported (only 0)", penalty), "unsupported");
  if (const json* v = field(body, "logit_bias")) {
    if (!v->is_object()) throw wrong_type("logit_bias", "an object", *v);
    if (!v->empty()) throw bad_field("logit_bias", "'logit_bias' is not supported", "unsupported");
  }
  r.add_special_tokens = get_bool(body, "add_special_tokens", true);
}

void check_object(const json& body) {
  if (!body.is_object()) throw ApiError(400, fmt::format("the request body must be a JSON object, got {}", describe(body)),
                                        "invalid_request_error", "", "invalid_type");
}

}  // namespace

json parse_json_body(const std::string& body) {
  try {
    return parse_json_bounded(body, "the request body");
  } catch (const Error& e) {
    throw ApiError(400, e.what(), "invalid_request_error", "", "invalid_json");
  } catch (const json::parse_error& e) {
    throw ApiError(400, fmt::format("malformed JSON in the request body: {}", e.what()), "invalid_request_error", "",
                   "invalid_json");
  }
}

CompletionRequest parse_completion_request(const json& body) {
  check_object(body);
  CompletionRequest r;
  r.prompts = get_prompts(body);
  parse_common(body, r);
  r.echo = get_bool(body, "echo", false);
  if (const json* v = field(body, "logprobs")) {
    if (v->is_boolean()) throw wrong_type("logprobs", fmt::format("an integer from 0 to {}", kMaxLogprobs), *v);
    r.logprobs = get_int(*v, "logprobs");
    if (*r.logprobs < 0 || *r.logprobs > kMaxLogprobs)
      throw bad_field("logprobs", fmt::format("'logprobs' must be from 0 to {}, got {}", kMaxLogprobs, *r.logprobs));
  }
  if (const json* v = field(body, "suffix")) {
    if (!v->is_string()) throw wrong_type("suffix", "a string", *v);
    if (!v->get<std::string>().empty()) throw bad_field("suffix", "'suffix' is not supported", "unsupported");
  }
  return r;
}

CompletionRequest parse_chat_request(const json& body) {
  check_object(body);
  CompletionRequest r;
  r.chat = true;
  const json* msgs = field(body, "messages");
  if (!msgs) throw bad_field("messages", "'messages' is required", "missing_field");
  if (!msgs->is_array()) throw wrong_type("messages", "an array of messages", *msgs);
  if (msgs->empty()) throw bad_field("messages", "'messages' must not be empty");
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    const std::string name = fmt::format("messages[{}]", i);
    if (!m.is_object()) throw wrong_type(name, "an object with role and content", m);
    const json* role = field(m, "role");
    if (!role) throw bad_field(name + ".role", fmt::format("'{}.role' is required", name), "missing_field");
    if (!role->is_string()) throw wrong_type(name + ".role", "a string", *role);
    const json* content = field(m, "content");
    std::string text;
    if (!content) {
      throw bad_field(name + ".content", fmt::format("'{}.content' is required", name), "missing_field");
    } else if (content->is_string()) {
      text = content->get<std::string>();
    } else if (content->is_array()) {  // [{"type": "text", "text": "..."}, ...]
      for (size_t k = 0; k < content->size(); ++k) {
        const json& part = (*content)[k];
        const std::string pname = fmt::format("{}.content[{}]", name, k);
        if (!part.is_object()) throw wrong_type(pname, "an object {\"type\": \"text\", \"text\": ...}", part);
        const json* type = field(part, "type");
        if (!type || !type->is_string() || type->get<std::string>() != "text")
          throw bad_field(pname + ".type", fmt::format("'{}.type' must be \"text\" (only text is supported)", pname),
                          "unsupported");
        const json* t = field(part, "text");
        if (!t || !t->is_string()) throw wrong_type(pname + ".text", "a string", t ? *t : json());
        text += t->get<std::string>();
      }
    } else {
      throw wrong_type(name + ".content", "a string or an array of text parts", *content);
    }
    r.messages.push_back({role->get<std::string>(), std::move(text)});
  }
  parse_common(body, r);
  if (!r.max_tokens_given) r.max_tokens = -1;  // chat: up to the context (resolved by the completer)
  if (const json* v = field(body, "logprobs")) {
    if (!v->is_boolean()) throw wrong_type("logprobs", "a boolean", *v);
    if (v->get<bool>()) r.logprobs = 0;
  }
  if (const json* v = field(body, "top_logprobs")) {
    const int64_t n = get_int(*v, "top_logprobs");
    if (n < 0 || n > kMaxLogprobs)
      throw bad_field("top_logprobs", fmt::format("'top_logprobs' must be from 0 to {}, got {}", kMaxLogprobs, n));
    if (!r.logprobs) throw bad_field("top_logprobs", "'top_logprobs' needs \"logprobs\": true");
    r.logprobs = n;
  }
  return r;
}

}  // namespace moelab::serve
