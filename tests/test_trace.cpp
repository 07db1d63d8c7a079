// Routing traces: float16 conversion, exact HDF5 round trips, appending and its refusals, crash safety
// (writers killed mid-run by SIGKILL), traces through the reference engine against a direct forward,
// trace inputs (JSONL) and their errors, the CLI, and the timing probe.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <hdf5.h>
#include <hdf5_hl.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "analysis/forward_record.hpp"
#include "analysis/timing.hpp"
#include "analysis/trace.hpp"
#include "core/checkpoint.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/tokenizer.hpp"
#include "fixture_util.hpp"
#include "reference/model.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
using analysis::float_to_half;
using analysis::half_to_float;
using analysis::TraceData;
using analysis::TraceHeader;
using analysis::TraceWriter;
using analysis::TraceWriterOptions;

// ---------------------------------------------------------------------------------------------------
// Helpers

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            fmt_name("moelab-trace-" + std::to_string(::getpid()) + "-" + info->test_suite_name() + "-" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  static std::string fmt_name(std::string s) {
    for (char& c : s)
      if (c == '/') c = '_';
    return s;
  }
  fs::path path_;
};

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Expects `f` to throw moelab::Error whose message contains every needle.
template <typename F>
void expect_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no error thrown; expected one mentioning " << needles.front();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
  }
}

nlohmann::json small_config(int layers = 2, int experts = 4, int k = 2) {
  return {{"architectures", {"MixtralForCausalLM"}}, {"hidden_size", 64},     {"num_hidden_layers", layers},
          {"num_local_experts", experts},            {"num_experts_per_tok", k}, {"transformers_version", "4.57.3"}};
}

TraceHeader small_header(bool logits, std::vector<std::string> domains = {"a", "b"}, int layers = 2, int experts = 4,
                         int k = 2) {
  TraceHeader h;
  h.model_config = small_config(layers, experts, k);
  h.num_layers = layers;
  h.top_k = k;
  h.num_experts = experts;
  h.engine = "ref";
  h.tool_version = "test";
  h.window = 128;
  h.router_logits = logits;
  h.domain_names = std::move(domains);
  return h;
}

// One synthetic sequence, a deterministic function of its seed: distinct experts per (token, layer),
// gates summing to 1, router logits over a wide range (including values that round in float16).
struct Sequence {
  int domain = 0;
  std::vector<int32_t> tokens;
  std::vector<uint8_t> experts;
  std::vector<float> gates, logits;
};

Sequence make_sequence(uint64_t seed, int n, const TraceHeader& h, int domain) {
  std::mt19937_64 rng(seed);
  Sequence s;
  s.domain = domain;
  std::vector<int> ids(size_t(h.num_experts));
  for (int t = 0; t < n; ++t) {
    s.tokens.push_back(int32_t(rng() % 32000));
    for (int l = 0; l < h.num_layers; ++l) {
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      float sum = 0;
      std::vector<float> g;
      for (int j = 0; j < h.top_k; ++j) g.push_back(float(rng() % 1000 + 1)), sum += g.back();
      for (int j = 0; j < h.top_k; ++j) s.experts.push_back(uint8_t(ids[size_t(j)])), s.gates.push_back(g[size_t(j)] / sum);
      if (h.router_logits)
        for (int e = 0; e < h.num_experts; ++e)
          s.logits.push_back(float(std::ldexp(double(int64_t(rng() % 2000001) - 1000000) / 1e6, int(rng() % 20) - 12)));
    }
  }
  return s;
}

// Options of a writer that adds to an existing trace (without them an existing file is refused).
const TraceWriterOptions kAppend{.append = true};

void add(TraceWriter& w, const Sequence& s) { w.add_sequence(s.domain, s.tokens, s.experts, s.gates, s.logits); }

// The expected trace of a list of sequences.
TraceData expected_trace(const std::vector<Sequence>& seqs, const TraceHeader& h) {
  TraceData t;
  t.num_layers = h.num_layers;
  t.top_k = h.top_k;
  t.num_experts = h.num_experts;
  t.sequence_offsets = {0};
  for (const auto& s : seqs) {
    t.tokens.insert(t.tokens.end(), s.tokens.begin(), s.tokens.end());
    t.experts.insert(t.experts.end(), s.experts.begin(), s.experts.end());
    t.gates.insert(t.gates.end(), s.gates.begin(), s.gates.end());
    for (float x : s.logits) t.router_logits.push_back(half_to_float(float_to_half(x)));
    t.sequence_offsets.push_back(int64_t(t.tokens.size()));
    t.sequence_domain.push_back(s.domain);
  }
  return t;
}

void expect_same_rows(const TraceData& got, const TraceData& want) {
  EXPECT_EQ(got.num_layers, want.num_layers);
  EXPECT_EQ(got.top_k, want.top_k);
  EXPECT_EQ(got.num_experts, want.num_experts);
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.sequence_offsets, want.sequence_offsets);
  EXPECT_EQ(got.sequence_domain, want.sequence_domain);
  EXPECT_EQ(got.experts, want.experts);
  EXPECT_EQ(got.gates, want.gates);  // float32 stored as float32: bit for bit
  ASSERT_EQ(got.router_logits.size(), want.router_logits.size());
  for (size_t i = 0; i < got.router_logits.size(); ++i)
    ASSERT_EQ(got.router_logits[i], want.router_logits[i]) << "router logit " << i;
}

// ---------------------------------------------------------------------------------------------------
// float16

// The trace's float16 names are core/dtype's converter (f32_to_f16 / f16_to_f32, whose rounding
// test_dtype.cpp checks exhaustively), not a second one.
TEST(TraceHalf, IsTheCoreConverter) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    uint32_t got, want;
    const float back = half_to_float(uint16_t(h));
    std::memcpy(&got, &back, 4);
    std::memcpy(&want, &f, 4);
    ASSERT_EQ(got, want) << "half bits " << h;
    ASSERT_EQ(float_to_half(f), f32_to_f16(f)) << "half bits " << h;
    const float next = std::nextafter(f, 0.0f);  // between two halves: the rounding path
    ASSERT_EQ(float_to_half(next), f32_to_f16(next)) << "below half bits " << h;
  }
}

// ---------------------------------------------------------------------------------------------------
// Writing and reading

TEST(TraceFile, RoundTripIsExact) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(/*logits=*/true, {"code", "law", "math"});
  std::vector<Sequence> seqs;
  // Lengths around the chunk (32) and flush (50) sizes, so rows span chunks and flushes.
  const int lengths[] = {1, 31, 32, 33, 7, 64, 100, 5};
  for (int i = 0; i < 8; ++i) seqs.push_back(make_sequence(100 + i, lengths[i], h, i % 3));
  seqs[3].domain = -1;  // unlabeled
  {
    TraceWriter w(path, h, TraceWriterOptions{.flush_tokens = 50, .chunk_tokens = 32});
    EXPECT_FALSE(w.appended());
    for (const auto& s : seqs) add(w, s);
    EXPECT_EQ(w.sequences_written(), 8);
    w.close();
  }
  const auto got = analysis::read_trace(path);
  expect_same_rows(got, expected_trace(seqs, h));
  EXPECT_EQ(got.domain_names, (std::vector<std::string>{"code", "law", "math"}));
  EXPECT_TRUE(got.has_router_logits());

  // The stored float16 is the nearest half: within half an ulp of the float32 logit, in double.
  size_t i = 0;
  for (const auto& s : seqs)
    for (float x : s.logits) {
      const double got_x = got.router_logits[i++];
      const int exp = std::max(std::ilogb(x), -14);                 // subnormals share 2^-14's ulp
      EXPECT_LE(std::abs(got_x - double(x)), std::ldexp(1.0, exp - 11)) << x;  // half ulp = 2^(e-10) / 2
    }

  const auto& a = got.attributes;
  EXPECT_EQ(a["tool"], "moelab");
  EXPECT_EQ(a["tool_version"], "test");
  EXPECT_EQ(a["engine"], "ref");
  EXPECT_EQ(a["num_layers"], 2);
  EXPECT_EQ(a["top_k"], 2);
  EXPECT_EQ(a["num_experts"], 4);
  EXPECT_EQ(a["window"], 128);
  EXPECT_EQ(a["model_config"], h.model_config);
  EXPECT_TRUE(std::regex_match(a["created"].get<std::string>(), std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")))
      << a["created"];
  ASSERT_TRUE(a["runs"].is_array());
  EXPECT_EQ(a["runs"].size(), 1u);
}

// The layout as plain HDF5 sees it: names, types, chunking, compression (independent of our reader).
TEST(TraceFile, LayoutMatchesTheDesign) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(true);
  {
    TraceWriter w(path, h, TraceWriterOptions{.chunk_tokens = 4096});
    add(w, make_sequence(1, 10, h, 0));
  }
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0) << "a cleanly closed trace opens as a plain HDF5 file";
  struct Want {
    const char* name;
    H5T_class_t cls;
    size_t size;
    int rank;
  } wants[] = {{"tokens", H5T_INTEGER, 4, 1},       {"sequence_offsets", H5T_INTEGER, 8, 1},
               {"sequence_domain", H5T_INTEGER, 4, 1}, {"experts", H5T_INTEGER, 1, 3},
               {"gates", H5T_FLOAT, 4, 3},          {"router_logits", H5T_FLOAT, 2, 3}};
  for (const auto& w : wants) {
    const hid_t d = H5Dopen2(f, w.name, H5P_DEFAULT);
    ASSERT_GE(d, 0) << w.name;
    const hid_t t = H5Dget_type(d), s = H5Dget_space(d), p = H5Dget_create_plist(d);
    EXPECT_EQ(H5Tget_class(t), w.cls) << w.name;
    EXPECT_EQ(H5Tget_size(t), w.size) << w.name;
    EXPECT_EQ(H5Sget_simple_extent_ndims(s), w.rank) << w.name;
    hsize_t dims[3], maxdims[3];
    H5Sget_simple_extent_dims(s, dims, maxdims);
    EXPECT_EQ(maxdims[0], H5S_UNLIMITED) << w.name;
    EXPECT_EQ(H5Pget_layout(p), H5D_CHUNKED) << w.name;
    // Filters in order: shuffle, then deflate level 4.
    ASSERT_EQ(H5Pget_nfilters(p), 2) << w.name;
    unsigned flags = 0, cd[4] = {};
    size_t ncd = 4;
    EXPECT_EQ(H5Pget_filter2(p, 0, &flags, &ncd, cd, 0, nullptr, nullptr), H5Z_FILTER_SHUFFLE) << w.name;
    ncd = 4;
    EXPECT_EQ(H5Pget_filter2(p, 1, &flags, &ncd, cd, 0, nullptr, nullptr), H5Z_FILTER_DEFLATE) << w.name;
    EXPECT_EQ(cd[0], 4u) << w.name;
    if (std::string(w.name) == "router_logits") {  // IEEE binary16 fields
      size_t spos, epos, esize, mpos, msize;
      H5Tget_fields(t, &spos, &epos, &esize, &mpos, &msize);
      EXPECT_EQ(spos, 15u);
      EXPECT_EQ(epos, 10u);
      EXPECT_EQ(esize, 5u);
      EXPECT_EQ(mpos, 0u);
      EXPECT_EQ(msize, 10u);
      EXPECT_EQ(H5Tget_ebias(t), 15u);
      EXPECT_EQ(dims[1], 2u);
      EXPECT_EQ(dims[2], 4u);
    }
    if (std::string(w.name) == "experts") {
      EXPECT_EQ(H5Tget_sign(t), H5T_SGN_NONE);
      hsize_t chunk[3];
      H5Pget_chunk(p, 3, chunk);
      EXPECT_EQ(chunk[0], 4096u);
    }
    H5Pclose(p), H5Sclose(s), H5Tclose(t), H5Dclose(d);
  }
  H5Fclose(f);
}

