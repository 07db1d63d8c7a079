#pragma once
// Routing traces in HDF5 (DESIGN.md "analysis/"): writing them crash-safely and appendably, reading
// them back into a TraceData, and recording one window's routing from any engine through a Probe.
//
// File layout (every row dataset chunked, shuffled and deflate-compressed, unlimited along its first axis):
//   /tokens            int32   [N]       dims (token)
//   /sequence_offsets  int64   [S + 1]   dims (sequence_boundary); sequence s is tokens [offsets[s],
//                                        offsets[s+1]); offsets[0] = 0
//   /sequence_domain   int32   [S]       dims (sequence); index into its attribute `domain_names`
//                                        (strings); -1 = unlabeled
//   /experts           uint8   [N, L, k] dims (token, layer, rank): chosen experts in rank order (highest
//                                        probability first)
//   /gates             float32 [N, L, k] dims (token, layer, rank): renormalized gate weights
//   /router_logits     float16 [N, L, E] dims (token, layer, expert); optional; IEEE half,
//                                        round-to-nearest-even from the FP32 logits
//   /prefetch_guess    uint8   [N, L, k] dims (token, layer, rank); optional (`moelab trace
//                                        --record-prefetch-guess`): the top-k experts of layer l's router
//                                        applied to layer l-1's output hidden state after layer l's
//                                        post-attention RMSNorm (the guess a prefetcher can make one layer
//                                        early; analysis/prefetch_guess.hpp), highest logit first; 255 at
//                                        layer 0, which nothing precedes
//   /layer, /rank, /expert  int32 [L], [k], [E]: 0, 1, 2, ...: HDF5 dimension scales (H5DS), attached
//                                        to those axes of /experts, /gates and /router_logits
// Self-describing: every dataset has a `description` attribute (one sentence: what, units, what each
// axis is) and its axes carry HDF5 dimension labels (H5DSset_label: h5py's dset.dims[i].label; the
// names above). The token and sequence axes have labels but no scale dataset.
// Root attributes: model_config (the checkpoint's config.json as a JSON string), model_path (the model
// directory, absolute), tokenizer_sha256 (SHA-256, hex, of the bytes of its tokenizer.model), inputs (a
// JSON string: the input files of every run, absolute, in order of first use), engine, tool ("moelab"),
// tool_version, created (ISO-8601 UTC of the first run), num_layers, top_k, num_experts, window (the
// longest window of any run; 0: not stated), runs (a JSON string: one object per run with engine,
// tool_version, started, window, first_sequence, first_token, router_logits, prefetch_guess, inputs).
// Older traces. moelab before 2026-12 wrote no descriptions, dimension labels, scales, model_path,
// tokenizer_sha256 or inputs, and its `engine` could list several engines, comma-separated (appends
// were not checked against it). Such files read as before; appending to one (same engine only) adds
// model_path and tokenizer_sha256 from the appending run, which its earlier runs may not share.
// The file uses HDF5's newest format (superblock v3), so it needs HDF5 >= 1.10 to read (h5py wheels
// bundle 1.14); HDF5 1.8 tools cannot open it.
// String attributes are fixed-length, NUL-padded UTF-8 (h5py gives them back as bytes). moelab before
// 2026-12 wrote them variable-length; those files still read, through our own bounds-checked reader of
// HDF5's global heap (libhdf5 1.10 loops for ever or crashes on a damaged one; see trace_h5.hpp).
//
// Untrusted files. read_trace and repair_trace check every dataset's rank and type, every attribute's
// shape and size, and the shapes against each other and the stored bytes before reading anything: a
// damaged or crafted file is one Error naming the file and the problem (docs/bad-input.md), never a
// hang, a crash or a giant allocation.
//
// Write errors. When a write fails (a full disk, a file-size limit), the TraceWriter abandons the file
// without another HDF5 call on it and throws an Error that says how many sequences the file keeps:
// every sequence flushed before the error, readable as after a crash (below).
//
// Crash safety. The file is written in HDF5's SWMR (single-writer/multiple-reader) mode, whose ordered,
// checksummed metadata writes keep the file on disk readable at every moment; without SWMR a killed
// writer was seen to leave unreadable files (1.10 format: datasets fail to read; newest format: the file
// refuses to open). Rows are buffered in memory and written at least every `flush_tokens` tokens or
// `flush_seconds`; each flush writes the rows, flushes those datasets, and only then extends
// /sequence_offsets, so a reader trusts only rows up to the last offset. After a kill at any moment the
// file holds every flushed sequence, bit for bit; the unflushed ones and the window being computed are
// lost (tests/test_trace.cpp kills writers mid-flush; see below for how often). Power loss is not covered:
// nothing calls fsync.
// One hazard SWMR does not cover: a process killed inside write() stops between 4 KiB pages, so a
// metadata block spanning a page boundary can be torn (seen about once in 600 mid-flush kills before
// the next measure). The file uses paged file-space aggregation, which keeps every block smaller than a
// page inside one page; only the large chunk-index blocks of long traces can still be torn (none in
// 3400 kills, 2358 of them mid-flush: TraceCrash.KilledAtRandomMomentsTheFileStaysConsistent run once
// with MOELAB_TRACE_CRASH_TRIALS=3400; each ctest run kills 12 times and asserts that kills landed
// mid-flush, leaving rows written past the last committed offset). A torn block makes the chunks it
// indexes unreadable: read_trace then refuses, naming `moelab trace --repair`, which keeps every
// sequence before the damage.
// What a reader must know: a writer that died leaves the file marked "open for SWMR write", and HDF5
// then refuses a plain read-only open ("file is already open for write (may use <h5clear file> to
// clear file consistency flags)", or "truncated file"). Either
//   - run `moelab trace --repair PATH` (repair_trace) once: the file becomes a plain HDF5 file again, or
//   - open it as an SWMR reader: read_trace() falls back to that, and in Python
//         h5py.File(path, "r", swmr=True)
//     reads it, as it reads a trace still being written. (On a torn block, h5py's SWMR reader retries
//     for a very long time; repair first.)
// Appending to such a trace with a TraceWriter repairs it first.
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "analysis/trace_data.hpp"
#include "core/engine.hpp"
#include "core/sha256.hpp"

