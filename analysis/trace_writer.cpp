// TraceWriter: creating and appending to routing traces, crash-safely (analysis/trace.hpp).
#include <fmt/format.h>
#include <hdf5_hl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <set>

#include "analysis/trace.hpp"
#include "analysis/trace_h5.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"

namespace moelab::analysis {

using namespace h5;

namespace {

// Shrinks every row dataset to the committed rows; returns the token rows dropped.
int64_t drop_rows_past(const H5Context& cx, const Committed& c, std::initializer_list<std::pair<hid_t, const char*>> row_sets,
                       hid_t domain) {
  check_rows_cover(cx, c, row_sets, domain);
  const int64_t rows = int64_t(dims_of(cx, row_sets.begin()->first, row_sets.begin()->second)[0]);
  for (auto [dset, name] : row_sets)
    if (dset >= 0) shrink_rows(cx, dset, name, c.tokens);
  shrink_rows(cx, domain, kDomain, c.sequences);
  return rows - c.tokens;
}

// The config compared between runs: config.json without the volatile fields.
nlohmann::json stable_config(const nlohmann::json& config) {
  nlohmann::json j = config.is_object() ? config : nlohmann::json::object();
  for (auto it = j.begin(); it != j.end();)
    it = is_volatile_config_field(it.key()) ? j.erase(it) : std::next(it);
  return j;
}

// The first key whose value differs between two configs, for the refusal message.
std::string first_difference(const nlohmann::json& in_file, const nlohmann::json& ours) {
  std::set<std::string> keys;
  for (auto it = in_file.begin(); it != in_file.end(); ++it) keys.insert(it.key());
  for (auto it = ours.begin(); it != ours.end(); ++it) keys.insert(it.key());
  for (const auto& k : keys) {
    const auto a = in_file.contains(k) ? in_file[k].dump() : "absent";
    const auto b = ours.contains(k) ? ours[k].dump() : "absent";
    if (a != b) return fmt::format("'{}' is {} in the file, {} here", k, a, b);
  }
  return "";
}

// What each dataset is, for its `description` attribute, and the names of its axes (analysis/trace.hpp).
struct DatasetDoc {
  const char* name;
  const char* description;
  std::vector<const char*> axes;
};

const std::vector<DatasetDoc>& dataset_docs() {
  static const std::vector<DatasetDoc> docs = {
      {kTokens,
       "Token id (index into the model tokenizer's vocabulary) of every traced token, sequences one after another; "
       "shape [token].",
       {"token"}},
      {kOffsets,
       "Where each sequence starts on the token axis, then the total token count: sequence s is tokens "
       "[offsets[s], offsets[s+1]); shape [sequence_boundary], sequences + 1 entries.",
       {"sequence_boundary"}},
      {kDomain,
       "Domain of each sequence, as an index into this dataset's domain_names attribute (-1: unlabeled); shape "
       "[sequence].",
       {"sequence"}},
      {kExperts,
       "Experts the router chose for each token at each MoE layer (expert index 0 to E-1), highest router "
       "probability first; shape [token, layer, rank].",
       {"token", "layer", "rank"}},
      {kGates,
       "Gate weight of each chosen expert (its router softmax probability renormalized over the chosen top-k, so "
       "each token's weights sum to 1 per layer; unitless); shape [token, layer, rank].",
       {"token", "layer", "rank"}},
      {kLogits,
       "Router logit of every expert for each token at each MoE layer, before the softmax (unitless; float16, "
       "rounded to nearest even from float32); shape [token, layer, expert].",
       {"token", "layer", "expert"}},
      {kGuess,
       "Prefetch guess for each token at each MoE layer: the experts layer l's router ranks highest when applied to "
       "layer l-1's output hidden state after layer l's post-attention RMSNorm (what a prefetcher knows one layer "
       "early), highest logit first; 255 at layer 0, which nothing precedes; shape [token, layer, rank].",
       {"token", "layer", "rank"}},
      {"layer", "Dimension scale of the layer axes: MoE layer index 0 to L-1, in decoder order; shape [layer].",
       {"layer"}},
      {"rank", "Dimension scale of the rank axes: 0 is the chosen expert with the highest router probability; shape "
               "[rank].",
       {"rank"}},
      {"expert", "Dimension scale of the expert axis of router_logits: expert index 0 to E-1 within a layer; shape "
                 "[expert].",
       {"expert"}},
  };
  return docs;
}

const DatasetDoc& doc_of(const std::string& name) {
  for (const auto& d : dataset_docs())
    if (name == d.name) return d;
  throw Error("trace: no documentation for /" + name);  // (a programming error)
}

std::string join_json(const std::vector<std::string>& v) { return nlohmann::json(v).dump(); }


// Paged file-space aggregation: every metadata block smaller than a 4 KiB page lies inside one page.
// A process killed during write() stops between pages, so such blocks are never torn (the large ones,
// chunk-index blocks of long traces, still can be; read_trace then points at --repair).
Id paged_file_creation() {
  Id fcpl(H5Pcreate(H5P_FILE_CREATE));
  H5Pset_file_space_strategy(fcpl, H5F_FSPACE_STRATEGY_PAGE, /*persist=*/0, /*threshold=*/1);
  H5Pset_file_space_page_size(fcpl, 4096);
  return fcpl;
}

// A string attribute of the file as text ("" when absent; a non-string one as its JSON).
std::string file_string(const H5Context& cx, hid_t file, const char* name) {
  if (H5Aexists(file, name) <= 0) return "";
  const auto j = read_attr_json(cx, file, name);
  return j.is_string() ? j.get<std::string>() : j.dump();
}

// Refuses a file that is not a trace of this model, tokenizer and engine, or not of this kind.
void check_same_trace(const H5Context& cx, hid_t file, hid_t experts, hid_t gates, const TraceHeader& header) {
  const struct {
    const char* name;
    int ours;
  } shape[] = {{"num_layers", header.num_layers}, {"top_k", header.top_k}, {"num_experts", header.num_experts}};
  for (const auto& s : shape) {
    const auto v = read_int_attr(cx, file, s.name);
    if (!v) throw Error(fmt::format("{}: not a moelab trace (no integer attribute {})", cx.path, s.name));
    if (*v != s.ours)
      throw Error(fmt::format("{}: holds a trace of another model ({} is {} in the file, {} here); write to a new file",
                              cx.path, s.name, *v, s.ours));
  }
  if (H5Aexists(file, "model_config") <= 0) throw Error(fmt::format("{}: not a moelab trace (no model_config attribute)", cx.path));
  const auto theirs = stable_config(read_attr_json(cx, file, "model_config"));
  const auto ours = stable_config(header.model_config);
  if (theirs != ours)
    throw Error(fmt::format("{}: holds a trace of another model (model_config: {}); write to a new file", cx.path,
                            first_difference(theirs, ours)));
  // The same model directory, tokenizer and engine, where the file records them (older traces may not).
  const auto their_path = file_string(cx, file, "model_path");
  if (!their_path.empty() && !header.model_path.empty() && their_path != header.model_path)
    throw Error(fmt::format("{}: holds a trace of another model (model_path is {} in the file, {} here); write to "
                            "a new file", cx.path, their_path, header.model_path));
  const auto their_tok = file_string(cx, file, "tokenizer_sha256");
  if (!their_tok.empty() && !header.tokenizer_sha256.empty() && their_tok != header.tokenizer_sha256)
    throw Error(fmt::format("{}: was traced with another tokenizer (tokenizer_sha256 is {} in the file, {} here); "
                            "write to a new file", cx.path, their_tok, header.tokenizer_sha256));
  const auto their_adapter = file_string(cx, file, "adapter_sha256");
  if (their_adapter != header.adapter_sha256) {
    const auto theirs_dir = file_string(cx, file, "adapter");
    const auto describe = [](const std::string& dir, const std::string& sha) {
      return sha.empty() ? std::string("without an adapter") : fmt::format("with the adapter {} (sha256 {})", dir, sha);
    };
    throw Error(fmt::format("{}: was traced {}, this run is {}; append with the same --adapter or write to a new file",
                            cx.path, describe(theirs_dir, their_adapter), describe(header.adapter, header.adapter_sha256)));
  }
  const auto their_engine = file_string(cx, file, "engine");
  if (their_engine != header.engine)
    throw Error(fmt::format("{}: was traced with another engine (engine is \"{}\" in the file, \"{}\" here); append "
                            "with --engine {} or write to a new file", cx.path, their_engine, header.engine,
                            their_engine));
  const bool file_has_logits = H5Lexists(file, kLogits, H5P_DEFAULT) > 0;
  if (file_has_logits != header.router_logits)
    throw Error(fmt::format("{}: the trace was written {} router logits; append {} --router-logits", cx.path,
                            file_has_logits ? "with" : "without", file_has_logits ? "with" : "without"));
  const bool file_has_guess = H5Lexists(file, kGuess, H5P_DEFAULT) > 0;
  if (file_has_guess != header.prefetch_guess)
    throw Error(fmt::format("{}: the trace was written {} prefetch guesses; append {} --record-prefetch-guess", cx.path,
                            file_has_guess ? "with" : "without", file_has_guess ? "with" : "without"));
  const std::vector<hsize_t> want_k{hsize_t(header.num_layers), hsize_t(header.top_k)};
  for (auto [dset, name] : {std::pair{experts, kExperts}, std::pair{gates, kGates}}) {
    const auto d = dims_of(cx, dset, name);
    if (d.size() != 3 || d[1] != want_k[0] || d[2] != want_k[1])
      throw Error(fmt::format("{}: /{} does not have shape [N, {}, {}]", cx.path, name, want_k[0], want_k[1]));
  }
  // The optional datasets too (open_row_dataset checks every rank and number type): each row this run writes
  // must be a row of the file's, not only of the same rank (write_rows checks again).
  const struct {
    const char* name;
    bool present;
    hsize_t last;
  } optional[] = {{kLogits, file_has_logits, hsize_t(header.num_experts)}, {kGuess, file_has_guess, hsize_t(header.top_k)}};
  for (const auto& o : optional) {
    if (!o.present) continue;
    const Id dset = open_row_dataset(cx, file, o.name);
    const auto d = dims_of(cx, dset, o.name);
    if (d.size() != 3 || d[1] != want_k[0] || d[2] != o.last)
      throw Error(fmt::format("{}: /{} does not have shape [N, {}, {}]", cx.path, o.name, want_k[0], o.last));
  }
}

}  // namespace

void check_appendable(const std::string& path, const TraceHeader& header) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || (S_ISREG(st.st_mode) && st.st_size == 0)) return;  // a new trace
  setup();
  const H5Context cx{path};
  const Id file = open_for_reading(cx);
  const Id experts = open_row_dataset(cx, file, kExperts), gates = open_row_dataset(cx, file, kGates);
  check_same_trace(cx, file, experts, gates, header);
}

