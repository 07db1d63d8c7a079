#include "cli/bundled.hpp"

#include <filesystem>

namespace moelab::cli {

std::string bundled_path(const std::string& rel) {
#ifdef MOELAB_DEFAULT_MODEL
  // <repo>/models/default -> <repo> (lexically: models/default is a symlink, so ".." would follow it).
  const std::filesystem::path repo = std::filesystem::path(MOELAB_DEFAULT_MODEL).parent_path().parent_path();
  return (repo / rel).string();
#else
  return rel;
#endif
}

}  // namespace moelab::cli