TEST(TraceFile, WithoutRouterLogitsThereIsNoDataset) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(false);
  const auto s = make_sequence(7, 20, h, 1);
  {
    TraceWriter w(path, h);
    add(w, s);
  }  // the destructor flushes and closes
  const auto got = analysis::read_trace(path);
  EXPECT_FALSE(got.has_router_logits());
  expect_same_rows(got, expected_trace({s}, h));
}

// Every dataset says what it holds (a `description` attribute) and names its axes (HDF5 dimension
// labels); the layer, rank and expert axes have dimension scales. Read with the C API and H5DS, not ours.
TEST(TraceFile, SelfDescribing) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  auto h = small_header(true);
  h.model_path = "/models/m";
  h.tokenizer_sha256 = analysis::sha256_hex("tokenizer bytes");
  h.inputs = {"/data/a.jsonl", "/data/b.txt"};
  {
    TraceWriter w(path, h);
    add(w, make_sequence(1, 10, h, 0));
  }
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  const std::vector<std::pair<const char*, std::vector<std::string>>> axes = {
      {"tokens", {"token"}},
      {"sequence_offsets", {"sequence_boundary"}},
      {"sequence_domain", {"sequence"}},
      {"experts", {"token", "layer", "rank"}},
      {"gates", {"token", "layer", "rank"}},
      {"router_logits", {"token", "layer", "expert"}},
      {"layer", {"layer"}},
      {"rank", {"rank"}},
      {"expert", {"expert"}}};
  for (const auto& [name, labels] : axes) {
    SCOPED_TRACE(name);
    const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ASSERT_GE(d, 0);
    ASSERT_GT(H5Aexists(d, "description"), 0);
    const hid_t a = H5Aopen(d, "description", H5P_DEFAULT), t = H5Aget_type(a);
    std::string text(H5Tget_size(t), '\0');
    H5Aread(a, t, text.data());
    text.resize(strnlen(text.data(), text.size()));
    H5Tclose(t), H5Aclose(a);
    EXPECT_GT(text.size(), 40u) << text;
    EXPECT_EQ(text.back(), '.') << text;
    EXPECT_NE(text.find("shape ["), std::string::npos) << text;
    ASSERT_EQ(H5Sget_simple_extent_ndims(H5Dget_space(d)), int(labels.size()));
    for (size_t i = 0; i < labels.size(); ++i) {
      char label[64] = {};
      ASSERT_GT(H5DSget_label(d, unsigned(i), label, sizeof label), 0) << "axis " << i;
      EXPECT_EQ(std::string(label), labels[i]) << "axis " << i;
      EXPECT_NE(text.find(labels[i]), std::string::npos) << "the description names axis " << labels[i];
    }
    H5Dclose(d);
  }
  const auto attached = [&](const char* dset, const char* scale, unsigned axis) {
    const hid_t d = H5Dopen2(f, dset, H5P_DEFAULT), s = H5Dopen2(f, scale, H5P_DEFAULT);
    const bool yes = H5DSis_scale(s) > 0 && H5DSis_attached(d, s, axis) > 0;
    H5Dclose(s), H5Dclose(d);
    return yes;
  };
  EXPECT_TRUE(attached("experts", "layer", 1));
  EXPECT_TRUE(attached("experts", "rank", 2));
  EXPECT_TRUE(attached("gates", "layer", 1));
  EXPECT_TRUE(attached("gates", "rank", 2));
  EXPECT_TRUE(attached("router_logits", "layer", 1));
  EXPECT_TRUE(attached("router_logits", "expert", 2));
  EXPECT_FALSE(attached("experts", "layer", 2));
  {
    const hid_t d = H5Dopen2(f, "expert", H5P_DEFAULT);
    std::vector<int32_t> v(4);
    H5Dread(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    EXPECT_EQ(v, (std::vector<int32_t>{0, 1, 2, 3}));
    H5Dclose(d);
  }
  H5Fclose(f);
  const auto a = analysis::read_trace(path).attributes;
  EXPECT_EQ(a["model_path"], "/models/m");
  EXPECT_EQ(a["tokenizer_sha256"], analysis::sha256_hex("tokenizer bytes"));
  EXPECT_EQ(a["inputs"], nlohmann::json({"/data/a.jsonl", "/data/b.txt"}));
  EXPECT_EQ(a["runs"][0]["inputs"], nlohmann::json({"/data/a.jsonl", "/data/b.txt"}));
  // A repair rewrites the file and keeps all of it.
  EXPECT_EQ(analysis::repair_trace(path), 0);
}

// FIPS 180-4 known answers, across the one- and two-block padding boundary.
TEST(TraceHash, Sha256KnownAnswers) {
  EXPECT_EQ(analysis::sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(analysis::sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(analysis::sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(analysis::sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // (hashlib.sha256 of 55 and 56 bytes, the last one-block and first two-block paddings, and of 64.)
  EXPECT_EQ(analysis::sha256_hex(std::string(55, 'x')), "d5e285683cd4efc02d021a5c62014694958901005d6f71e89e0989fac77e4072");
  EXPECT_EQ(analysis::sha256_hex(std::string(56, 'x')), "04c26261370ee7541549d16dee320c723e3fd14671e66a099afe0a377c16888e");
  EXPECT_EQ(analysis::sha256_hex(std::string(64, 'y')), "ffbf30ab94107b2c14d75cfb455ec94f200400ddc5ce304e0c21894090db055f");
}

// Traces written by older builds (the fuzz corpus seeds: fixed-length strings, and the older
// variable-length ones) read as before, and can be appended to by the same engine.
TEST(TraceFile, OldTracesStillReadAndAppend) {
  TempDir tmp;
  const std::string corpus = fixture("../fuzz/corpus/trace/");
  for (const char* name : {"seed-trace-0", "seed-trace-1", "seed-trace-vlen-strings"}) {
    SCOPED_TRACE(name);
    const auto t = analysis::read_trace(corpus + name);
    EXPECT_GT(t.num_tokens(), 0);
    EXPECT_EQ(t.attributes["engine"], "ref");
    EXPECT_FALSE(t.attributes.contains("model_path"));
    EXPECT_FALSE(t.attributes.contains("inputs"));
  }
  const auto path = tmp.file("old.h5");
  fs::copy_file(corpus + "seed-trace-1", path);
  const auto old = analysis::read_trace(path);
  TraceHeader h;
  h.model_config = old.attributes["model_config"];
  h.num_layers = old.num_layers, h.top_k = old.top_k, h.num_experts = old.num_experts;
  h.engine = "ref";
  h.tool_version = "test";
  h.router_logits = true;
  h.model_path = "/models/m";
  h.tokenizer_sha256 = std::string(64, 'c');
  h.domain_names = {"new"};
  auto other = h;
  other.engine = "cpu-nf4";
  expect_error([&] { TraceWriter w(path, other, kAppend); }, {path, "another engine"});
  {
    TraceWriter w(path, h, kAppend);
    add(w, make_sequence(5, 4, h, w.domain_id("new")));
  }
  const auto got = analysis::read_trace(path);
  EXPECT_EQ(got.num_tokens(), old.num_tokens() + 4);
  EXPECT_EQ(std::vector<int32_t>(got.tokens.begin(), got.tokens.begin() + old.num_tokens()), old.tokens);
  EXPECT_EQ(got.attributes["model_path"], "/models/m");  // from the first run that records one
  EXPECT_EQ(got.attributes["created"], old.attributes["created"]);
}

TEST(TraceFile, BadSequencesAreRefused) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(true);
  TraceWriter w(path, h);
  auto s = make_sequence(1, 4, h, 0);
  expect_error([&] { w.add_sequence(0, s.tokens, s.experts, s.gates, {}); }, {path, "router logits"});
  expect_error([&] { w.add_sequence(2, s.tokens, s.experts, s.gates, s.logits); }, {path, "domain index 2"});
  s.experts[3] = 4;
  expect_error([&] { add(w, s); }, {path, "expert id 4"});
  const auto long_one = make_sequence(2, 129, h, 0);
  expect_error([&] { add(w, long_one); }, {path, "longer than the window of 128"});
  expect_error([&] { w.domain_id("nope"); }, {"nope"});
  EXPECT_EQ(w.domain_id("b"), 1);
  EXPECT_EQ(w.domain_id(""), -1);
}

TEST(TraceFile, ReadErrorsNameTheFile) {
  TempDir tmp;
  expect_error([&] { analysis::read_trace(tmp.file("absent.h5")); }, {tmp.file("absent.h5")});
  write_text(tmp.file("text.h5"), "not hdf5");
  expect_error([&] { analysis::read_trace(tmp.file("text.h5")); }, {tmp.file("text.h5"), "not an HDF5 file"});
  // An HDF5 file that is not a trace.
  const hid_t f = H5Fcreate(tmp.file("empty.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  H5Fclose(f);
  expect_error([&] { analysis::read_trace(tmp.file("empty.h5")); }, {tmp.file("empty.h5"), "not a moelab trace"});
}

// ---------------------------------------------------------------------------------------------------
// Appending

TEST(TraceAppend, SecondRunIsConcatenated) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  auto h1 = small_header(true, {"a", "b"});
  const std::vector<Sequence> run1{make_sequence(1, 10, h1, 0), make_sequence(2, 5, h1, 1)};
  {
    TraceWriter w(path, h1);
    for (const auto& s : run1) add(w, s);
  }
  // A longer window, domains b (already there) and c (new); a volatile config field differs.
  auto h2 = small_header(true, {"b", "c"});
  h2.window = 256;
  h2.model_config["transformers_version"] = "9.9.9";
  std::vector<Sequence> run2;
  {
    TraceWriter w(path, h2, kAppend);
    EXPECT_TRUE(w.appended());
    EXPECT_FALSE(w.recovered());
    EXPECT_EQ(w.tokens_before(), 15);
    EXPECT_EQ(w.sequences_before(), 2);
    EXPECT_EQ(w.domain_id("b"), 1);  // the file's index, not this run's
    EXPECT_EQ(w.domain_id("c"), 2);
    run2 = {make_sequence(3, 7, h2, w.domain_id("c")), make_sequence(4, 3, h2, w.domain_id("b"))};
    for (const auto& s : run2) add(w, s);
  }
  auto all = run1;
  all.insert(all.end(), run2.begin(), run2.end());
  const auto got = analysis::read_trace(path);
  expect_same_rows(got, expected_trace(all, h1));
  EXPECT_EQ(got.sequence_offsets, (std::vector<int64_t>{0, 10, 15, 22, 25}));
  EXPECT_EQ(got.domain_names, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(got.attributes["engine"], "ref");
  EXPECT_EQ(got.attributes["window"], 256);
  EXPECT_EQ(got.attributes["model_config"]["transformers_version"], "4.57.3");  // the creating run's
  const auto& runs = got.attributes["runs"];
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[1]["engine"], "ref");
  EXPECT_EQ(runs[1]["first_token"], 15);
  EXPECT_EQ(runs[1]["first_sequence"], 2);
}

TEST(TraceAppend, AnotherModelIsRefusedAndTheFileKept) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(true);
  {
    TraceWriter w(path, h);
    add(w, make_sequence(1, 9, h, 0));
  }
  auto more_experts = small_header(true, {"a"}, 2, 8, 2);
  expect_error([&] { TraceWriter w(path, more_experts, kAppend); }, {path, "another model", "num_experts is 4 in the file, 8 here"});
  auto more_layers = small_header(true, {"a"}, 3, 4, 2);
  expect_error([&] { TraceWriter w(path, more_layers, kAppend); }, {path, "num_layers"});
  auto wider = small_header(true);
  wider.model_config["hidden_size"] = 128;  // same shape of trace, another model
  expect_error([&] { TraceWriter w(path, wider, kAppend); }, {path, "another model", "'hidden_size' is 64 in the file, 128 here"});
  auto no_logits = small_header(false);
  expect_error([&] { TraceWriter w(path, no_logits, kAppend); }, {path, "with router logits"});
  const auto got = analysis::read_trace(path);  // untouched, and no longer locked
  EXPECT_EQ(got.num_tokens(), 9);
  EXPECT_EQ(got.attributes["runs"].size(), 1u);
}

// Appending is explicit: an existing file without options.append is refused, untouched; an empty or
// absent one is a new trace either way.
TEST(TraceAppend, ExistingFileNeedsAppend) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(false);
  {
    TraceWriter w(path, h, kAppend);  // absent: created
    EXPECT_FALSE(w.appended());
    add(w, make_sequence(1, 6, h, 0));
  }
  const auto before = read_file_bytes(path);
  expect_error([&] { TraceWriter w(path, h); }, {path, "already exists", "pass --append", "choose another file"});
  expect_error([&] { analysis::check_trace_output(path, false); }, {path, "already exists", "--append"});
  EXPECT_NO_THROW(analysis::check_trace_output(path, true));
  EXPECT_NO_THROW(analysis::check_trace_output(tmp.file("absent.h5"), false));
  EXPECT_EQ(read_file_bytes(path), before);
  const auto notes = tmp.file("notes.h5");
  write_text(notes, "my notes");
  expect_error([&] { TraceWriter w(notes, h); }, {notes, "already exists"});
  EXPECT_EQ(read_file_bytes(notes), "my notes");
  write_text(tmp.file("empty.h5"), "");
  {
    TraceWriter w(tmp.file("empty.h5"), h);
    EXPECT_FALSE(w.appended());
    add(w, make_sequence(2, 3, h, 1));
  }
  EXPECT_EQ(analysis::read_trace(tmp.file("empty.h5")).num_tokens(), 3);
  {
    TraceWriter w(path, h, kAppend);
    EXPECT_TRUE(w.appended());
    add(w, make_sequence(3, 4, h, 1));
  }
  EXPECT_EQ(analysis::read_trace(path).num_tokens(), 10);
}

// Another engine, tokenizer or model directory than the trace records: refused, naming both, the file
// untouched (before, the engines were joined into "ref,cpu-nf4" and statistics pooled both).
TEST(TraceAppend, AnotherEngineTokenizerOrModelPathIsRefused) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  auto h = small_header(true);
  h.model_path = "/models/a";
  h.tokenizer_sha256 = std::string(64, 'a');
  h.inputs = {"/in/x.jsonl"};
  {
    TraceWriter w(path, h);
    add(w, make_sequence(1, 5, h, 0));
  }
  const auto before = read_file_bytes(path);
  auto other = h;
  other.engine = "cpu-nf4";
  expect_error([&] { TraceWriter w(path, other, kAppend); },
               {path, "another engine", "\"ref\" in the file", "\"cpu-nf4\" here", "--engine ref"});
  other = h;
  other.model_path = "/models/b";
  expect_error([&] { TraceWriter w(path, other, kAppend); },
               {path, "another model", "model_path is /models/a in the file, /models/b here"});
  other = h;
  other.tokenizer_sha256 = std::string(64, 'b');
  expect_error([&] { TraceWriter w(path, other, kAppend); },
               {path, "another tokenizer", std::string(64, 'a') + " in the file", std::string(64, 'b') + " here"});
  EXPECT_EQ(read_file_bytes(path), before);
  // The same of all three appends; the inputs of both runs are recorded.
  auto same = h;
  same.inputs = {"/in/x.jsonl", "/in/y.txt"};
  {
    TraceWriter w(path, same, kAppend);
    add(w, make_sequence(2, 4, h, 1));
  }
  const auto a = analysis::read_trace(path).attributes;
  EXPECT_EQ(a["engine"], "ref");
  EXPECT_EQ(a["model_path"], "/models/a");
  EXPECT_EQ(a["tokenizer_sha256"], std::string(64, 'a'));
  EXPECT_EQ(a["inputs"], nlohmann::json({"/in/x.jsonl", "/in/y.txt"}));
  ASSERT_EQ(a["runs"].size(), 2u);
  EXPECT_EQ(a["runs"][0]["inputs"], nlohmann::json({"/in/x.jsonl"}));
  EXPECT_EQ(a["runs"][1]["inputs"], nlohmann::json({"/in/x.jsonl", "/in/y.txt"}));
}

TEST(TraceAppend, NonTraceFilesAreNeverOverwritten) {
  TempDir tmp;
  const auto text = tmp.file("notes.h5");
  write_text(text, "my notes");
  expect_error([&] { TraceWriter w(text, small_header(false), kAppend); }, {text, "not an HDF5 file"});
  EXPECT_EQ(read_file_bytes(text), "my notes");
  const auto other = tmp.file("other.h5");
  H5Fclose(H5Fcreate(other.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT));
  expect_error([&] { TraceWriter w(other, small_header(false), kAppend); }, {other, "not a moelab trace"});
}

TEST(TraceAppend, OneWriterAtATime) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  TraceWriter first(path, small_header(false));
  expect_error([&] { TraceWriter second(path, small_header(false)); }, {path, "another process is writing"});
  first.close();
}

