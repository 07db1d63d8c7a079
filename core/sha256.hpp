#pragma once
// SHA-256 of bytes / of a file's bytes, as 64 lowercase hex digits (Python's hashlib.sha256(...).hexdigest()).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moelab {

// Bytes fed in pieces (a file read in chunks), the digest at the end.
class Sha256 {
 public:
  void update(std::string_view bytes);
  std::string hex();  // the digest of everything fed; the object is spent afterwards

 private:
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char block_[64] = {};
  size_t in_block_ = 0;  // bytes waiting in block_
  uint64_t total_ = 0;   // bytes fed
};

std::string sha256_hex(std::string_view bytes);
// A regular file's bytes, read in chunks (never a FIFO or device: refused without blocking, as
// core/regular_file.hpp opens files); throws moelab::Error naming the file (`what` says what it is) when it
// cannot be read or changes size while being read.
std::string sha256_file(const std::string& path, const char* what = "file");

}  // namespace moelab
