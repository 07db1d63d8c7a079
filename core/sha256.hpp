#pragma once
// SHA-256 of bytes / of a file's bytes, as 64 lowercase hex digits (Python's hashlib.sha256(...).hexdigest()).
#include <string>
#include <string_view>

namespace moelab {

std::string sha256_hex(std::string_view bytes);
std::string sha256_file(const std::string& path);  // throws moelab::Error naming the file when it cannot be read

}  // namespace moelab