void check_trace_output(const std::string& path, bool append) {
  struct stat st {};
  if (append || ::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) return;
  throw Error(fmt::format("{}: already exists; pass --append to add to the trace in it, or choose another file", path));
}

bool is_volatile_config_field(const std::string& key) {
  static const std::set<std::string> fields = {
      "_name_or_path",     "transformers_version", "use_cache",          "output_router_logits",
      "router_aux_loss_coef", "router_jitter_noise", "attention_dropout", "initializer_range",
      "torch_dtype",       "dtype",                "quantization_config", "_attn_implementation"};
  return fields.count(key) != 0;
}

// ---------------------------------------------------------------------------------------------------
// TraceWriter

struct TraceWriter::Impl {
  H5Context cx;
  TraceHeader header;
  TraceWriterOptions options;
  std::unique_ptr<WriterLock> lock;
  Id file, tokens, offsets, domain, experts, gates, logits, guess;
  Id half;  // the float16 datatype

  bool appended = false, recovered = false;
  int64_t tokens_before = 0, sequences_before = 0, dropped = 0;
  std::vector<std::string> domain_names;  // the file's, after merging this run's
  int64_t file_tokens = 0, file_sequences = 0;  // committed in the file

  // Sequences waiting to be written.
  std::vector<int32_t> buf_tokens, buf_domain;
  std::vector<int64_t> buf_lengths;
  std::vector<uint8_t> buf_experts;
  std::vector<float> buf_gates;
  std::vector<uint16_t> buf_logits;
  std::vector<uint8_t> buf_guess;
  std::chrono::steady_clock::time_point oldest_buffered;
  int64_t written_tokens = 0, written_sequences = 0;
  bool closed = false;
  std::string failure;  // set when a write failed: the file was abandoned, and this is the error

