#pragma once
// Python's own text forms of values, byte for byte, where lm-evaluation-harness writes or hashes them:
// float.__repr__, str() of a JSON scalar, and json.dumps(obj, indent=..., ensure_ascii=False). The
// harness hashes json.dumps(doc, indent=2) (doc_hash) and writes per-sample responses through str()
// (its sanitize_list), so matching these is what makes our hashes and files equal to its own.
#include <nlohmann/json.hpp>
#include <string>

namespace moelab::evals {

// repr(float): the shortest digits that round-trip; positional for decimal exponents -4..15
// ("0.0001", "1000000000000000.0"), else scientific ("1e-05", "1e+16"); "nan", "inf", "-inf".
std::string python_float_repr(double v);

// str(v) for a JSON scalar as Python holds it: strings as themselves, integers in decimal, floats by
// repr, booleans "True"/"False", null "None". Arrays and objects throw (never passed a container).
std::string python_str(const nlohmann::ordered_json& v);

// json.dumps(v, indent=indent, ensure_ascii=False) with Python's default separators: ", " and ": " on
// one line when indent < 0 (indent=None), "," and ": " with newlines and `indent` spaces per level
// otherwise. Keys keep the object's order; floats by repr ("NaN", "Infinity" as Python writes them).
std::string python_json_dumps(const nlohmann::ordered_json& v, int indent = -1);

}  // namespace moelab::evals