namespace moelab::analysis {

class PrefetchGuesser;  // analysis/prefetch_guess.hpp

// IEEE 754 binary16, as the bits of a uint16. float_to_half rounds to nearest, ties to even; values
// beyond the half range become infinities; NaN stays NaN.
uint16_t float_to_half(float f);
float half_to_float(uint16_t h);

// What a trace is of, fixed when the file is created and checked when a run appends to it.
struct TraceHeader {
  nlohmann::json model_config;  // the checkpoint's config.json
  int num_layers = 0, top_k = 0, num_experts = 0;
  std::string engine;
  std::string model_path;        // the model directory, absolute ("": not recorded)
  std::string tokenizer_sha256;  // sha256_file of its tokenizer.model ("": not recorded)
  // The LoRA adapter the engine applied (--adapter): its folder, absolute, and the SHA-256 of its
  // adapter_model.safetensors; both "" without one. A trace never mixes routing with and without an adapter,
  // or of two adapters: appends are checked on the hash (a trace from before this was recorded counts as
  // having none).
  std::string adapter, adapter_sha256;
  std::vector<std::string> inputs;  // this run's input files, absolute
  std::string tool_version;
  int window = 0;  // the longest sequence this run may write (longer ones are refused); 0: not stated
  bool router_logits = false;
  bool prefetch_guess = false;  // the trace holds /prefetch_guess
  std::vector<std::string> domain_names;  // every domain this run may write (merged into the file's)
};

struct TraceWriterOptions {
  int64_t flush_tokens = 4096;  // write buffered sequences once this many tokens are waiting
  double flush_seconds = 60;    // ... or once the oldest waiting sequence is this old (slow engines)
  int64_t chunk_tokens = 4096;  // HDF5 chunk length along the token axis (fewer for very wide rows)
  int deflate_level = 4;
  // false: the file must not exist yet (or be empty); a trace is never added to by accident.
  // true: add to the trace in the file, or create it when there is none.
  bool append = false;
};

// Throws moelab::Error "PATH: already exists; pass --append ..." when `path` is a non-empty file and
// `append` is false (what TraceWriter refuses, for callers that check before loading a model).
void check_trace_output(const std::string& path, bool append);

// Throws what a TraceWriter appending to `path` would throw for a trace of another model, tokenizer,
// engine or kind (without writing anything; a missing or empty file passes): for callers that check
// before loading a model. (The writer checks again.)
void check_appendable(const std::string& path, const TraceHeader& header);

// SHA-256 (core/sha256.hpp), named here too for the trace's callers.
using moelab::sha256_file;
using moelab::sha256_hex;

// config.json fields that do not change what the model computes (metadata, training-only settings,
// storage dtype and quantization); they may differ between runs appended to one trace.
bool is_volatile_config_field(const std::string& key);

// Writes a trace, creating the file or (with options.append) appending to it. Appending checks that
// the file is a moelab trace of the same model (num_layers, top_k, num_experts, config.json minus
// volatile fields, and model_path where both record one), the same tokenizer (tokenizer_sha256, where
// both record one), the same engine, and of the same kind (with or without router logits); otherwise
// it throws moelab::Error naming the file and the difference. (Of the same kind: with or without router
// logits, and with or without prefetch guesses.) Only one TraceWriter may hold a file: a second one, in any process, is refused.
class TraceWriter {
 public:
  TraceWriter(const std::string& path, const TraceHeader& header, TraceWriterOptions options = {});
  ~TraceWriter();  // flushes what is buffered (errors are swallowed: call close() to see them)
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;