  Impl(const std::string& path, const TraceHeader& h, TraceWriterOptions o)
      : cx{path}, header(h), options(o), lock(std::make_unique<WriterLock>(path)), half(half_type()) {}

  size_t row_k() const { return size_t(header.num_layers) * size_t(header.top_k); }
  size_t row_e() const { return size_t(header.num_layers) * size_t(header.num_experts); }

  void check_header() const {
    const auto& h = header;
    if (h.num_layers <= 0 || h.top_k <= 0 || h.num_experts <= 0 || h.top_k > h.num_experts)
      throw Error(fmt::format("{}: bad trace shape (layers {}, top_k {}, experts {})", cx.path, h.num_layers, h.top_k,
                              h.num_experts));
    if (h.window < 0) throw Error(fmt::format("{}: negative window length", cx.path));
    if (h.num_experts > 256)
      throw Error(fmt::format("{}: {} experts do not fit the trace's uint8 expert ids", cx.path, h.num_experts));
    for (const auto& d : h.domain_names)
      if (d.find('\0') != std::string::npos) throw Error(fmt::format("{}: a domain name holds a NUL character", cx.path));
  }

  // After a failed write nothing more goes through HDF5 for this file, not even closing it: HDF5 1.10
  // cannot close a dataset whose write failed (closing retries the write, fails half-way, and the
  // half-closed dataset crashes the library later), and every further write could put metadata on disk
  // that points at data that never got there. The file on disk keeps what the last successful flush
  // committed (SWMR ordering; see the header comment), like the file of a writer that was killed. The
  // HDF5 objects stay open until the process exits; the writer lock is released.
  void abandon() {
    for (Id* d : {&tokens, &offsets, &domain, &experts, &gates, &logits, &guess, &file}) d->abandon();
    buf_tokens.clear(), buf_domain.clear(), buf_lengths.clear(), buf_experts.clear(), buf_gates.clear(),
        buf_logits.clear(), buf_guess.clear();
    closed = true;
    if (lock) lock->mark_abandoned();
    lock.reset();
  }

