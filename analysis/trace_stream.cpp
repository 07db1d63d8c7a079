// Streaming reads of a routing trace (analysis/trace_stream.hpp): the checks of read_trace, then rows on demand.
#include "analysis/trace_stream.hpp"

#include <fmt/format.h>

#include "analysis/trace_h5.hpp"
#include "core/error.hpp"

namespace moelab::analysis {

using namespace h5;

struct TraceStream::Impl {
  H5Context cx;
  Id file, experts, guess;
  int layers = 0, k = 0, e = 0;
  std::vector<int64_t> offsets;
  nlohmann::json attrs;
};

TraceStream::TraceStream(const std::string& path) : impl_(std::make_unique<Impl>()) {
  setup();
  Impl& m = *impl_;
  m.cx.path = path;
  const H5Context& cx = m.cx;
  m.file = open_for_reading(cx);
  m.attrs = read_all_attrs(cx, m.file);
  m.experts = open_row_dataset(cx, m.file, kExperts);
  const Id offsets = open_row_dataset(cx, m.file, kOffsets);
  const auto ed = dims_of(cx, m.experts, kExperts, 3);
  const auto num_experts = read_int_attr(cx, m.file, "num_experts");
  if (!num_experts) throw Error(fmt::format("{}: not a moelab trace (no num_experts attribute)", path));
  if (ed[1] < 1 || ed[1] > 65536 || ed[2] < 1 || *num_experts < 1 || *num_experts > 256 || int64_t(ed[2]) > *num_experts)
    throw Error(fmt::format("{}: not a usable trace: {} layers, top-k {}, {} experts", path, ed[1], ed[2], *num_experts));
  m.layers = int(ed[1]);
  m.k = int(ed[2]);
  m.e = int(*num_experts);
  for (const auto& [attr, value] : {std::pair{"num_layers", m.layers}, std::pair{"top_k", m.k}})
    if (const auto v = read_int_attr(cx, m.file, attr); v && *v != value)
      cx.damaged(fmt::format("the {} attribute is {}, but /experts has {}", attr, *v, value));
  const auto od = dims_of(cx, offsets, kOffsets, 1);
  if (od[0] < 1) throw Error(fmt::format("{}: /{} must have at least one entry", path, kOffsets));
  m.offsets = read_rows<int64_t>(cx, offsets, kOffsets, H5T_NATIVE_INT64, int64_t(od[0]), 1);
  if (m.offsets[0] != 0) throw Error(fmt::format("{}: /sequence_offsets must start at 0", path));
  for (size_t s = 1; s < m.offsets.size(); ++s)
    if (m.offsets[s] < m.offsets[s - 1]) throw Error(fmt::format("{}: /sequence_offsets decreases at entry {}", path, s));
  // A flush writes the rows before the offsets: fewer rows than the last offset is damage, not a crash.
  if (int64_t(ed[0]) < m.offsets.back())
    cx.damaged(fmt::format("/{} has {} rows, fewer than /sequence_offsets says ({})", kExperts, ed[0], m.offsets.back()));
  check_read_size(cx, m.experts, kExperts, uint64_t(m.offsets.back()) * uint64_t(m.layers) * uint64_t(m.k));
  if (H5Lexists(m.file, kGuess, H5P_DEFAULT) > 0) {
    m.guess = open_row_dataset(cx, m.file, kGuess);
    const auto gd = dims_of(cx, m.guess, kGuess, 3);
    if (gd[1] != ed[1] || gd[2] != ed[2])
      throw Error(fmt::format("{}: /{} must have the shape of /experts, [N, {}, {}]", path, kGuess, ed[1], ed[2]));
    if (int64_t(gd[0]) < m.offsets.back())
      cx.damaged(fmt::format("/{} has {} rows, fewer than /sequence_offsets says ({})", kGuess, gd[0], m.offsets.back()));
    check_read_size(cx, m.guess, kGuess, uint64_t(m.offsets.back()) * uint64_t(m.layers) * uint64_t(m.k));
  }
}

TraceStream::~TraceStream() = default;

const std::string& TraceStream::path() const { return impl_->cx.path; }
int TraceStream::num_layers() const { return impl_->layers; }
int TraceStream::top_k() const { return impl_->k; }
int TraceStream::num_experts() const { return impl_->e; }
int64_t TraceStream::num_tokens() const { return impl_->offsets.back(); }
int64_t TraceStream::num_sequences() const { return int64_t(impl_->offsets.size()) - 1; }
const std::vector<int64_t>& TraceStream::sequence_offsets() const { return impl_->offsets; }
const nlohmann::json& TraceStream::attributes() const { return impl_->attrs; }
bool TraceStream::has_prefetch_guess() const { return impl_->guess.valid(); }

void TraceStream::read_prefetch_guess(int64_t first, int64_t n, std::vector<uint8_t>& out) const {
  const Impl& m = *impl_;
  if (!m.guess.valid()) throw Error(fmt::format("{}: the trace has no /{} (trace with --record-prefetch-guess)", m.cx.path, kGuess));
  if (first < 0 || n < 0 || first + n > num_tokens())
    throw Error(fmt::format("{}: rows {}..{} are outside the trace's {} tokens", m.cx.path, first, first + n - 1, num_tokens()));
  const size_t lk = size_t(m.layers) * size_t(m.k);
  out.resize(size_t(n) * lk);
  read_row_range(m.cx, m.guess, kGuess, H5T_NATIVE_UINT8, 1, first, n, lk, out.data());
  for (size_t i = 0; i < out.size(); ++i)
    if (out[i] >= m.e && out[i] != kNoGuess)
      throw Error(fmt::format("{}: /{}: token {} layer {}: expert id {} >= num_experts {}", m.cx.path, kGuess,
                              first + int64_t(i / lk), i / size_t(m.k) % size_t(m.layers), int(out[i]), m.e));
}

void TraceStream::read_experts(int64_t first, int64_t n, std::vector<uint8_t>& out) const {
  const Impl& m = *impl_;
  if (first < 0 || n < 0 || first + n > num_tokens())
    throw Error(fmt::format("{}: rows {}..{} are outside the trace's {} tokens", m.cx.path, first, first + n - 1, num_tokens()));
  const size_t lk = size_t(m.layers) * size_t(m.k);
  out.resize(size_t(n) * lk);
  read_row_range(m.cx, m.experts, kExperts, H5T_NATIVE_UINT8, 1, first, n, lk, out.data());
  for (int64_t i = 0; i < n * m.layers; ++i) {
    const uint8_t* row = &out[size_t(i) * size_t(m.k)];
    for (int j = 0; j < m.k; ++j) {
      if (row[j] >= m.e)
        throw Error(fmt::format("{}: token {} layer {}: expert id {} >= num_experts {}", m.cx.path, first + i / m.layers,
                                i % m.layers, int(row[j]), m.e));
      for (int j2 = 0; j2 < j; ++j2)
        if (row[j2] == row[j])
          throw Error(fmt::format("{}: token {} layer {}: expert {} chosen twice", m.cx.path, first + i / m.layers,
                                  i % m.layers, int(row[j])));
    }
  }
}

}  // namespace moelab::analysis