  bool appended() const;   // the file existed and this run appends to it
  bool recovered() const;  // the file had been left open by a writer that died; it was repaired first
  int64_t tokens_before() const;     // tokens in the file when it was opened (after any repair)
  int64_t sequences_before() const;
  int64_t dropped_tokens() const;    // rows past the last offset (a dead writer's) or unreadable, dropped

  // Index of a domain name in the file's domain_names (-1 for ""); throws if it was not in the header.
  int domain_id(const std::string& name) const;

  // One sequence: n tokens with their routing, row-major [n, L, k] and, with router logits, [n, L, E]; with
  // prefetch guesses, [n, L, k] (expert ids, or 255 at layer 0).
  void add_sequence(int domain, std::span<const int32_t> tokens, std::span<const uint8_t> experts,
                    std::span<const float> gates, std::span<const float> router_logits = {},
                    std::span<const uint8_t> prefetch_guess = {});
  void flush();  // writes buffered sequences and makes them durable against a crash of this process
  void close();  // flushes and closes; the file is then a plain HDF5 file again

  int64_t tokens_written() const;     // by this writer, flushed or buffered
  int64_t sequences_written() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Reads a whole trace. Tokens past the last sequence offset (rows a crashed writer had not committed)
// are ignored. Throws moelab::Error naming the file on anything missing or inconsistent.
TraceData read_trace(const std::string& path);

// Repairs a trace left by a writer that died (or with rows past its last offset, or unreadable chunks):
// rewrites it, through a temporary file and a rename, with every sequence that can be read in full and
// the original attributes, so that plain HDF5 readers (h5py without swmr=True, h5dump) open it again.
// A healthy file is left alone. Returns the token rows dropped (uncommitted or unreadable). Refused
// while a TraceWriter holds the file.
int64_t repair_trace(const std::string& path);

// One text to trace: a whole plain-text file, or one record of a JSONL file.
struct TraceText {
  std::string text;
  std::string domain;
  std::string source;  // "file" or "file:line", for messages
};

// Reads the inputs of `moelab trace`. A file named *.jsonl holds one JSON object per line with a string
// `text` and an optional string `domain` (blank lines are skipped); any other file is one text. A text's
// domain is its record's `domain`, else domains[i] of its file when domains are given (one per file, in
// order), else the file's stem. Throws moelab::Error naming the file (and line) for a file that cannot
// be read, a line that is not a JSON object, a record without a string `text` or with a non-string
// `domain`, and a domain count that is neither 0 nor the number of files.
std::vector<TraceText> read_trace_inputs(const std::vector<std::string>& files, const std::vector<std::string>& domains);

// One window's routing as a trace stores it.
struct WindowRouting {
  std::vector<uint8_t> experts;      // [n, L, k]
  std::vector<float> gates;          // [n, L, k]
  std::vector<float> router_logits;  // [n, L, E], or empty
  std::vector<uint8_t> prefetch_guess;  // [n, L, k] (255 at layer 0), or empty
};

// Collects the experts, gates and (optionally) router logits of every layer of one forward call.
class RoutingProbe : public Probe {
 public:
  // With a guesser, also the next-layer gate's guess of every layer after the first, from the hidden states
  // the engine reports (analysis/prefetch_guess.hpp).
  RoutingProbe(const ModelConfig& config, bool with_router_logits, const PrefetchGuesser* guesser = nullptr);
  void start(int n);  // before each forward call of n tokens
  void on_layer(const LayerObservation& obs) override;
  WindowRouting take();  // after the call; throws if a layer was not observed

 private:
  int layers_, top_k_, experts_;
  bool with_logits_;
  const PrefetchGuesser* guesser_;
  int n_ = 0;
  std::vector<bool> seen_;
  WindowRouting out_;
};

// Runs one window from an empty cache (engine.reset(), then forward) and returns its routing.
// `also` (e.g. a TimingProbe) observes the same call.
WindowRouting route_window(Engine& engine, std::span<const int32_t> tokens, bool with_router_logits,
                           Probe* also = nullptr, const PrefetchGuesser* guesser = nullptr);

}  // namespace moelab::analysis
