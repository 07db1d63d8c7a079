#pragma once
// JSON from a user's file or request, parsed with a nesting limit. nlohmann's parser keeps its own stack and
// its destructor does not recurse, but dump, copy and comparison recurse once per level: a 2 MB document of
// brackets, harmless to parse, overflows the stack where it is later described in a message, copied or
// compared. Nothing this project reads nests more than a few levels, so a deeper document is refused while
// it is parsed, before any of that.
#include <fmt/format.h>

#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "core/error.hpp"

namespace moelab {

inline constexpr int kJsonNestingLimit = 64;

// Whether a parser callback event opens a container past `max_depth` levels.
template <class Json>
bool opens_past(int depth, typename Json::parse_event_t event, int max_depth) {
  return (event == Json::parse_event_t::object_start || event == Json::parse_event_t::array_start) &&
         depth >= max_depth;
}

// Json::parse(input) (any input nlohmann takes: a string, a string_view, a stream), throwing moelab::Error
// "WHERE: JSON nested more than MAX_DEPTH levels deep" for a deeper document; its own errors are as
// Json::parse's (a json::exception, or a discarded value when allow_exceptions is false).
template <class Json = nlohmann::json, class Input>
Json parse_json_bounded(Input&& input, const std::string& where, bool allow_exceptions = true,
                        int max_depth = kJsonNestingLimit) {
  const auto limit = [&](int depth, typename Json::parse_event_t event, Json&) {
    if (opens_past<Json>(depth, event, max_depth))
      throw Error(fmt::format("{}: JSON nested more than {} levels deep", where, max_depth));
    return true;
  };
  return Json::parse(std::forward<Input>(input), limit, allow_exceptions);
}

}  // namespace moelab
