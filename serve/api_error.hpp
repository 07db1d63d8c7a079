#pragma once
// An error a client caused (or the server's state: full queue, shutting down), answered as OpenAI answers
// one: an HTTP status and {"error": {"message", "type", "param", "code"}}.
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

namespace moelab::serve {

struct ApiError : std::runtime_error {
  int status;
  std::string type;   // invalid_request_error, authentication_error, rate_limit_error, server_error, ...
  std::string param;  // the request field at fault; empty: null
  std::string code;   // a short machine-readable reason; empty: null

  ApiError(int status_, std::string message, std::string type_, std::string param_ = {}, std::string code_ = {})
      : std::runtime_error(std::move(message)),
        status(status_),
        type(std::move(type_)),
        param(std::move(param_)),
        code(std::move(code_)) {}

  nlohmann::ordered_json body() const { return error_body(what(), type, param, code); }

  static nlohmann::ordered_json error_body(const std::string& message, const std::string& type, const std::string& param,
                                   const std::string& code) {
    nlohmann::ordered_json e{{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
    if (!param.empty()) e["param"] = param;
    if (!code.empty()) e["code"] = code;
    return {{"error", e}};
  }
};

// A request field that is missing, of the wrong type or out of range: 400 naming the field.
inline ApiError bad_field(const std::string& param, const std::string& message, const std::string& code = "invalid_value") {
  return ApiError(400, message, "invalid_request_error", param, code);
}

}  // namespace moelab::serve