// Rows past the last sequence offset (as a writer that died mid-flush leaves them) are invisible to the
// reader and dropped by the next append.
TEST(TraceAppend, UncommittedRowsAreIgnoredThenDropped) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(false);
  const auto s1 = make_sequence(1, 6, h, 0);
  {
    TraceWriter w(path, h);
    add(w, s1);
  }
  {  // three more rows in every row dataset, no new offset
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    for (const char* name : {"tokens", "experts", "gates"}) {
      const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
      hsize_t dims[3];
      const hid_t s = H5Dget_space(d);
      const int rank = H5Sget_simple_extent_dims(s, dims, nullptr);
      dims[0] += 3;
      ASSERT_GE(H5Dset_extent(d, dims), 0);
      (void)rank;
      H5Sclose(s), H5Dclose(d);
    }
    H5Fclose(f);
  }
  EXPECT_EQ(analysis::read_trace(path).num_tokens(), 6);
  const auto s2 = make_sequence(2, 4, h, 1);
  {
    TraceWriter w(path, h, kAppend);
    EXPECT_EQ(w.dropped_tokens(), 3);
    add(w, s2);
  }
  expect_same_rows(analysis::read_trace(path), expected_trace({s1, s2}, h));
}

// ---------------------------------------------------------------------------------------------------
// Crash safety

bool plain_hdf5_open_works(const std::string& path) {
  H5E_auto2_t func;
  void* data;
  H5Eget_auto2(H5E_DEFAULT, &func, &data);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f >= 0) H5Fclose(f);
  H5Eset_auto2(H5E_DEFAULT, func, data);
  return f >= 0;
}

// Sequence i of the crash tests: 1 + (i * 37) % 90 tokens, so flushes cross chunk boundaries unevenly.
Sequence crash_sequence(int i, const TraceHeader& h) { return make_sequence(uint64_t(1000 + i), 1 + (i * 37) % 90, h, i % 2); }

void expect_prefix_of_crash_sequences(const TraceData& got, int64_t sequences, const TraceHeader& h) {
  std::vector<Sequence> want;
  for (int i = 0; i < sequences; ++i) want.push_back(crash_sequence(i, h));
  expect_same_rows(got, expected_trace(want, h));
}

// When MOELAB_TRACE_KEEP_DIR is set (by the h5py check in ctest, tests/h5py_read_trace.py), a copy of
// a crashed trace, NAME.h5, is left there with NAME.json: the facts a reader must find in it.
void keep_for_h5py(const std::string& path, const TraceData& got, const std::string& name) {
  const char* dir = std::getenv("MOELAB_TRACE_KEEP_DIR");
  if (!dir) return;
  fs::copy_file(path, fs::path(dir) / (name + ".h5"), fs::copy_options::overwrite_existing);
  const size_t lk = size_t(got.num_layers) * size_t(got.top_k), rows = std::min<size_t>(3, got.tokens.size());
  nlohmann::json j;
  j["crashed"] = true;
  j["num_layers"] = got.num_layers;
  j["top_k"] = got.top_k;
  j["num_experts"] = got.num_experts;
  j["router_logits"] = got.has_router_logits();
  j["sequence_offsets"] = got.sequence_offsets;
  j["sequence_domain"] = got.sequence_domain;
  j["domain_names"] = got.domain_names;
  j["tokens"] = got.tokens;
  j["experts_first_rows"] = std::vector<int>(got.experts.begin(), got.experts.begin() + int64_t(rows * lk));
  j["gates_first_rows"] = std::vector<float>(got.gates.begin(), got.gates.begin() + int64_t(rows * lk));
  // The float32 logits that went in for token 0 (the file holds their float16 rounding).
  const auto s0 = crash_sequence(0, small_header(true));
  j["router_logits_row0_float32"] =
      std::vector<float>(s0.logits.begin(), s0.logits.begin() + got.num_layers * got.num_experts);
  std::ofstream(fs::path(dir) / (name + ".json")) << j.dump(1);
}

// A writer flushes 10 sequences, buffers 5 more, and dies without closing: the file holds exactly the
// 10, is readable by us and by any SWMR reader, refuses plain readers until repaired, and can be
// appended to.
TEST(TraceCrash, DeathAfterFlushKeepsEveryFlushedSequence) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(true);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    try {
      TraceWriter w(path, h, TraceWriterOptions{.flush_tokens = 1 << 30, .flush_seconds = 1e9, .chunk_tokens = 64});
      for (int i = 0; i < 10; ++i) add(w, crash_sequence(i, h));
      w.flush();
      for (int i = 10; i < 15; ++i) add(w, crash_sequence(i, h));
      ::kill(::getpid(), SIGKILL);  // no destructors, no close
    } catch (...) {
    }
    ::_exit(3);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "the writer should have been killed";

  const auto got = analysis::read_trace(path);
  EXPECT_EQ(got.num_sequences(), 10);
  expect_prefix_of_crash_sequences(got, 10, h);
  keep_for_h5py(path, got, "crashed");
  // What HDF5 1.10 does with a dead SWMR writer's file: plain opens are refused (h5py needs swmr=True)...
  EXPECT_FALSE(plain_hdf5_open_works(path));
  // ... until it is repaired (or appended to).
  EXPECT_EQ(analysis::repair_trace(path), 0);
  EXPECT_TRUE(plain_hdf5_open_works(path));
  expect_prefix_of_crash_sequences(analysis::read_trace(path), 10, h);
}

