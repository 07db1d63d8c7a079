#pragma once
// Reading a routing trace (analysis/trace.hpp) a block of rows at a time, for tools whose memory must not
// grow with the trace (the cache simulator, analysis/cachesim.hpp). The file is opened and checked once,
// as read_trace checks it (every dataset's rank and type, shapes against each other and the stored bytes,
// the committed extent from /sequence_offsets); rows are then read on demand and checked as they come
// (expert ids below num_experts, distinct within a token's top-k). Memory: the sequence offsets (one
// int64 per sequence) and whatever block the caller asks for.
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moelab::analysis {

class TraceStream {
 public:
  // Opens and checks `path`. Throws moelab::Error naming the file when it is not a readable trace: not
  // HDF5, truncated, no /experts or /sequence_offsets, no num_experts, inconsistent shapes.
  explicit TraceStream(const std::string& path);
  ~TraceStream();
  TraceStream(const TraceStream&) = delete;
  TraceStream& operator=(const TraceStream&) = delete;

  const std::string& path() const;
  int num_layers() const;
  int top_k() const;
  int num_experts() const;
  int64_t num_tokens() const;     // committed rows (up to the last sequence offset)
  int64_t num_sequences() const;
  const std::vector<int64_t>& sequence_offsets() const;  // [S + 1], from 0 to num_tokens()
  const nlohmann::json& attributes() const;              // the root attributes (model_config parsed)

  // The experts of tokens [first, first + n), row-major [n, L, k], into `out` (resized). Throws
  // moelab::Error naming the file and the token for an expert id >= num_experts or one chosen twice in a
  // token's top-k, and for rows HDF5 cannot read.
  void read_experts(int64_t first, int64_t n, std::vector<uint8_t>& out) const;
  // The optional /prefetch_guess (analysis/trace.hpp), read and checked (ids below num_experts, or 255) like
  // read_experts; throws when the trace has none.
  bool has_prefetch_guess() const;
  void read_prefetch_guess(int64_t first, int64_t n, std::vector<uint8_t>& out) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moelab::analysis
