#include "evals/python_format.hpp"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <cstdlib>

#include "core/error.hpp"

namespace moelab::evals {

using nlohmann::ordered_json;

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  // Shortest round-trip digits in scientific form ("-1.2345e-07"), then laid out by Python's rule
  // (Python/pystrtod.c, format code 'r': positional when -4 <= exponent < 16).
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);
  const size_t e_at = sci.find('e');
  const bool negative = sci[0] == '-';
  std::string digits;
  for (size_t i = negative ? 1 : 0; i < e_at; ++i)
    if (sci[i] != '.') digits += sci[i];
  const int exp10 = std::atoi(sci.c_str() + e_at + 1);
  std::string out = negative ? "-" : "";
  if (exp10 < -4 || exp10 >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += fmt::format("e{}{:02}", exp10 < 0 ? '-' : '+', std::abs(exp10));
    return out;
  }
  if (exp10 < 0) return out + "0." + std::string(size_t(-exp10 - 1), '0') + digits;
  const size_t int_digits = size_t(exp10) + 1;
  if (digits.size() <= int_digits) return out + digits + std::string(int_digits - digits.size(), '0') + ".0";
  return out + digits.substr(0, int_digits) + "." + digits.substr(int_digits);
}

std::string python_str(const ordered_json& v) {
  switch (v.type()) {
    case ordered_json::value_t::string: return v.get_ref<const std::string&>();
    case ordered_json::value_t::boolean: return v.get<bool>() ? "True" : "False";
    case ordered_json::value_t::null: return "None";
    case ordered_json::value_t::number_integer: return std::to_string(v.get<int64_t>());
    case ordered_json::value_t::number_unsigned: return std::to_string(v.get<uint64_t>());
    case ordered_json::value_t::number_float: return python_float_repr(v.get<double>());
    default: throw Error(fmt::format("python_str: a {} is not a scalar", v.type_name()));
  }
}

namespace {

// json.encoder's py_encode_basestring: '"', '\\' and control characters escaped, all else as is.
void append_quoted(std::string& out, const std::string& s) {
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) out += fmt::format("\\u{:04x}", unsigned(c));
        else out += ch;
    }
  }
  out += '"';
}

void dump(std::string& out, const ordered_json& v, int indent, int level) {
  const bool multiline = indent >= 0;
  auto newline = [&](int lvl) {
    out += '\n';
    out.append(size_t(indent) * size_t(lvl), ' ');
  };
  const char* item_sep = multiline ? "," : ", ";
  switch (v.type()) {
    case ordered_json::value_t::object: {
      if (v.empty()) { out += "{}"; return; }
      out += '{';
      bool first = true;
      for (const auto& [k, x] : v.items()) {
        if (!first) out += item_sep;
        first = false;
        if (multiline) newline(level + 1);
        append_quoted(out, k);
        out += ": ";
        dump(out, x, indent, level + 1);
      }
      if (multiline) newline(level);
      out += '}';
      return;
    }
    case ordered_json::value_t::array: {
      if (v.empty()) { out += "[]"; return; }
      out += '[';
      bool first = true;
      for (const auto& x : v) {
        if (!first) out += item_sep;
        first = false;
        if (multiline) newline(level + 1);
        dump(out, x, indent, level + 1);
      }
      if (multiline) newline(level);
      out += ']';
      return;
    }
    case ordered_json::value_t::string: append_quoted(out, v.get_ref<const std::string&>()); return;
    case ordered_json::value_t::boolean: out += v.get<bool>() ? "true" : "false"; return;
    case ordered_json::value_t::null:
    case ordered_json::value_t::discarded: out += "null"; return;
    case ordered_json::value_t::number_float: {
      const double d = v.get<double>();
      // json.encoder's floatstr: NaN and the infinities as JavaScript spells them, else float.__repr__.
      out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity") : python_float_repr(d);
      return;
    }
    default: out += python_str(v); return;  // integers
  }
}

}  // namespace

std::string python_json_dumps(const ordered_json& v, int indent) {
  std::string out;
  dump(out, v, indent, 0);
  return out;
}

}  // namespace moelab::evals