TEST(TraceCrash, AppendingToACrashedTraceRecovers) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(true);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    try {
      TraceWriter w(path, h, TraceWriterOptions{.flush_tokens = 1 << 30, .flush_seconds = 1e9});
      for (int i = 0; i < 4; ++i) add(w, crash_sequence(i, h));
      w.flush();
      add(w, crash_sequence(4, h));
      ::_exit(0);  // dies without closing
    } catch (...) {
    }
    ::_exit(3);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_FALSE(plain_hdf5_open_works(path));
  {
    TraceWriter w(path, h, kAppend);
    EXPECT_TRUE(w.recovered());
    EXPECT_EQ(w.sequences_before(), 4);
    for (int i = 4; i < 6; ++i) add(w, crash_sequence(i, h));
  }
  EXPECT_TRUE(plain_hdf5_open_works(path));
  expect_prefix_of_crash_sequences(analysis::read_trace(path), 6, h);
}

// Starts a writer that flushes after every sequence and reports each committed count on a pipe, waits
// for `wait_for` commits, lets it run `delay_us` more, and SIGKILLs it. Returns the last count reported;
// the writer may die between committing and reporting, so the file may hold one more.
// The kill comes `cycle_fraction` of one commit cycle after the writer reports sequence `wait_for` committed;
// the cycle is measured from the writer's own reports, so the kills spread over its write-flush-commit
// cycle whatever the build's speed (a sanitizer build is several times slower: fixed microsecond delays
// then all landed before the next flush began).
int32_t kill_busy_writer(const std::string& path, const TraceHeader& h, int wait_for, double cycle_fraction,
                         int64_t chunk_tokens = 64) {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe");
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork");
  if (pid == 0) {
    ::close(fds[0]);
    try {
      TraceWriter w(path, h, TraceWriterOptions{.flush_tokens = 1, .chunk_tokens = chunk_tokens});
      for (int i = 0;; ++i) {
        add(w, crash_sequence(i, h));  // flushes: committed
        const int32_t committed = i + 1;
        if (::write(fds[1], &committed, sizeof committed) != sizeof committed) break;
      }
    } catch (...) {
    }
    ::_exit(3);
  }
  ::close(fds[1]);
  int32_t last = 0;
  std::chrono::steady_clock::time_point first_report, last_report;
  while (last < wait_for && ::read(fds[0], &last, sizeof last) == sizeof last) {
    last_report = std::chrono::steady_clock::now();
    if (last == 1) first_report = last_report;
  }
  const auto cycle = last > 1 ? (last_report - first_report) / (last - 1) : std::chrono::steady_clock::duration{};
  std::this_thread::sleep_for(std::chrono::duration_cast<std::chrono::nanoseconds>(cycle * cycle_fraction));
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  int32_t v;
  while (::read(fds[0], &v, sizeof v) == sizeof v) last = v;  // reports written before the kill
  ::close(fds[0]);
  EXPECT_TRUE(WIFSIGNALED(status)) << "the writer ended on its own";
  return last;
}

// Writers killed at arbitrary moments while flushing after every sequence (so the kill usually lands
// inside HDF5). Almost always the file reads at once and holds exactly the sequences committed before
// the kill, bit for bit. Rarely the kill tears a chunk-index block that spans a 4 KiB page; then
// read_trace refuses, naming --repair, and the repair keeps a consistent prefix of the sequences.
// Either way the trace can be continued.
// A kill "mid-flush" is one that leaves rows past the last committed offset (the rows of a flush written,
// its commit not): the reopening writer reports them as dropped_tokens(). The test asserts that such kills
// happen, so it exercises the hazard it is about. MOELAB_TRACE_CRASH_TRIALS=N runs N kills instead of the
// default (the figure in analysis/trace.hpp was measured that way).
// Measured with fixed 0-3 ms delays: 2358 of 3400 kills landed mid-flush (69%); with the kill at a random
// fraction of the measured commit cycle (as now): 44 of 60 (73%, release build). The test asks for one in
// six (2 of the default 12): with about 70% per kill, fewer happens with probability about 2e-5.
// On a loaded machine the measured cycle can mislead (the writer descheduled during the first cycles):
// a sanitizer build beside other builds saw 1 of 12. So the test keeps killing, up to four times the
// trials, until it has its mid-flush kills; every kill, counted or not, must leave a consistent file.
constexpr int kDefaultCrashTrials = 12, kMinMidFlush = 2;
TEST(TraceCrash, KilledAtRandomMomentsTheFileStaysConsistent) {
  TempDir tmp;
  const auto h = small_header(true);
  std::mt19937 rng(42);
  const char* env = std::getenv("MOELAB_TRACE_CRASH_TRIALS");
  const int trials = env && *env ? std::max(1, std::atoi(env)) : kDefaultCrashTrials;
  int killed_mid_flush = 0, torn = 0, kills = 0;
  const int wanted_mid_flush = kMinMidFlush * trials / kDefaultCrashTrials;
  for (int trial = 0; trial < trials || (killed_mid_flush < wanted_mid_flush && trial < 4 * trials); ++trial) {
    ++kills;
    SCOPED_TRACE("trial " + std::to_string(trial));
    const auto path = tmp.file("t" + std::to_string(trial % 8) + ".h5");
    fs::remove(path);
    const int32_t last = kill_busy_writer(path, h, 3 + (trial % 6) * 7, double(rng() % 1000) / 1000);

    TraceData got;
    bool repaired = false;
    try {
      got = analysis::read_trace(path);
      EXPECT_GE(got.num_sequences(), last);
      EXPECT_LE(got.num_sequences(), last + 1);
      if (trial == 5) keep_for_h5py(path, got, "killed");
    } catch (const Error& e) {
      ++torn, repaired = true;
      EXPECT_NE(std::string(e.what()).find("--repair"), std::string::npos) << e.what();
      analysis::repair_trace(path);
      got = analysis::read_trace(path);
      EXPECT_LE(got.num_sequences(), last + 1);
    }
    expect_prefix_of_crash_sequences(got, got.num_sequences(), h);
    // And it can be continued.
    {
      TraceWriter w(path, h, kAppend);
      EXPECT_EQ(w.recovered(), !repaired);  // still marked by the dead writer, unless repaired above
      if (w.dropped_tokens() > 0) ++killed_mid_flush;
      add(w, crash_sequence(int(got.num_sequences()), h));
    }
    expect_prefix_of_crash_sequences(analysis::read_trace(path), got.num_sequences() + 1, h);
  }
  std::printf("[ info     ] of %d kills, %d landed mid-flush (rows past the last offset), %d tore a block\n", kills,
              killed_mid_flush, torn);
  EXPECT_GE(killed_mid_flush, wanted_mid_flush) << "too few kills landed mid-flush in " << kills << " kills";
}

// The rare torn block, made on purpose: a killed writer's file whose last chunk-index data block is
// damaged. Reading refuses quickly (HDF5's SWMR reader would otherwise retry for ever) and names
// --repair; the repair keeps the sequences before the damage, bit for bit, and the trace continues.
TEST(TraceCrash, TornIndexBlockIsSalvagedByRepair) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(true);
  const int32_t last = kill_busy_writer(path, h, 40, 0, /*chunk_tokens=*/16);
  std::string bytes = read_file_bytes(path);
  // The first extensible-array data block (chunk addresses): every one of its chunks is committed data. The
  // last one could hold only chunks of the flush the kill cut short, past what was committed; damage there
  // was never read (1 run in 25 beside a busy process, and once in a fresh Debian root).
  const size_t block = bytes.find("EADB");
  ASSERT_NE(block, std::string::npos) << "no chunk-index data block; the test needs a longer trace";
  bytes[block + 24] = char(bytes[block + 24] ^ 0x5a);
  write_text(path, bytes);

  const auto t0 = std::chrono::steady_clock::now();
  expect_error([&] { analysis::read_trace(path); }, {path, "--repair"});
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20));
  const int64_t dropped = analysis::repair_trace(path);
  EXPECT_GT(dropped, 0);
  EXPECT_TRUE(plain_hdf5_open_works(path));
  const auto got = analysis::read_trace(path);
  EXPECT_GE(got.num_sequences(), 1);
  EXPECT_LT(got.num_sequences(), last);
  expect_prefix_of_crash_sequences(got, got.num_sequences(), h);
  EXPECT_EQ(got.attributes["tool_version"], "test");  // attributes survive the rewrite
  EXPECT_EQ(got.attributes["runs"].size(), 1u);
  {
    TraceWriter w(path, h, kAppend);
    EXPECT_FALSE(w.recovered());
    add(w, crash_sequence(int(got.num_sequences()), h));
  }
  expect_prefix_of_crash_sequences(analysis::read_trace(path), got.num_sequences() + 1, h);
}

// ---------------------------------------------------------------------------------------------------
// Through the reference engine

struct Fixture {
  std::unique_ptr<Checkpoint> ck;
  std::unique_ptr<ref::Model<float>> engine;
  explicit Fixture(const std::string& name) : ck(Checkpoint::open(model_dir(name))), engine(std::make_unique<ref::Model<float>>(*ck)) {}
};

// The routing a trace records for a window is what a direct forward of that window reports.
void expect_window_matches_forward(const TraceData& got, int64_t seq, Engine& engine, bool logits) {
  const int64_t a = got.sequence_offsets[size_t(seq)], b = got.sequence_offsets[size_t(seq) + 1];
  const std::vector<int32_t> ids(got.tokens.begin() + a, got.tokens.begin() + b);
  engine.reset();
  const auto rec = analysis::ForwardRecord::run(engine, ids);
  for (int64_t t = a; t < b; ++t)
    for (int l = 0; l < got.num_layers; ++l) {
      for (int j = 0; j < got.top_k; ++j) {
        ASSERT_EQ(int(got.expert(t, l, j)), rec.layers[size_t(l)].experts(t - a, j)) << "token " << t << " layer " << l;
        ASSERT_EQ(got.gate(t, l, j), rec.layers[size_t(l)].gates(t - a, j)) << "token " << t << " layer " << l;
      }
      if (!logits) continue;
      for (int e = 0; e < got.num_experts; ++e)
        ASSERT_EQ(got.router_logit(t, l, e), half_to_float(float_to_half((*rec.layers[size_t(l)].router_logits)(t - a, e))));
    }
}

