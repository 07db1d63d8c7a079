// Reading routing traces, and repairing those a writer left open or damaged (analysis/trace.hpp).
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "analysis/trace.hpp"
#include "analysis/trace_h5.hpp"
#include "core/error.hpp"

namespace moelab::analysis {

using namespace h5;

namespace {

// What reading a trace file found.
struct ReadOutcome {
  TraceData trace;
  int64_t rows_in_file = 0;  // rows of the longest row dataset (committed or not)
  bool complete = true;      // every committed row was readable
};

// Reads a trace: the committed rows (up to the last sequence offset). With `salvage`, unreadable chunks
// end the read instead of failing it, and the trace keeps the sequences read in full.
ReadOutcome read_trace_file(const std::string& path, bool salvage) {
  setup();
  const H5Context cx{path};
  const Id file = open_for_reading(cx);
  ReadOutcome r;
  TraceData& tr = r.trace;
  tr.attributes = read_all_attrs(cx, file);

  const Id tokens = open_row_dataset(cx, file, kTokens), offsets = open_row_dataset(cx, file, kOffsets),
             domain = open_row_dataset(cx, file, kDomain), experts = open_row_dataset(cx, file, kExperts),
             gates = open_row_dataset(cx, file, kGates);
  const bool has_logits = H5Lexists(file, kLogits, H5P_DEFAULT) > 0;
  const Id logits = has_logits ? open_row_dataset(cx, file, kLogits) : Id();
  const bool has_guess = H5Lexists(file, kGuess, H5P_DEFAULT) > 0;
  const Id guess = has_guess ? open_row_dataset(cx, file, kGuess) : Id();

  // Shapes: [N, L, k] from /experts; E from the attribute (or /router_logits).
  const auto ed = dims_of(cx, experts, kExperts), gd = dims_of(cx, gates, kGates);
  // (Row counts may differ: a writer that died mid-flush extended some datasets and not others.)
  if (ed.size() != 3 || gd.size() != 3 || gd[1] != ed[1] || gd[2] != ed[2])
    throw Error(fmt::format("{}: /experts and /gates must both have shape [N, L, k]", path));
  if (has_guess) {
    const auto pd = dims_of(cx, guess, kGuess);
    if (pd.size() != 3 || pd[1] != ed[1] || pd[2] != ed[2])
      throw Error(fmt::format("{}: /{} must have the shape of /experts, [N, L, k]", path, kGuess));
  }
  tr.num_layers = int(ed[1]);
  tr.top_k = int(ed[2]);
  const auto ld = has_logits ? dims_of(cx, logits, kLogits) : std::vector<hsize_t>{};
  if (has_logits && (ld.size() != 3 || ld[1] != ed[1]))
    throw Error(fmt::format("{}: /router_logits must have shape [N, {}, E]", path, ed[1]));
  const auto num_experts = read_int_attr(cx, file, "num_experts");
  if (num_experts) tr.num_experts = int(std::clamp<int64_t>(*num_experts, -1, 1 << 20));
  else if (has_logits) tr.num_experts = int(ld[2]);
  else throw Error(fmt::format("{}: no num_experts attribute", path));
  if (has_logits && int64_t(ld[2]) != tr.num_experts)
    throw Error(fmt::format("{}: /router_logits has {} experts, the num_experts attribute {}", path, ld[2], tr.num_experts));
  if (ed[1] < 1 || ed[1] > 65536 || ed[2] < 1 || tr.num_experts < 1 || tr.num_experts > 256 ||
      int64_t(ed[2]) > tr.num_experts)
    throw Error(fmt::format("{}: not a usable trace: {} layers, top-k {}, {} experts", path, ed[1], ed[2],
                            num_experts.value_or(tr.num_experts)));
  for (const auto& [attr, value] : {std::pair{"num_layers", tr.num_layers}, std::pair{"top_k", tr.top_k}})
    if (const auto v = read_int_attr(cx, file, attr); v && *v != value)
      cx.damaged(fmt::format("the {} attribute is {}, but /experts has {}", attr, *v, value));
  for (auto [dset, name] : {std::pair{hid_t(tokens), kTokens}, std::pair{hid_t(experts), kExperts},
                            std::pair{hid_t(gates), kGates}, std::pair{hid_t(logits), kLogits},
                            std::pair{hid_t(guess), kGuess}})
    if (dset >= 0) r.rows_in_file = std::max(r.rows_in_file, int64_t(dims_of(cx, dset, name)[0]));

  // Only committed rows: everything up to the last sequence offset.
  const auto offsets_dims = dims_of(cx, offsets, kOffsets);
  if (offsets_dims.size() != 1 || offsets_dims[0] < 1)
    throw Error(fmt::format("{}: /{} must be 1-D with at least one entry", path, kOffsets));
  tr.sequence_offsets = read_rows<int64_t>(cx, offsets, kOffsets, H5T_NATIVE_INT64, int64_t(offsets_dims[0]), 1, salvage);
  if (tr.sequence_offsets.empty()) tr.sequence_offsets = {0};
  if (tr.sequence_offsets[0] != 0) throw Error(fmt::format("{}: /sequence_offsets must start at 0", path));
  for (size_t s = 1; s < tr.sequence_offsets.size(); ++s)
    if (tr.sequence_offsets[s] < tr.sequence_offsets[s - 1])
      throw Error(fmt::format("{}: /sequence_offsets decreases at entry {}", path, s));
  const Committed c{int64_t(tr.sequence_offsets.size()) - 1, tr.sequence_offsets.back()};
  if (!salvage)
    check_rows_cover(cx, c, {{tokens, kTokens}, {experts, kExperts}, {gates, kGates}, {logits, kLogits}, {guess, kGuess}},
                     domain);

  const size_t lk = size_t(tr.num_layers) * size_t(tr.top_k), le = size_t(tr.num_layers) * size_t(tr.num_experts);
  const auto rows_of = [&](hid_t dset, const char* name) {  // salvaging, a short dataset is simply short
    return std::min<int64_t>(c.tokens, int64_t(dims_of(cx, dset, name)[0]));
  };
  tr.sequence_domain = read_rows<int32_t>(cx, domain, kDomain, H5T_NATIVE_INT32,
                                          std::min<int64_t>(c.sequences, int64_t(dims_of(cx, domain, kDomain)[0])), 1, salvage);
  tr.tokens = read_rows<int32_t>(cx, tokens, kTokens, H5T_NATIVE_INT32, rows_of(tokens, kTokens), 1, salvage);
  tr.experts = read_rows<uint8_t>(cx, experts, kExperts, H5T_NATIVE_UINT8, rows_of(experts, kExperts), lk, salvage);
  tr.gates = read_rows<float>(cx, gates, kGates, H5T_NATIVE_FLOAT, rows_of(gates, kGates), lk, salvage);
  if (has_logits) {
    const Id half = half_type();
    const auto raw = read_rows<uint16_t>(cx, logits, kLogits, half, rows_of(logits, kLogits), le, salvage);
    tr.router_logits.resize(raw.size());
    std::transform(raw.begin(), raw.end(), tr.router_logits.begin(), half_to_float);
  }
  if (has_guess) tr.prefetch_guess = read_rows<uint8_t>(cx, guess, kGuess, H5T_NATIVE_UINT8, rows_of(guess, kGuess), lk, salvage);
  if (H5Aexists(domain, "domain_names") > 0) tr.domain_names = read_strings(cx, domain, "domain_names");

  if (salvage) {  // keep the sequences whose every row was read
    int64_t rows = int64_t(tr.tokens.size());
    rows = std::min(rows, int64_t(tr.experts.size() / lk));
    rows = std::min(rows, int64_t(tr.gates.size() / lk));
    if (has_logits) rows = std::min(rows, int64_t(tr.router_logits.size() / le));
    if (has_guess) rows = std::min(rows, int64_t(tr.prefetch_guess.size() / lk));
    int64_t s = std::min<int64_t>(c.sequences, int64_t(tr.sequence_domain.size()));
    while (tr.sequence_offsets[size_t(s)] > rows) --s;
    r.complete = s == c.sequences && int64_t(offsets_dims[0]) == c.sequences + 1;
    const auto n = size_t(tr.sequence_offsets[size_t(s)]);
    tr.sequence_offsets.resize(size_t(s) + 1);
    tr.sequence_domain.resize(size_t(s));
    tr.tokens.resize(n);
    tr.experts.resize(n * lk);
    tr.gates.resize(n * lk);
    if (has_logits) tr.router_logits.resize(n * le);
    if (has_guess) tr.prefetch_guess.resize(n * lk);
  }
  for (int32_t d : tr.sequence_domain)
    if (d < -1 || d >= int32_t(tr.domain_names.size()))
      throw Error(fmt::format("{}: /sequence_domain holds {}, but there are {} domain names", path, d, tr.domain_names.size()));
  return r;
}

std::string string_attr(const nlohmann::json& attrs, const char* key) {
  const auto it = attrs.find(key);
  if (it == attrs.end()) return "";
  return it->is_string() ? it->get<std::string>() : it->dump();
}

// Writes `trace` as a fresh file at `path` (through a temporary file and a rename), keeping its
// attributes: the salvage half of a repair.
void rewrite_trace(const std::string& path, const TraceData& trace) {
  const std::string tmp = path + ".repair.tmp";
  ::unlink(tmp.c_str());
  const auto& attrs = trace.attributes;
  TraceHeader h;
  h.model_config = attrs.value("model_config", nlohmann::json::object());
  h.num_layers = trace.num_layers;
  h.top_k = trace.top_k;
  h.num_experts = trace.num_experts;
  h.engine = string_attr(attrs, "engine");
  h.model_path = string_attr(attrs, "model_path");
  h.tokenizer_sha256 = string_attr(attrs, "tokenizer_sha256");
  h.tool_version = string_attr(attrs, "tool_version");
  h.window = attrs.value("window", 0);
  h.router_logits = trace.has_router_logits();
  h.prefetch_guess = trace.has_prefetch_guess();
  h.domain_names = trace.domain_names;
  try {
    {
      TraceWriter w(tmp, h);
      const size_t lk = size_t(h.num_layers) * size_t(h.top_k), le = size_t(h.num_layers) * size_t(h.num_experts);
      for (int64_t s = 0; s < trace.num_sequences(); ++s) {
        const auto a = size_t(trace.sequence_offsets[size_t(s)]), n = size_t(trace.sequence_offsets[size_t(s) + 1]) - a;
        if (n == 0) continue;
        w.add_sequence(trace.sequence_domain[size_t(s)], {trace.tokens.data() + a, n},
                       {trace.experts.data() + a * lk, n * lk}, {trace.gates.data() + a * lk, n * lk},
                       h.router_logits ? std::span<const float>(trace.router_logits.data() + a * le, n * le)
                                       : std::span<const float>(),
                       h.prefetch_guess ? std::span<const uint8_t>(trace.prefetch_guess.data() + a * lk, n * lk)
                                        : std::span<const uint8_t>());
      }
      w.close();
    }
    // The writer stamped this moment and one run; the trace's own history is the original's.
    setup();
    const H5Context cx{tmp};
    const Id file(cx.id(H5Fopen(tmp.c_str(), H5F_ACC_RDWR, H5P_DEFAULT), "cannot reopen"));
    for (const char* key : {"created", "runs", "engine", "tool_version", "inputs"})
      if (attrs.contains(key)) write_string_attr(cx, file, key, string_attr(attrs, key));
    // A trace from before inputs were recorded does not claim to know them.
    if (!attrs.contains("inputs")) cx.ok(H5Adelete(file, "inputs"), "cannot write attribute inputs");
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw Error(fmt::format("{}: cannot replace it with the repaired copy ({})", path, std::strerror(err)));
  }
}

}  // namespace

// repair_trace for a caller that holds the writer lock.
int64_t h5::repair_locked(const std::string& path) {
  const bool marked = left_by_dead_writer_quietly(path);
  const auto r = read_trace_file(path, /*salvage=*/true);
  const int64_t dropped = r.rows_in_file - r.trace.num_tokens();
  if (!marked && r.complete && dropped == 0) return 0;  // nothing to repair
  rewrite_trace(path, r.trace);
  return dropped;
}

TraceData read_trace(const std::string& path) { return read_trace_file(path, /*salvage=*/false).trace; }

int64_t repair_trace(const std::string& path) {
  if (::access(path.c_str(), W_OK) != 0) throw Error(fmt::format("{}: cannot open for writing ({})", path, std::strerror(errno)));
  WriterLock lock(path);
  return repair_locked(path);
}

}  // namespace moelab::analysis
