#pragma once
// The output folder of a command that writes a checkpoint (quantize, merge): named without a trailing
// slash, and written through a fresh sibling folder that is renamed into place only when complete, so a
// reader never sees a half-written checkpoint and a failed run leaves nothing behind.
#include <filesystem>
#include <string>

namespace moelab::cli {

// --output as an absolute folder path, without a trailing slash ("q/" names the folder q). `command` is
// for the message when it is empty ("quantize: give --output FOLDER").
std::filesystem::path output_folder(const std::string& out, const std::string& command);

// A fresh folder beside `out` ("<parent>/.<name>.tmp-XXXXXX") to write the new checkpoint into; creates
// `out`'s parent when missing.
std::filesystem::path make_temp_sibling(const std::filesystem::path& out);

}  // namespace moelab::cli