TEST(TraceEngine, RecordedRoutingEqualsADirectForward) {
  TempDir tmp;
  Fixture fx("mixtral-4e-gqa-f32");
  const auto& cfg = fx.ck->config();
  const Tokenizer tok(fx.ck->tokenizer_path());
  const auto ids = tok.encode("The license grants permission to copy, modify and distribute the software.", true);
  ASSERT_GT(ids.size(), 12u);
  TraceHeader h = small_header(true, {"law"});
  h.num_layers = cfg.num_layers, h.top_k = cfg.top_k, h.num_experts = cfg.num_experts;
  const auto path = tmp.file("t.h5");
  {
    TraceWriter w(path, h);
    // Two windows of one text: [0, 9) and [9, n), each from an empty cache.
    for (auto [a, b] : {std::pair<size_t, size_t>{0, 9}, {9, ids.size()}}) {
      const std::vector<int32_t> win(ids.begin() + int64_t(a), ids.begin() + int64_t(b));
      const auto r = analysis::route_window(*fx.engine, win, true);
      w.add_sequence(0, win, r.experts, r.gates, r.router_logits);
    }
  }
  const auto got = analysis::read_trace(path);
  ASSERT_EQ(got.num_sequences(), 2);
  EXPECT_EQ(got.tokens, ids);
  for (int64_t s = 0; s < 2; ++s) expect_window_matches_forward(got, s, *fx.engine, true);
  // Not all tokens choose the same experts (the check above would be weak otherwise).
  std::set<int> first_choices;
  for (int64_t t = 0; t < got.num_tokens(); ++t) first_choices.insert(got.expert(t, 0, 0));
  EXPECT_GT(first_choices.size(), 1u);
}

TEST(TraceEngine, DenseModelHasOneExpertAndNoRouterLogits) {
  Fixture fx("mistral-dense");
  const std::vector<int32_t> ids{1, 10, 20, 30};
  const auto r = analysis::route_window(*fx.engine, ids, false);
  EXPECT_EQ(r.experts, std::vector<uint8_t>(4 * size_t(fx.ck->config().num_layers), 0));
  EXPECT_EQ(r.gates, std::vector<float>(4 * size_t(fx.ck->config().num_layers), 1.0f));
  expect_error([&] { analysis::route_window(*fx.engine, ids, true); }, {"router logits"});
}

// ---------------------------------------------------------------------------------------------------
// Inputs

TEST(TraceInputs, PlainFilesAndJsonl) {
  TempDir tmp;
  write_text(tmp.file("gpl.txt"), "whole file\nis one text\n");
  write_text(tmp.file("mix.jsonl"), "{\"text\": \"a\", \"domain\": \"code\"}\r\n\n  \n{\"text\": \"b\"}\n{\"text\": \"c\", \"domain\": null}");
  auto t = analysis::read_trace_inputs({tmp.file("gpl.txt"), tmp.file("mix.jsonl")}, {});
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].text, "whole file\nis one text\n");
  EXPECT_EQ(t[0].domain, "gpl");  // the stem
  EXPECT_EQ(t[1].text, "a");
  EXPECT_EQ(t[1].domain, "code");  // the record's own
  EXPECT_EQ(t[1].source, tmp.file("mix.jsonl") + ":1");
  EXPECT_EQ(t[2].domain, "mix");
  EXPECT_EQ(t[2].source, tmp.file("mix.jsonl") + ":4");  // blank lines counted, skipped
  EXPECT_EQ(t[3].domain, "mix");
  t = analysis::read_trace_inputs({tmp.file("gpl.txt"), tmp.file("mix.jsonl")}, {"legal", "misc"});
  EXPECT_EQ(t[0].domain, "legal");
  EXPECT_EQ(t[1].domain, "code");
  EXPECT_EQ(t[2].domain, "misc");
}

TEST(TraceInputs, ErrorsNameFileAndLine) {
  TempDir tmp;
  const auto f = tmp.file("bad.jsonl");
  const auto check = [&](const std::string& content, const std::vector<std::string>& needles) {
    write_text(f, content);
    expect_error([&] { analysis::read_trace_inputs({f}, {}); }, needles);
  };
  check("{\"text\": \"ok\"}\n{\"text\": \"unterminated}\n", {f + ":2", "not valid JSON"});
  check("{\"text\": \"ok\"}\n\n{\"domain\": \"x\"}\n", {f + ":3", "no \"text\""});
  check("[1, 2]\n", {f + ":1", "JSON object"});
  check("{\"text\": 5}\n", {f + ":1", "\"text\" must be a string"});
  check("{\"text\": \"a\", \"domain\": 3}\n", {f + ":1", "\"domain\" must be a string"});
  expect_error([&] { analysis::read_trace_inputs({tmp.file("absent.txt")}, {}); }, {tmp.file("absent.txt"), "cannot open"});
  write_text(tmp.file("a.txt"), "x");
  expect_error([&] { analysis::read_trace_inputs({tmp.file("a.txt"), tmp.file("a.txt")}, {"one"}); },
               {"1 --domain", "2 --input"});
}

// ---------------------------------------------------------------------------------------------------
// The CLI

struct CliRun {
  int exit_code;
  std::string out, err;
};

CliRun moelab(const TempDir& tmp, const std::string& args) {
  const auto out = tmp.file("stdout.txt"), err = tmp.file("stderr.txt");
  const std::string cmd = std::string(MOELAB_BIN) + " " + args + " >" + out + " 2>" + err;
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, read_file_bytes(out), read_file_bytes(err)};
}

void expect_one_line_error(const CliRun& r, const std::vector<std::string>& needles) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.rfind("moelab: error: ", 0), 0u) << r.err;
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
}

// `moelab trace` cuts each text (with BOS) into windows, labels them, and records what a direct forward
// of each window reports; a second run appends; --timings writes the JSON next to the trace.
TEST(TraceCli, WindowsDomainsAppendAndTimings) {
  TempDir tmp;
  const auto model = model_dir("mixtral-4e-gqa-f32");
  const std::string text = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.";
  write_text(tmp.file("mit.txt"), text);
  write_text(tmp.file("more.jsonl"), "{\"text\": \"int main() { return 0; }\", \"domain\": \"code\"}\n");
  const auto out = tmp.file("t.h5");
  auto r = moelab(tmp, fmt::format("trace --model {} --input {} --domain license --output {} --window 16 --router-logits "
                                   "--timings",
                                   model, tmp.file("mit.txt"), out));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("wrote " + out), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("attention ms"), std::string::npos) << r.out;
  const auto timings = nlohmann::json::parse(read_file_bytes(tmp.file("t.timings.json")));
  EXPECT_EQ(timings["format"], "moelab-timings-v1");
  EXPECT_EQ(timings["phases"]["trace"]["layers"].size(), 2u);

  const auto ck = Checkpoint::open(model);
  const auto ids = Tokenizer(ck->tokenizer_path()).encode(text, true);
  auto got = analysis::read_trace(out);
  EXPECT_EQ(got.tokens, ids);
  ASSERT_EQ(got.num_sequences(), int64_t((ids.size() + 15) / 16));
  for (int64_t s = 0; s + 1 < got.num_sequences(); ++s) EXPECT_EQ(got.sequence_offsets[size_t(s) + 1], 16 * (s + 1));
  EXPECT_EQ(got.domain_names, std::vector<std::string>{"license"});
  ref::Model<float> engine(*ck);
  for (int64_t s = 0; s < got.num_sequences(); ++s) expect_window_matches_forward(got, s, engine, true);

  const auto sha = analysis::sha256_file(ck->tokenizer_path());
  EXPECT_EQ(got.attributes["model_path"], fs::absolute(model).lexically_normal().string());
  EXPECT_EQ(got.attributes["tokenizer_sha256"], sha);
  EXPECT_EQ(got.attributes["inputs"], nlohmann::json({tmp.file("mit.txt")}));

  // Into the same file: without --append, one line and nothing written; with another engine, refused.
  const auto before = read_file_bytes(out);
  expect_one_line_error(moelab(tmp, fmt::format("trace --model {} --input {} --output {} --router-logits", model,
                                                tmp.file("more.jsonl"), out)),
                        {out, "already exists", "--append"});
  expect_one_line_error(moelab(tmp, fmt::format("trace --model {} --input {} --output {} --router-logits --append "
                                                "--engine cpu-nf4", model, tmp.file("more.jsonl"), out)),
                        {out, "another engine", "\"ref\" in the file", "\"cpu-nf4\" here"});
  EXPECT_EQ(read_file_bytes(out), before);
  r = moelab(tmp, fmt::format("trace --model {} --input {} --output {} --router-logits --max-tokens 5 --append", model,
                              tmp.file("more.jsonl"), out));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("appended to " + out), std::string::npos) << r.out;
  got = analysis::read_trace(out);
  EXPECT_EQ(got.num_tokens(), int64_t(ids.size()) + 5);  // --max-tokens cut the second run
  EXPECT_EQ(got.domain_names, (std::vector<std::string>{"license", "code"}));
  EXPECT_EQ(got.sequence_domain.back(), 1);
  EXPECT_EQ(got.attributes["inputs"], nlohmann::json({tmp.file("mit.txt"), tmp.file("more.jsonl")}));
  EXPECT_EQ(got.attributes["tokenizer_sha256"], sha);
}

TEST(TraceCli, BadInputsAreOneLineErrors) {
  TempDir tmp;
  const auto model = model_dir("mixtral-4e-gqa-f32");
  write_text(tmp.file("bad.jsonl"), "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n");
  expect_one_line_error(moelab(tmp, fmt::format("trace --model {} --input {} --output {}", model, tmp.file("bad.jsonl"),
                                                tmp.file("t.h5"))),
                        {tmp.file("bad.jsonl") + ":2", "text"});
  EXPECT_FALSE(fs::exists(tmp.file("t.h5"))) << "nothing is written when the inputs are bad";
  expect_one_line_error(moelab(tmp, fmt::format("trace --model {} --input {} --output {}", model, tmp.file("nope.txt"),
                                                tmp.file("t.h5"))),
                        {tmp.file("nope.txt")});
  write_text(tmp.file("a.txt"), "hello");
  expect_one_line_error(moelab(tmp, fmt::format("trace --model {} --input {} --domain x --domain y --output {}", model,
                                                tmp.file("a.txt"), tmp.file("t.h5"))),
                        {"2 --domain", "1 --input"});
  // A trace of one model, then an append with another.
  ASSERT_EQ(moelab(tmp, fmt::format("trace --model {} --input {} --output {}", model, tmp.file("a.txt"), tmp.file("t.h5"))).exit_code, 0);
  expect_one_line_error(moelab(tmp, fmt::format("trace --model {} --input {} --output {} --append",
                                                model_dir("mixtral-8e-bf16-sharded"), tmp.file("a.txt"), tmp.file("t.h5"))),
                        {tmp.file("t.h5"), "another model"});
  EXPECT_EQ(analysis::read_trace(tmp.file("t.h5")).num_sequences(), 1);
  expect_one_line_error(moelab(tmp, fmt::format("trace --model {} --input {} --output {} --router-logits",
                                                model_dir("mistral-dense"), tmp.file("a.txt"), tmp.file("d.h5"))),
                        {"--router-logits", "MoE"});
}

