#pragma once
// Which source tree this moelab binary was built from (generated at build time by
// cmake/write_build_info.cmake).

namespace moelab::cli {

// `git describe --always --dirty` of the source tree at build time ("" when it was not a git checkout).
const char* build_git_hash();

}  // namespace moelab::cli
