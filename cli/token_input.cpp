#include "cli/token_input.hpp"

#include <fmt/format.h>

#include <climits>
#include <sstream>

#include "core/error.hpp"

namespace moelab::cli {

std::vector<int32_t> parse_token_list(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      const long v = std::stol(item, &used);
      if (used != item.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(item);
      ids.push_back(int32_t(v));
    } catch (const std::exception&) {
      throw Error(fmt::format("--token-ids: '{}' is not a token id (expected e.g. 1,415,2936)", item));
    }
  }
  if (ids.empty()) throw Error("--token-ids: no token ids given");
  return ids;
}

}  // namespace moelab::cli