TEST(TraceCli, ProfilePrintsPrefillAndDecode) {
  TempDir tmp;
  const auto r = moelab(tmp, fmt::format("profile --model {} --n-prompt 20 --n-gen 3 --repetitions 2 --json {}",
                                         model_dir("mixtral-4e-gqa-f32"), tmp.file("p.json")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("prefill: 2 calls, 40 tokens"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("decode: 6 calls, 6 tokens"), std::string::npos) << r.out;
  const auto j = nlohmann::json::parse(read_file_bytes(tmp.file("p.json")));
  EXPECT_EQ(j["phases"]["prefill"]["tokens"], 40);
  EXPECT_EQ(j["phases"]["decode"]["calls"], 6);
}

// ---------------------------------------------------------------------------------------------------
// Write errors and damaged files (issue 13, items 4 and 5): one clear line, never a crash or a hang

// The CLI run without a shell: argv, stdout and stderr to files, an optional file-size limit (with
// SIGXFSZ ignored, a write past it fails with EFBIG, as on a full disk), killed after `timeout_s`.
struct Spawned {
  int exit_code = -1;  // -1: killed by a signal or by the timeout
  int signal = 0;
  bool timed_out = false;
  double seconds = 0;
  std::string out, err;
};

Spawned spawn_moelab(const TempDir& tmp, const std::vector<std::string>& args, double timeout_s = 60,
                     rlim_t file_size_limit = RLIM_INFINITY) {
  const auto out = tmp.file("spawn.out"), err = tmp.file("spawn.err");
  std::vector<std::string> argv_s{MOELAB_BIN};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork");
  if (pid == 0) {
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0 || ::dup2(o, 1) < 0 || ::dup2(e, 2) < 0) ::_exit(126);
    if (file_size_limit != RLIM_INFINITY) {
      ::signal(SIGXFSZ, SIG_IGN);
      const rlimit lim{file_size_limit, file_size_limit};
      if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) ::_exit(126);
    }
    ::execv(argv[0], argv.data());
    const std::string why = std::string("cannot run ") + argv[0] + ": " + std::strerror(errno) + "\n";
    if (::write(2, why.data(), why.size()) < 0) ::_exit(127);
    ::_exit(127);
  }
  Spawned r;
  int status = 0;
  for (;;) {
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) break;
    if (std::chrono::steady_clock::now() - t0 > std::chrono::duration<double>(timeout_s)) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      r.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!r.timed_out && WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.out = read_file_bytes(out);
  r.err = read_file_bytes(err);
  return r;
}

// Exit status 1 and exactly one line on stderr, "moelab: error: ...", holding every needle. Callers pass
// --progress none: a run slower than 10 s (a sanitizer build on a busy machine) prints progress lines too.
void expect_clean_failure(const Spawned& r, const std::vector<std::string>& needles) {
  EXPECT_FALSE(r.timed_out) << "still running after " << r.seconds << " s (a hang)";
  EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << "; stderr: " << r.err.substr(0, 2000);
  EXPECT_EQ(r.exit_code, 1) << r.err.substr(0, 2000);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err.substr(0, 2000);
  EXPECT_EQ(r.err.rfind("moelab: error: ", 0), 0u) << r.err.substr(0, 2000);
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
}

// A text of about `words` words, deterministic.
std::string long_text(int words, uint64_t seed) {
  static const char* vocab[] = {"expert", "router", "token", "layer", "sparse", "mixture", "gate", "weight",
                                "the",    "of",     "and",   "a",     "model",  "license", "copy", "software"};
  std::mt19937_64 rng(seed);
  std::string s;
  for (int i = 0; i < words; ++i) s += std::string(vocab[rng() % 16]) + (i % 17 == 16 ? ".\n" : " ");
  return s;
}

// The count in "the N sequences (T tokens) flushed before the error are kept".
int64_t kept_sequences(const std::string& err) {
  std::smatch m;
  if (!std::regex_search(err, m, std::regex(R"(the (\d+) sequences \((\d+) tokens\) flushed before the error are kept)")))
    return -1;
  return std::stoll(m[1].str());
}

// The trace a failed write left holds exactly the sequences it says it kept, and they are the first
// sequences of the same run without the failure, bit for bit.
void expect_failed_trace_keeps_a_prefix(const std::string& path, const Spawned& r, const TraceData* full) {
  const int64_t kept = kept_sequences(r.err);
  ASSERT_GT(kept, 0) << "the limit should allow at least one flush: " << r.err;
  const auto got = analysis::read_trace(path);  // (an SWMR reader: the writer did not close it)
  EXPECT_EQ(got.num_sequences(), kept);
  if (full) {
    ASSERT_GE(full->num_sequences(), kept);
    const auto n = size_t(got.num_tokens());
    EXPECT_EQ(got.tokens, std::vector<int32_t>(full->tokens.begin(), full->tokens.begin() + int64_t(n)));
    const size_t lk = size_t(got.num_layers * got.top_k), le = size_t(got.num_layers * got.num_experts);
    EXPECT_EQ(got.experts, std::vector<uint8_t>(full->experts.begin(), full->experts.begin() + int64_t(n * lk)));
    EXPECT_EQ(got.gates, std::vector<float>(full->gates.begin(), full->gates.begin() + int64_t(n * lk)));
    EXPECT_EQ(got.router_logits, std::vector<float>(full->router_logits.begin(), full->router_logits.begin() + int64_t(n * le)));
    EXPECT_EQ(got.sequence_offsets,
              std::vector<int64_t>(full->sequence_offsets.begin(), full->sequence_offsets.begin() + kept + 1));
  }
}

// Item 4: a file-size limit (what a full disk does to write(): it fails once the file would grow) hit
// in the middle of `moelab trace`. Before: 168 lines of HDF5-DIAG and a segfault in HDF5's shutdown.
TEST(TraceWriteError, FileSizeLimitEndsInOneLineAndKeepsWhatWasFlushed) {
  TempDir tmp;
  write_text(tmp.file("in.txt"), long_text(30000, 7));
  const std::vector<std::string> common{"trace", "--model", model_dir("mixtral-4e-gqa-f32"), "--input", tmp.file("in.txt"),
                                        "--router-logits", "--window", "64", "--progress", "none", "--output"};
  auto args = common;
  args.push_back(tmp.file("full.h5"));
  const auto whole = spawn_moelab(tmp, args, 300);
  ASSERT_EQ(whole.exit_code, 0) << whole.err;
  const auto full = analysis::read_trace(tmp.file("full.h5"));
  ASSERT_GT(fs::file_size(tmp.file("full.h5")), 3 * 200u * 1024) << "the input should need more than the limit";

  args = common;
  args.push_back(tmp.file("t.h5"));
  const auto r = spawn_moelab(tmp, args, 300, 200 * 1024);
  expect_clean_failure(r, {tmp.file("t.h5"), "File too large", "flushed before the error are kept", "--repair"});
  EXPECT_EQ(r.err.find("HDF5-DIAG"), std::string::npos) << r.err;
  expect_failed_trace_keeps_a_prefix(tmp.file("t.h5"), r, &full);
  // --repair makes it a plain HDF5 file with the same sequences.
  const auto repaired = spawn_moelab(tmp, {"trace", "--repair", tmp.file("t.h5")}, 60);
  EXPECT_EQ(repaired.exit_code, 0) << repaired.err;
  EXPECT_TRUE(plain_hdf5_open_works(tmp.file("t.h5")));
  EXPECT_EQ(analysis::read_trace(tmp.file("t.h5")).num_sequences(), kept_sequences(r.err));
}

// Item 4 on a real full filesystem: a 256 KiB tmpfs (needs root; skipped where mounting is refused).
TEST(TraceWriteError, FullFilesystemEndsInOneLineAndKeepsWhatWasFlushed) {
  TempDir tmp;
  const auto dir = tmp.file("small-fs");
  fs::create_directories(dir);
  if (::mount("tmpfs", dir.c_str(), "tmpfs", 0, "size=256k") != 0)
    GTEST_SKIP() << "cannot mount a small tmpfs here (" << std::strerror(errno) << "; needs root and mount rights)";
  struct Unmount {
    std::string dir;
    ~Unmount() { ::umount2(dir.c_str(), MNT_DETACH); }
  } unmount{dir};
  write_text(tmp.file("in.txt"), long_text(40000, 8));
  const auto out = dir + "/t.h5";
  const auto r = spawn_moelab(tmp, {"trace", "--model", model_dir("mixtral-4e-gqa-f32"), "--input", tmp.file("in.txt"),
                                    "--router-logits", "--window", "64", "--progress", "none", "--output", out},
                              300);
  expect_clean_failure(r, {out, "No space left on device", "flushed before the error are kept"});
  EXPECT_EQ(r.err.find("HDF5-DIAG"), std::string::npos) << r.err;
  expect_failed_trace_keeps_a_prefix(out, r, nullptr);
}

// The library's side of item 4, in a child process with a file-size limit: the failing add_sequence
// throws one line, later calls repeat it, the destructor is quiet, reading in the same process sees the
// flushed sequences, writing the file again in that process is refused (HDF5 still holds it), and a
// new process (this one) reads it and appends to it.
TEST(TraceWriteError, FailedWriterAbandonsTheFileCleanly) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(true);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    const rlimit lim{60 * 1024, 60 * 1024};
    if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) ::_exit(10);
    std::string failure;
    int64_t kept = -1;
    try {
      TraceWriter w(path, h, TraceWriterOptions{.flush_tokens = 200});
      try {
        for (int i = 0; i < 100000; ++i) add(w, crash_sequence(i, h));
        ::_exit(11);  // never failed
      } catch (const Error& e) {
        failure = e.what();
      }
      if (failure.find('\n') != std::string::npos || failure.find("File too large") == std::string::npos) ::_exit(12);
      kept = kept_sequences(failure);
      if (kept <= 0) ::_exit(13);
      try {  // later calls repeat the error
        w.flush();
        ::_exit(14);
      } catch (const Error& e) {
        if (e.what() != failure) ::_exit(15);
      }
    } catch (...) {
      ::_exit(16);  // the destructor must not throw, and nothing else may fail
    }
    try {
      if (analysis::read_trace(path).num_sequences() != kept) ::_exit(17);
    } catch (...) {
      ::_exit(18);
    }
    try {
      TraceWriter again(path, h);
      ::_exit(19);
    } catch (const Error& e) {
      if (std::string(e.what()).find("failed earlier in this process") == std::string::npos) ::_exit(20);
    }
    ::_exit(int(std::min<int64_t>(kept, 100) + 100));  // 101..200: the sequences kept
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << "the child crashed (signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0) << ")";
  const int code = WEXITSTATUS(status);
  ASSERT_GT(code, 100) << "child check " << code << " failed (see the _exit codes above)";
  const int64_t kept = code - 100;
  ASSERT_LT(kept, 100);
  expect_prefix_of_crash_sequences(analysis::read_trace(path), kept, h);
  {
    TraceWriter w(path, h, kAppend);
    EXPECT_TRUE(w.recovered());
    add(w, crash_sequence(int(kept), h));
  }
  expect_prefix_of_crash_sequences(analysis::read_trace(path), kept + 1, h);
}

