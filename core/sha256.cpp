// SHA-256 (FIPS 180-4), written out here: a few dozen lines rather than a crypto library for hashes that
// identify files and records (a trace's tokenizer, lm-eval's doc/prompt/target hashes), not for security.
#include "core/sha256.hpp"

#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <vector>

#include "core/error.hpp"
#include "core/regular_file.hpp"

namespace moelab {

namespace {

constexpr std::array<uint32_t, 64> kRound = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
    0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
    0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
    0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void compress(uint32_t* h, const unsigned char* block) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = uint32_t(block[4 * i]) << 24 | uint32_t(block[4 * i + 1]) << 16 | uint32_t(block[4 * i + 2]) << 8 |
           uint32_t(block[4 * i + 3]);
  for (int i = 16; i < 64; ++i) {
    const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
  for (int i = 0; i < 64; ++i) {
    const uint32_t t1 = k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kRound[size_t(i)] + w[i];
    const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
  }
  h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

}  // namespace

void Sha256::update(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t n = bytes.size();
  total_ += n;
  if (in_block_ > 0) {
    const size_t take = std::min(n, sizeof block_ - in_block_);
    std::memcpy(block_ + in_block_, p, take);
    in_block_ += take, p += take, n -= take;
    if (in_block_ < sizeof block_) return;
    compress(h_, block_);
    in_block_ = 0;
  }
  for (; n >= 64; p += 64, n -= 64) compress(h_, p);
  std::memcpy(block_, p, n);
  in_block_ = n;
}

std::string Sha256::hex() {
  unsigned char tail[128] = {};
  std::memcpy(tail, block_, in_block_);
  tail[in_block_] = 0x80;
  const size_t tail_len = in_block_ + 9 <= 64 ? 64 : 128;
  const uint64_t bits = total_ * 8;
  for (int i = 0; i < 8; ++i) tail[tail_len - 1 - size_t(i)] = static_cast<unsigned char>(bits >> (8 * i));
  for (size_t at = 0; at < tail_len; at += 64) compress(h_, tail + at);
  std::string hex;
  for (uint32_t x : h_) hex += fmt::format("{:08x}", x);
  return hex;
}

std::string sha256_hex(std::string_view bytes) {
  Sha256 h;
  h.update(bytes);
  return h.hex();
}

std::string sha256_file(const std::string& path, const char* what) {
  // O_NONBLOCK open and fstat first (core/regular_file.hpp): a FIFO or /dev/zero named where a file is meant
  // would otherwise block or be read forever. The file is then read in chunks up to the size fstat gave.
  Sha256 h;
  uint64_t size = 0, done = 0;
  read_regular_file_chunks(
      path, what, size_t(1) << 20, [&](uint64_t s) { size = s; },
      [&](const char* data, size_t n) {
        done += uint64_t(n);
        if (done > size) throw Error(fmt::format("{}: {} grew past its {} bytes while being hashed", path, what, size));
        h.update(std::string_view(data, n));
      });
  if (done != size) throw Error(fmt::format("{}: {} shrank from {} to {} bytes while being hashed", path, what, size, done));
  return h.hex();
}

}  // namespace moelab
