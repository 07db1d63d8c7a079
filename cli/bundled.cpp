#include "cli/bundled.hpp"

#include <filesystem>

namespace moelab::cli {

namespace fs = std::filesystem;

// Where the files that ship with moelab are: <prefix>/share/moelab when this binary was installed
// (`cmake --install`: <prefix>/bin/moelab), else the source tree this build came from.
const fs::path& bundled_root() {
  static const fs::path root = [] {
    std::error_code ec;
    const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    if (!ec) {
      const fs::path share = exe.parent_path().parent_path() / "share" / "moelab";
      if (fs::exists(share / "models" / "default" / "config.json", ec)) return share;
    }
#ifdef MOELAB_DEFAULT_MODEL
    // <repo>/models/default -> <repo> (lexically: models/default is a symlink, so ".." would follow it).
    return fs::path(MOELAB_DEFAULT_MODEL).parent_path().parent_path();
#else
    return fs::path(".");
#endif
  }();
  return root;
}

std::string bundled_path(const std::string& rel) { return (bundled_root() / rel).string(); }

}  // namespace moelab::cli