// Strings are stored fixed-length (nothing in a trace needs HDF5's global heap, whose damage libhdf5
// 1.10 does not survive).
TEST(TraceCorrupt, StringAttributesAreFixedLength) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(false, {"a", "", "longer name"});
  {
    TraceWriter w(path, h);
    add(w, make_sequence(1, 5, h, 1));  // ("" is no name: "longer name" is domain 1)
  }
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  int strings = 0;
  const auto check = [&](hid_t obj, const char* name) {
    const hid_t a = H5Aopen(obj, name, H5P_DEFAULT), t = H5Aget_type(a);
    if (H5Tget_class(t) == H5T_STRING) {
      ++strings;
      EXPECT_EQ(H5Tis_variable_str(t), 0) << name << " is variable-length";
    }
    H5Tclose(t);
    H5Aclose(a);
  };
  for (const char* name : {"model_config", "engine", "tool", "tool_version", "created", "runs", "inputs"}) check(f, name);
  const hid_t d = H5Dopen2(f, "sequence_domain", H5P_DEFAULT);
  check(d, "domain_names");
  H5Dclose(d);
  for (const char* name : {"tokens", "sequence_offsets", "sequence_domain", "experts", "gates", "layer", "rank"}) {
    const hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    check(ds, "description");
    H5Dclose(ds);
  }
  H5Fclose(f);
  EXPECT_EQ(strings, 15);
  const auto got = analysis::read_trace(path);
  EXPECT_EQ(got.domain_names, (std::vector<std::string>{"a", "longer name"}));
  EXPECT_EQ(got.attributes["tool"], "moelab");
  EXPECT_EQ(got.attributes["model_config"], h.model_config);
}

// Rewrites every string attribute of a trace as variable-length, as moelab wrote them before (and as
// h5py writes str attributes): the strings then live in the file's global heap.
void make_strings_variable_length(const std::string& path) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  const hid_t vlen = H5Tcopy(H5T_C_S1);
  H5Tset_size(vlen, H5T_VARIABLE);
  H5Tset_cset(vlen, H5T_CSET_UTF8);
  const auto rewrite = [&](hid_t obj, const char* name) {
    const hid_t a = H5Aopen(obj, name, H5P_DEFAULT), t = H5Aget_type(a), s = H5Aget_space(a);
    const size_t len = H5Tget_size(t);
    const auto n = size_t(H5Sget_simple_extent_npoints(s));
    std::vector<char> buf(n * len + 1, '\0');
    if (n) H5Aread(a, t, buf.data());
    std::vector<std::string> values;
    for (size_t i = 0; i < n; ++i) values.emplace_back(buf.data() + i * len, strnlen(buf.data() + i * len, len));
    const bool scalar = H5Sget_simple_extent_type(s) == H5S_SCALAR;
    H5Aclose(a), H5Tclose(t), H5Sclose(s);
    H5Adelete(obj, name);
    const hsize_t dims = n;
    const hid_t space = scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &dims, nullptr);
    const hid_t na = H5Acreate2(obj, name, vlen, space, H5P_DEFAULT, H5P_DEFAULT);
    std::vector<const char*> ptrs;
    for (const auto& v : values) ptrs.push_back(v.c_str());
    if (n) {
      EXPECT_GE(H5Awrite(na, vlen, ptrs.data()), 0);
    }
    H5Aclose(na), H5Sclose(space);
  };
  for (const char* name : {"model_config", "engine", "tool", "tool_version", "created", "runs"}) rewrite(f, name);
  const hid_t d = H5Dopen2(f, "sequence_domain", H5P_DEFAULT);
  rewrite(d, "domain_names");
  H5Dclose(d);
  H5Tclose(vlen);
  H5Fclose(f);
}

// Traces written before (variable-length strings) read as before, through our own heap reader.
TEST(TraceCorrupt, OldVariableLengthStringsStillRead) {
  TempDir tmp;
  const auto path = tmp.file("t.h5");
  const auto h = small_header(true, {"first", "second domain", "third"});
  std::vector<Sequence> seqs;
  {
    TraceWriter w(path, h);
    for (int i = 0; i < 6; ++i) seqs.push_back(make_sequence(uint64_t(i), 7 + i, h, i % 3)), add(w, seqs.back());
  }
  const auto before = analysis::read_trace(path);
  make_strings_variable_length(path);
  ASSERT_NE(read_file_bytes(path).find("GCOL"), std::string::npos) << "no global heap: the strings are not variable-length";
  const auto after = analysis::read_trace(path);
  EXPECT_EQ(after.attributes, before.attributes);
  EXPECT_EQ(after.domain_names, before.domain_names);
  expect_same_rows(after, expected_trace(seqs, h));
  // And appending to such a file works (its attributes are read, merged, and written back fixed-length).
  {
    TraceWriter w(path, h, kAppend);
    seqs.push_back(make_sequence(99, 3, h, 1));
    add(w, seqs.back());
  }
  expect_same_rows(analysis::read_trace(path), expected_trace(seqs, h));
}

// Item 5: a damaged global heap (variable-length strings). Before: libhdf5 1.10 looped for ever (an
// object header of zeros) or crashed (sizes past the collection). Now each is one line, at once, from
// both `moelab stats` and `moelab trace --repair`.
TEST(TraceCorrupt, DamagedStringHeapIsAClearErrorNotAHang) {
  TempDir tmp;
  const auto good = tmp.file("good.h5");
  const auto h = small_header(false);
  {
    TraceWriter w(good, h);
    add(w, make_sequence(1, 5, h, 0));
  }
  make_strings_variable_length(good);
  const std::string bytes = read_file_bytes(good);
  // The collection holding the string attributes (the dimension labels and scales have their own).
  const size_t heap = bytes.rfind("GCOL", bytes.find("\"architectures\""));
  ASSERT_NE(heap, std::string::npos);
  const auto put64 = [](std::string& b, size_t at, uint64_t v) {
    for (int i = 0; i < 8; ++i) b[at + size_t(i)] = char((v >> (8 * i)) & 0xff);
  };
  // Collection header: "GCOL", version, 3 reserved, size (8 bytes); then objects: index (2), refs (2),
  // reserved (4), size (8), data.
  const std::vector<std::pair<std::string, std::function<void(std::string&)>>> damages = {
      {"first object header zeroed (1.10 loops for ever)", [&](std::string& b) { std::fill_n(b.begin() + int64_t(heap + 16), 16, '\0'); }},
      {"object size past the collection (1.10 overruns)", [&](std::string& b) { put64(b, heap + 24, uint64_t(1) << 40); }},
      {"collection size 17", [&](std::string& b) { put64(b, heap + 8, 17); }},
      {"collection size past the file", [&](std::string& b) { put64(b, heap + 8, uint64_t(1) << 40); }},
      {"signature gone", [&](std::string& b) { b[heap] = 'X'; }},
  };
  for (const auto& [what, damage] : damages) {
    SCOPED_TRACE(what);
    std::string b = bytes;
    damage(b);
    const auto path = tmp.file("bad.h5");
    write_text(path, b);
    auto r = spawn_moelab(tmp, {"stats", path}, 20);
    expect_clean_failure(r, {path, "damaged trace"});
    EXPECT_LT(r.seconds, 10);
    r = spawn_moelab(tmp, {"trace", "--repair", path}, 20);
    expect_clean_failure(r, {path, "damaged trace"});
    expect_error([&] { analysis::read_trace(path); }, {path, "damaged trace", "attribute"});
  }
}

// Truncated files (a copy cut short, a disk that filled without the writer noticing): a clear error at
// any length, quickly.
TEST(TraceCorrupt, TruncatedFilesAreClearErrors) {
  TempDir tmp;
  const auto good = tmp.file("good.h5");
  const auto h = small_header(true);
  {
    TraceWriter w(good, h, TraceWriterOptions{.chunk_tokens = 16});
    for (int i = 0; i < 20; ++i) add(w, crash_sequence(i, h));
  }
  const std::string bytes = read_file_bytes(good);
  for (const size_t keep : {size_t(0), size_t(7), size_t(100), size_t(2048), size_t(4096), bytes.size() / 3,
                            bytes.size() / 2, bytes.size() - 4096, bytes.size() - 1}) {
    SCOPED_TRACE("first " + std::to_string(keep) + " of " + std::to_string(bytes.size()) + " bytes");
    const auto path = tmp.file("cut.h5");
    write_text(path, bytes.substr(0, keep));
    const auto r = spawn_moelab(tmp, {"stats", path}, 20);
    expect_clean_failure(r, {path});
    EXPECT_LT(r.seconds, 10);
  }
  // The same for the file of a writer killed mid-run (opened as an SWMR reader, which skips HDF5's own
  // end-of-file check): it reads, or fails in one line; never a crash or a hang.
  const auto crashed = tmp.file("crashed.h5");
  kill_busy_writer(crashed, h, 30, 0, /*chunk_tokens=*/16);
  const std::string cbytes = read_file_bytes(crashed);
  for (const size_t keep : {size_t(4096), cbytes.size() / 3, cbytes.size() / 2, cbytes.size() - 4096, cbytes.size() - 1}) {
    SCOPED_TRACE("crashed writer's file, first " + std::to_string(keep) + " of " + std::to_string(cbytes.size()) + " bytes");
    const auto path = tmp.file("cut.h5");
    write_text(path, cbytes.substr(0, keep));
    for (const auto& args : {std::vector<std::string>{"stats", path}, std::vector<std::string>{"trace", "--repair", path}}) {
      const auto r = spawn_moelab(tmp, args, 20);
      if (r.exit_code != 0) expect_clean_failure(r, {path});
      EXPECT_LT(r.seconds, 10);
    }
  }
}

// A FIFO or a directory where a trace should be: refused before HDF5 opens it (a FIFO would block the
// open, or fill and block the writer).
TEST(TraceCorrupt, NonRegularFilesAreRefused) {
  TempDir tmp;
  const auto fifo = tmp.file("fifo.h5");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0) << std::strerror(errno);
  write_text(tmp.file("a.txt"), "hello there");
  for (const auto& path : {fifo, tmp.file("")}) {
    SCOPED_TRACE(path);
    for (const auto& args : {std::vector<std::string>{"stats", path}, std::vector<std::string>{"trace", "--repair", path},
                             std::vector<std::string>{"trace", "--model", model_dir("mixtral-4e-gqa-f32"), "--input",
                                                      tmp.file("a.txt"), "--output", path}}) {
      const auto r = spawn_moelab(tmp, args, 30);
      expect_clean_failure(r, {path});
    }
  }
  expect_error([&] { TraceWriter w(fifo, small_header(false)); }, {fifo, "not a regular file"});
  expect_error([&] { analysis::read_trace(fifo); }, {fifo, "not a regular file"});
}

// A trace of two sequences (9 and 4 tokens) under header h, for the tests that damage it.
void write_two_sequences(const std::string& path, const TraceHeader& h) {
  TraceWriter w(path, h);
  add(w, make_sequence(1, 9, h, 0));
  add(w, make_sequence(2, 4, h, 1));
}

