#include "cli/output_folder.hpp"

#include <fmt/format.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "core/error.hpp"

namespace moelab::cli {

namespace fs = std::filesystem;

// --output, without a trailing slash ("q/" names the folder q).
fs::path output_folder(const std::string& out, const std::string& command) {
  if (out.empty()) throw Error(fmt::format("{}: give --output FOLDER", command));
  std::error_code ec;
  fs::path p = fs::absolute(out, ec).lexically_normal();
  if (ec) throw Error(fmt::format("{}: cannot use as --output ({})", out, ec.message()));
  if (p.filename().empty()) p = p.parent_path();
  if (p.filename().empty() || p == p.root_path()) throw Error(fmt::format("{}: --output must name a folder", out));
  return p;
}

// A fresh folder beside `out` ("<parent>/.<name>.tmp-XXXXXX") for the new checkpoint.
fs::path make_temp_sibling(const fs::path& out) {
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw Error(fmt::format("{}: cannot create the output folder's parent {} ({})", out.string(), parent.string(),
                                  ec.message()));
  std::string tmpl = (parent / ("." + out.filename().string() + ".tmp-XXXXXX")).string();
  if (!::mkdtemp(tmpl.data()))
    throw Error(fmt::format("{}: cannot create a folder in {} to write into ({})", out.string(), parent.string(),
                            std::strerror(errno)));
  // mkdtemp makes it 0700; a checkpoint folder gets the usual permissions.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::chmod(tmpl.c_str(), 0777 & ~mask);
  return tmpl;
}

}  // namespace moelab::cli