  // A write failed: abandon the file and say what it still holds.
  [[noreturn]] void write_failed(const Error& e) {
    failure = fmt::format("{}; the {} sequences ({} tokens) flushed before the error are kept (`moelab trace "
                          "--repair {}` makes the file plain HDF5 again)",
                          e.what(), file_sequences, file_tokens, cx.path);
    abandon();
    throw Error(failure);
  }

  nlohmann::json this_run() const {
    return {{"engine", header.engine},       {"tool_version", header.tool_version}, {"started", utc_now_iso8601()},
            {"window", header.window},       {"first_sequence", file_sequences},    {"first_token", file_tokens},
            {"router_logits", header.router_logits}, {"prefetch_guess", header.prefetch_guess},
            {"inputs", header.inputs},      {"adapter", header.adapter}};
  }

  // The `description` attribute and the dimension labels of one dataset.
  void document(hid_t dset, const char* name) {
    const auto& d = doc_of(name);
    write_string_attr(cx, dset, "description", d.description);
    for (size_t i = 0; i < d.axes.size(); ++i)
      cx.ok(H5DSset_label(dset, unsigned(i), d.axes[i]), fmt::format("cannot label the axes of /{}", name));
  }

  // A dimension scale dataset 0, 1, ..., n-1, attached to axis `axis` of each of `users`.
  void add_scale(const char* name, hsize_t n, std::initializer_list<std::pair<hid_t, unsigned>> users) {
    Id space(cx.id(H5Screate_simple(1, &n, nullptr), "cannot create a dataspace"));
    Id dset(cx.id(H5Dcreate2(file, name, H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                  fmt::format("cannot create /{}", name)));
    std::vector<int32_t> values(n);
    for (size_t i = 0; i < values.size(); ++i) values[i] = int32_t(i);
    cx.ok(H5Dwrite(dset, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), fmt::format("cannot write /{}", name));
    cx.ok(H5DSset_scale(dset, name), fmt::format("cannot make /{} a dimension scale", name));
    document(dset, name);
    for (auto [user, axis] : users)
      if (user >= 0) cx.ok(H5DSattach_scale(user, dset, axis), fmt::format("cannot attach the scale /{}", name));
  }

  void document_layout() {
    for (auto [dset, name] : {std::pair{hid_t(tokens), kTokens}, std::pair{hid_t(offsets), kOffsets},
                              std::pair{hid_t(domain), kDomain}, std::pair{hid_t(experts), kExperts},
                              std::pair{hid_t(gates), kGates}, std::pair{hid_t(logits), kLogits},
                              std::pair{hid_t(guess), kGuess}})
      if (dset >= 0) document(dset, name);
    add_scale("layer", hsize_t(header.num_layers), {{experts, 1}, {gates, 1}, {logits, 1}, {guess, 1}});
    add_scale("rank", hsize_t(header.top_k), {{experts, 2}, {gates, 2}, {guess, 2}});
    if (logits.valid()) add_scale("expert", hsize_t(header.num_experts), {{logits, 2}});
  }

  void create() {
    setup();
    const Id fapl = latest_format_fapl();
    const Id fcpl = paged_file_creation();
    file = Id(cx.id(H5Fcreate(cx.path.c_str(), H5F_ACC_TRUNC, fcpl, fapl), "cannot create"));
    const auto L = hsize_t(header.num_layers), K = hsize_t(header.top_k), E = hsize_t(header.num_experts);
    const auto ct = options.chunk_tokens;
    tokens = create_row_dataset(cx, file, kTokens, H5T_STD_I32LE, {}, ct, options.deflate_level);
    offsets = create_row_dataset(cx, file, kOffsets, H5T_STD_I64LE, {}, 1024, options.deflate_level);
    domain = create_row_dataset(cx, file, kDomain, H5T_STD_I32LE, {}, 1024, options.deflate_level);
    experts = create_row_dataset(cx, file, kExperts, H5T_STD_U8LE, {L, K}, ct, options.deflate_level);
    gates = create_row_dataset(cx, file, kGates, H5T_IEEE_F32LE, {L, K}, ct, options.deflate_level);
    if (header.router_logits) logits = create_row_dataset(cx, file, kLogits, half, {L, E}, ct, options.deflate_level);
    if (header.prefetch_guess) guess = create_row_dataset(cx, file, kGuess, H5T_STD_U8LE, {L, K}, ct, options.deflate_level);
    const int64_t zero = 0;
    write_rows(cx, offsets, kOffsets, H5T_NATIVE_INT64, &zero, 1, 0, 1);

    add_new_domains();
    write_strings_attr(cx, domain, "domain_names", domain_names);
    write_string_attr(cx, file, "model_config", header.model_config.dump());
    write_string_attr(cx, file, "engine", header.engine);
    if (!header.model_path.empty()) write_string_attr(cx, file, "model_path", header.model_path);
    if (!header.tokenizer_sha256.empty()) write_string_attr(cx, file, "tokenizer_sha256", header.tokenizer_sha256);
    if (!header.adapter_sha256.empty()) {
      write_string_attr(cx, file, "adapter", header.adapter);
      write_string_attr(cx, file, "adapter_sha256", header.adapter_sha256);
    }
    write_string_attr(cx, file, "inputs", join_json(header.inputs));
    write_string_attr(cx, file, "tool", "moelab");
    write_string_attr(cx, file, "tool_version", header.tool_version);
    write_string_attr(cx, file, "created", utc_now_iso8601());
    write_int_attr(cx, file, "num_layers", header.num_layers);
    write_int_attr(cx, file, "top_k", header.top_k);
    write_int_attr(cx, file, "num_experts", header.num_experts);
    write_int_attr(cx, file, "window", header.window);
    write_string_attr(cx, file, "runs", nlohmann::json::array({this_run()}).dump());
    document_layout();
  }


  void check_compatible() { check_same_trace(cx, file, experts, gates, header); }

  // Drops rows past the last committed sequence (left by a writer that died mid-flush or after writing
  // rows it never committed), so that this run's rows follow the committed ones.
  void drop_uncommitted() {
    const auto c = read_committed(cx, offsets);
    dropped += drop_rows_past(cx, c, {{tokens, kTokens}, {experts, kExperts}, {gates, kGates}, {logits, kLogits},
                                      {guess, kGuess}}, domain);
    file_tokens = c.tokens;
    file_sequences = c.sequences;
  }

  // This run's domain names that the file does not have yet, in order ("" means unlabeled: no name).
  void add_new_domains() {
    for (const auto& d : header.domain_names)
      if (!d.empty() && std::find(domain_names.begin(), domain_names.end(), d) == domain_names.end())
        domain_names.push_back(d);
  }

  // Merges this run into the file's descriptive attributes: new domain names, engine, window, runs.
  void merge_attributes() {
    domain_names.clear();
    if (H5Aexists(domain, "domain_names") > 0) domain_names = read_strings(cx, domain, "domain_names");
    add_new_domains();
    write_strings_attr(cx, domain, "domain_names", domain_names);

    // (The engine is this run's: check_compatible refused another.) A trace from before these were
    // recorded gets them from this run (analysis/trace.hpp, "Older traces").
    if (H5Aexists(file, "model_path") <= 0 && !header.model_path.empty())
      write_string_attr(cx, file, "model_path", header.model_path);
    if (H5Aexists(file, "tokenizer_sha256") <= 0 && !header.tokenizer_sha256.empty())
      write_string_attr(cx, file, "tokenizer_sha256", header.tokenizer_sha256);
    std::vector<std::string> inputs;
    if (H5Aexists(file, "inputs") > 0) {
      const auto j = read_attr_json(cx, file, "inputs");
      if (j.is_array())
        for (const auto& x : j)
          if (x.is_string()) inputs.push_back(x.get<std::string>());
    }
    for (const auto& in : header.inputs)
      if (std::find(inputs.begin(), inputs.end(), in) == inputs.end()) inputs.push_back(in);
    write_string_attr(cx, file, "inputs", join_json(inputs));

    const int64_t window = std::max<int64_t>(read_int_attr(cx, file, "window").value_or(0), header.window);
    write_int_attr(cx, file, "window", window);

    nlohmann::json runs = H5Aexists(file, "runs") > 0 ? read_attr_json(cx, file, "runs") : nlohmann::json::array();
    if (!runs.is_array()) runs = nlohmann::json::array();
    runs.push_back(this_run());
    write_string_attr(cx, file, "runs", runs.dump());
  }

  void open_existing() {
    setup();
    // Refuse another engine, model or tokenizer from a read-only open, before the file is opened for
    // writing: a read-write open and close may rewrite metadata blocks (seen as changed bytes after a
    // refused append in the ASan build), and a refusal must leave the file as it was.
    check_appendable(cx.path, header);
    file = open_for_writing(cx);
    appended = true;
    tokens = open_row_dataset(cx, file, kTokens);
    offsets = open_row_dataset(cx, file, kOffsets);
    domain = open_row_dataset(cx, file, kDomain);
    experts = open_row_dataset(cx, file, kExperts);
    gates = open_row_dataset(cx, file, kGates);
    if (H5Lexists(file, kLogits, H5P_DEFAULT) > 0) logits = open_row_dataset(cx, file, kLogits);
    if (H5Lexists(file, kGuess, H5P_DEFAULT) > 0) guess = open_row_dataset(cx, file, kGuess);
    check_compatible();
    drop_uncommitted();
    tokens_before = file_tokens;
    sequences_before = file_sequences;
    try {
      merge_attributes();
    } catch (...) {
      abandon();  // it may have written part of them (see abandon)
      throw;
    }
  }

  // From here on the file stays readable whatever happens to this process (see the header comment).
  void start_swmr() {
    setup();
    if (H5Fstart_swmr_write(file) < 0) {
      const std::string why = error_text();
      abandon();
      throw Error(fmt::format("{}: cannot start writing: {}", cx.path, why));
    }
  }

  int64_t buffered_tokens() const { return int64_t(buf_tokens.size()); }

  void flush() {
    if (!failure.empty()) throw Error(failure);
    try {
      flush_rows();
    } catch (const Error& e) {
      write_failed(e);
    }
  }

  void flush_rows() {
    setup();
    if (buf_lengths.empty()) {
      cx.ok(H5Fflush(file, H5F_SCOPE_LOCAL), "cannot flush");
      return;
    }
    const int64_t n = buffered_tokens(), s = int64_t(buf_lengths.size());
    // 1. The rows, made durable before anything points at them.
    write_rows(cx, tokens, kTokens, H5T_NATIVE_INT32, buf_tokens.data(), buf_tokens.size(), file_tokens, n);
    write_rows(cx, experts, kExperts, H5T_NATIVE_UINT8, buf_experts.data(), buf_experts.size(), file_tokens, n);
    write_rows(cx, gates, kGates, H5T_NATIVE_FLOAT, buf_gates.data(), buf_gates.size(), file_tokens, n);
    if (logits.valid()) write_rows(cx, logits, kLogits, half, buf_logits.data(), buf_logits.size(), file_tokens, n);
    if (guess.valid()) write_rows(cx, guess, kGuess, H5T_NATIVE_UINT8, buf_guess.data(), buf_guess.size(), file_tokens, n);
    write_rows(cx, domain, kDomain, H5T_NATIVE_INT32, buf_domain.data(), buf_domain.size(), file_sequences, s);
    for (hid_t d : {hid_t(tokens), hid_t(experts), hid_t(gates), hid_t(logits), hid_t(guess), hid_t(domain)})
      if (d >= 0) cx.ok(H5Dflush(d), "cannot flush");
    // 2. The commit: the new sequence ends, appended to /sequence_offsets.
    std::vector<int64_t> ends;
    int64_t end = file_tokens;
    for (int64_t len : buf_lengths) ends.push_back(end += len);
    write_rows(cx, offsets, kOffsets, H5T_NATIVE_INT64, ends.data(), ends.size(), file_sequences + 1, s);
    cx.ok(H5Dflush(offsets), "cannot flush");
    cx.ok(H5Fflush(file, H5F_SCOPE_LOCAL), "cannot flush");
    file_tokens += n;
    file_sequences += s;
    buf_tokens.clear(), buf_domain.clear(), buf_lengths.clear(), buf_experts.clear(), buf_gates.clear(),
        buf_logits.clear(), buf_guess.clear();
  }

  void close() {
    if (!failure.empty()) throw Error(failure);
    if (closed) return;
    flush();
    setup();
    try {
      for (Id* d : {&tokens, &offsets, &domain, &experts, &gates, &logits, &guess}) cx.ok(d->reset(), "cannot close");
      cx.ok(file.reset(), "cannot close");  // the last reference: this closes the file
    } catch (const Error& e) {
      write_failed(e);
    }
    closed = true;
  }
};

TraceWriter::TraceWriter(const std::string& path, const TraceHeader& header, TraceWriterOptions options)
    : impl_(std::make_unique<Impl>(path, header, options)) {
  impl_->check_header();
  if (impl_->lock->size() != 0 && !options.append) check_trace_output(path, false);  // throws
  if (impl_->lock->size() == 0) {
    try {
      impl_->create();
    } catch (...) {
      impl_->abandon();  // (check_header refused what it could; what fails here is HDF5 writing)
      ::unlink(path.c_str());  // no half-made file left behind (it was empty or absent before)
      throw;
    }
  } else {
    if (left_by_dead_writer_quietly(path)) {
      // Its writer died: salvage what is readable into a fresh file first (see the header comment).
      impl_->dropped = repair_locked(path);
      impl_->recovered = true;
      impl_->lock = std::make_unique<WriterLock>(path);  // the repaired file is a new inode
    }
    impl_->open_existing();
  }
  impl_->start_swmr();
}

TraceWriter::~TraceWriter() {
  try {
    if (impl_->failure.empty()) impl_->close();
  } catch (...) {
  }
}

bool TraceWriter::appended() const { return impl_->appended; }
bool TraceWriter::recovered() const { return impl_->recovered; }
int64_t TraceWriter::tokens_before() const { return impl_->tokens_before; }
int64_t TraceWriter::sequences_before() const { return impl_->sequences_before; }
int64_t TraceWriter::dropped_tokens() const { return impl_->dropped; }
int64_t TraceWriter::tokens_written() const { return impl_->written_tokens; }
int64_t TraceWriter::sequences_written() const { return impl_->written_sequences; }

int TraceWriter::domain_id(const std::string& name) const {
  if (name.empty()) return -1;
  const auto& names = impl_->domain_names;
  const auto it = std::find(names.begin(), names.end(), name);
  if (it == names.end())
    throw Error(fmt::format("{}: domain '{}' was not declared when the trace was opened", impl_->cx.path, name));
  return int(it - names.begin());
}

void TraceWriter::add_sequence(int domain, std::span<const int32_t> tokens, std::span<const uint8_t> experts,
                               std::span<const float> gates, std::span<const float> router_logits,
                               std::span<const uint8_t> prefetch_guess) {
  auto& m = *impl_;
  if (!m.failure.empty()) throw Error(m.failure);
  if (m.closed) throw Error(fmt::format("{}: trace already closed", m.cx.path));
  const size_t n = tokens.size();
  if (n == 0) throw Error(fmt::format("{}: empty sequence", m.cx.path));
  if (m.header.window > 0 && int64_t(n) > m.header.window)
    throw Error(fmt::format("{}: sequence of {} tokens is longer than the window of {}", m.cx.path, n, m.header.window));
  if (experts.size() != n * m.row_k() || gates.size() != n * m.row_k())
    throw Error(fmt::format("{}: sequence of {} tokens needs {} experts and gates, got {} and {}", m.cx.path, n,
                            n * m.row_k(), experts.size(), gates.size()));
  const size_t want_logits = m.logits.valid() ? n * m.row_e() : 0;
  if (router_logits.size() != want_logits)
    throw Error(fmt::format("{}: sequence of {} tokens needs {} router logits, got {}", m.cx.path, n, want_logits,
                            router_logits.size()));
  const size_t want_guess = m.guess.valid() ? n * m.row_k() : 0;
  if (prefetch_guess.size() != want_guess)
    throw Error(fmt::format("{}: sequence of {} tokens needs {} prefetch guesses, got {}", m.cx.path, n, want_guess,
                            prefetch_guess.size()));
  for (uint8_t e : prefetch_guess)
    if (e >= m.header.num_experts && e != kNoGuess)
      throw Error(fmt::format("{}: prefetch guess {} outside the {} experts", m.cx.path, int(e), m.header.num_experts));
  if (domain < -1 || domain >= int(m.domain_names.size()))
    throw Error(fmt::format("{}: domain index {} outside the {} domain names", m.cx.path, domain, m.domain_names.size()));
  for (uint8_t e : experts)
    if (e >= m.header.num_experts)
      throw Error(fmt::format("{}: expert id {} outside the {} experts", m.cx.path, int(e), m.header.num_experts));

  if (m.buf_lengths.empty()) m.oldest_buffered = std::chrono::steady_clock::now();
  m.buf_tokens.insert(m.buf_tokens.end(), tokens.begin(), tokens.end());
  m.buf_experts.insert(m.buf_experts.end(), experts.begin(), experts.end());
  m.buf_gates.insert(m.buf_gates.end(), gates.begin(), gates.end());
  for (float x : router_logits) m.buf_logits.push_back(float_to_half(x));
  m.buf_guess.insert(m.buf_guess.end(), prefetch_guess.begin(), prefetch_guess.end());
  m.buf_domain.push_back(domain);
  m.buf_lengths.push_back(int64_t(n));
  m.written_tokens += int64_t(n);
  m.written_sequences += 1;

  const double age = seconds_since(m.oldest_buffered);
  if (m.buffered_tokens() >= m.options.flush_tokens || age >= m.options.flush_seconds) m.flush();
}

void TraceWriter::flush() {
  if (!impl_->failure.empty()) throw Error(impl_->failure);
  if (!impl_->closed) impl_->flush();
}

void TraceWriter::close() { impl_->close(); }

}  // namespace moelab::analysis