// Datasets whose rank or type is not the layout's, and shapes that lie: refused before any read, naming
// the dataset.
TEST(TraceCorrupt, WrongRankTypeOrShapeIsRefused) {
  TempDir tmp;
  const auto h = small_header(true);
  const auto make = [&](const std::string& path) { write_two_sequences(path, h); };
  // Replaces dataset `name` with one of another rank or type.
  const auto replace = [&](const std::string& path, const char* name, hid_t type, std::vector<hsize_t> dims) {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    ASSERT_GE(H5Ldelete(f, name, H5P_DEFAULT), 0);
    const hid_t s = H5Screate_simple(int(dims.size()), dims.data(), nullptr);
    const hid_t d = H5Dcreate2(f, name, type, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(d, 0);
    H5Dclose(d), H5Sclose(s), H5Fclose(f);
  };
  struct Case {
    const char* name;
    hid_t type;
    std::vector<hsize_t> dims;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {"experts", H5T_NATIVE_UINT8, {13, 4}, "/experts has 2 dimensions"},
      {"experts", H5T_NATIVE_FLOAT, {13, 2, 2}, "/experts is not integer"},
      {"gates", H5T_NATIVE_INT32, {13, 2, 2}, "/gates is not floating-point"},
      {"sequence_offsets", H5T_NATIVE_INT64, {3, 1}, "/sequence_offsets has 2 dimensions"},
      {"tokens", H5T_IEEE_F64LE, {13}, "/tokens is not integer"},
      {"router_logits", H5T_NATIVE_FLOAT, {13, 2}, "/router_logits has 2 dimensions"},
      {"gates", H5T_NATIVE_FLOAT, {13, 3, 2}, "/experts and /gates"},
      // Integers of another width or sign: HDF5's conversion saturates, so an int8 -1 read as expert 0 and an
      // int64 token id past 2^31 as 2^31 - 1, silently.
      {"experts", H5T_NATIVE_INT8, {13, 2, 2}, "/experts holds 1-byte signed integers, the format's are 1-byte unsigned"},
      {"tokens", H5T_NATIVE_INT64, {13}, "/tokens holds 8-byte signed integers, the format's are 4-byte signed"},
      {"sequence_offsets", H5T_NATIVE_INT32, {3}, "/sequence_offsets holds 4-byte signed integers, the format's are 8-byte"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.needle);
    const auto path = tmp.file("t.h5");
    fs::remove(path);
    make(path);
    replace(path, c.name, c.type, c.dims);
    expect_error([&] { analysis::read_trace(path); }, {path, c.needle});
  }
  {  // An expert count no trace can have (expert ids are uint8).
    const auto path = tmp.file("e.h5");
    {
      const auto h2 = small_header(false);
      TraceWriter w(path, h2);
      add(w, make_sequence(1, 9, h2, 0));
    }
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const hid_t a = H5Aopen(f, "num_experts", H5P_DEFAULT);
    const int64_t e = 1000;
    ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT64, &e), 0);
    H5Aclose(a), H5Fclose(f);
    expect_error([&] { analysis::read_trace(path); }, {path, "1000 experts"});
  }
  // An extent that lies: /tokens, /experts and /gates grown to 2^33 rows (unwritten chunks read as
  // zeros) and committed by a last offset of 2^33. Reading them would allocate 2^33 * 17 bytes.
  const auto path = tmp.file("huge.h5");
  make(path);
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const hsize_t rows = hsize_t(1) << 33;
    for (const auto& [name, row] : std::vector<std::pair<const char*, std::vector<hsize_t>>>{
             {"tokens", {}}, {"experts", {2, 2}}, {"gates", {2, 2}}, {"router_logits", {2, 4}}}) {
      const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
      std::vector<hsize_t> dims{rows};
      dims.insert(dims.end(), row.begin(), row.end());
      ASSERT_GE(H5Dset_extent(d, dims.data()), 0) << name;
      H5Dclose(d);
    }
    const hid_t d = H5Dopen2(f, "sequence_offsets", H5P_DEFAULT);
    const hsize_t n = 4, at = 3, one = 1;
    ASSERT_GE(H5Dset_extent(d, &n), 0);
    const hid_t fs_ = H5Dget_space(d), ms = H5Screate_simple(1, &one, nullptr);
    H5Sselect_hyperslab(fs_, H5S_SELECT_SET, &at, nullptr, &one, nullptr);
    const int64_t end = int64_t(rows);
    ASSERT_GE(H5Dwrite(d, H5T_NATIVE_INT64, ms, fs_, H5P_DEFAULT, &end), 0);
    H5Sclose(fs_), H5Sclose(ms), H5Dclose(d);
    const hid_t dd = H5Dopen2(f, "sequence_domain", H5P_DEFAULT);
    ASSERT_GE(H5Dset_extent(dd, &at), 0);
    H5Dclose(dd), H5Fclose(f);
  }
  expect_error([&] { analysis::read_trace(path); }, {path, "damaged trace", "claims"});
}

// An append checks what it will write into: /router_logits of another width (before: rows of the file's
// width were written out of a buffer of the model's, a heap over-read) and /sequence_offsets that decrease
// before their last entry (before: every dataset was cut to the last offset, deleting committed rows, and the
// run exit 0). The file is left as it was.
TEST(TraceCorrupt, AppendChecksEveryDatasetAndEveryOffset) {
  TempDir tmp;
  const auto h = small_header(true);
  const auto make = [&](const std::string& path) { write_two_sequences(path, h); };
  const auto logits_path = tmp.file("logits.h5");
  make(logits_path);
  {
    const hid_t f = H5Fopen(logits_path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    ASSERT_GE(H5Ldelete(f, "router_logits", H5P_DEFAULT), 0);
    const hsize_t dims[3] = {13, 2, 8}, max[3] = {H5S_UNLIMITED, 2, 8}, chunk[3] = {16, 2, 8};
    const hid_t sp = H5Screate_simple(3, dims, max), pl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(pl, 3, chunk);
    const hid_t d = H5Dcreate2(f, "router_logits", H5T_IEEE_F32LE, sp, H5P_DEFAULT, pl, H5P_DEFAULT);
    ASSERT_GE(d, 0);
    H5Dclose(d), H5Pclose(pl), H5Sclose(sp), H5Fclose(f);
  }
  expect_error([&] { TraceWriter w(logits_path, h, kAppend); }, {logits_path, "/router_logits does not have shape [N, 2, 4]"});

  const auto offsets_path = tmp.file("offsets.h5");
  make(offsets_path);
  {
    const hid_t f = H5Fopen(offsets_path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const hid_t d = H5Dopen2(f, "sequence_offsets", H5P_DEFAULT);
    const int64_t offsets[3] = {0, 9, 5};  // was 0, 9, 13
    ASSERT_GE(H5Dwrite(d, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, offsets), 0);
    H5Dclose(d), H5Fclose(f);
  }
  expect_error([&] { TraceWriter w(offsets_path, h, kAppend); }, {offsets_path, "decreases at entry 2 (5 after 9)"});
  const hid_t f = H5Fopen(offsets_path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  const hid_t d = H5Dopen2(f, "experts", H5P_DEFAULT), sp = H5Dget_space(d);
  hsize_t dims[3] = {};
  H5Sget_simple_extent_dims(sp, dims, nullptr);
  EXPECT_EQ(dims[0], 13u) << "the rows after the bad offset are still there";
  H5Sclose(sp), H5Dclose(d), H5Fclose(f);
}

// ---------------------------------------------------------------------------------------------------
// Timing

TEST(TraceTiming, SumsStagesExpertsAndBuckets) {
  analysis::TimingProbe p("test");
  MatrixRF unused(1, 1);
  for (int call = 0; call < 2; ++call) {
    std::vector<ExpertTiming> ex{{0, 1, 0.001}, {2, 3, 0.003}, {3, 4, 0.004}};
    for (int l = 0; l < 2; ++l) {
      LayerObservation o;
      o.layer = l;
      o.attention_seconds = 0.010 * (l + 1);
      o.router_seconds = 0.001;
      o.experts_seconds = 0.009;
      o.expert_timings = l == 0 ? &ex : nullptr;  // an engine may time experts in some layers only
      p.on_layer(o);
    }
    p.on_logits(unused, 0.005);
    p.add_call(4, 0.1);
  }
  const auto& r = p.report();
  EXPECT_EQ(r.calls, 2);
  EXPECT_EQ(r.tokens, 8);
  ASSERT_EQ(r.layers.size(), 2u);
  EXPECT_DOUBLE_EQ(r.layers[1].attention, 0.040);
  EXPECT_DOUBLE_EQ(r.stage_totals().experts, 0.036);
  EXPECT_DOUBLE_EQ(r.lm_head, 0.010);
  EXPECT_NEAR(r.timed_seconds(), 0.060 + 0.004 + 0.036 + 0.010, 1e-12);
  EXPECT_DOUBLE_EQ(r.reference_seconds(), 0.2);
  ASSERT_TRUE(r.has_expert_times);
  EXPECT_EQ(r.experts[0][2].calls, 2);
  EXPECT_EQ(r.experts[0][2].tokens, 6);
  EXPECT_DOUBLE_EQ(r.experts[0][3].seconds, 0.008);
  EXPECT_EQ(r.experts[0][1].calls, 0);  // expert 1 never ran
  // Buckets: 1 token -> [1,1]; 3 -> [2,3]; 4 -> [4,7].
  ASSERT_EQ(r.by_token_count.size(), 3u);
  EXPECT_EQ(r.by_token_count[1].min_tokens, 2);
  EXPECT_EQ(r.by_token_count[1].max_tokens, 3);
  EXPECT_EQ(r.by_token_count[1].calls, 2);
  EXPECT_EQ(r.by_token_count[2].tokens, 8);

  const auto j = r.to_json();
  EXPECT_NEAR(j["stages"]["other"].get<double>(), 0.2 - 0.110, 1e-12);
  EXPECT_EQ(j["experts"].size(), 3u);  // experts that ran, in layer 0
  EXPECT_EQ(j["by_token_count"][2]["min_tokens"], 4);
  const auto table = r.table();
  EXPECT_NE(table.find("test: 2 calls, 8 tokens"), std::string::npos) << table;
  EXPECT_NE(table.find("20.0%"), std::string::npos) << table;  // layer 1 attention: 0.040 of 0.2 s
}

TEST(TraceTiming, NoExpertTimesIsReportedAsSuch) {
  analysis::TimingProbe p;
  LayerObservation o;
  o.experts_seconds = 0.5;
  p.on_layer(o);
  EXPECT_FALSE(p.report().has_expert_times);
  EXPECT_TRUE(p.report().to_json()["experts"].is_null());
  EXPECT_TRUE(p.report().to_json()["wall_seconds"].is_null());
  EXPECT_NE(p.report().table().find("does not time experts"), std::string::npos);
}

// The reference engine times every expert that ran: per layer, the tokens sum to n·k and the expert
// MLP times fit inside the experts stage.
TEST(TraceTiming, ReferenceEngineReportsEveryExpertCall) {
  Fixture fx("mixtral-8e-bf16-sharded");
  const auto& cfg = fx.ck->config();
  struct Check : Probe {
    int n, k;
    int layers_seen = 0;
    void on_layer(const LayerObservation& o) override {
      ++layers_seen;
      ASSERT_NE(o.expert_timings, nullptr);
      int tokens = 0;
      double secs = 0;
      for (const auto& e : *o.expert_timings) tokens += e.tokens, secs += e.seconds;
      EXPECT_EQ(tokens, n * k);
      EXPECT_LE(secs, o.experts_seconds);
      EXPECT_GT(o.attention_seconds, 0);
    }
  } check;
  const std::vector<int32_t> ids{1, 5, 9, 200, 33, 7, 81};
  check.n = int(ids.size());
  check.k = cfg.top_k;
  analysis::TimingProbe timing;
  analysis::ProbeFanout both({&check, &timing});
  fx.engine->forward(ids, &both);
  EXPECT_EQ(check.layers_seen, cfg.num_layers);
  int64_t tokens = 0;
  for (const auto& layer : timing.report().experts)
    for (const auto& e : layer) tokens += e.tokens;
  EXPECT_EQ(tokens, int64_t(ids.size()) * cfg.top_k * cfg.num_layers);
}

}  // namespace
}  // namespace moelab::test
