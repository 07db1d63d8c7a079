#pragma once
// --tokens 1,2,3 / --text "..." handling shared by forward, diff and profile.
#include <cstdint>
#include <string>
#include <vector>

namespace moelab::cli {

// Parses "1,415,2936"; throws moelab::Error naming the bad item.
std::vector<int32_t> parse_token_list(const std::string& text);

}  // namespace moelab::cli
