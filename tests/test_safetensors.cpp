#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"
#include "process_util.hpp"

using namespace moelab;
namespace fs = std::filesystem;
using moelab::test::TempDir;

namespace {

// A fresh directory under the system temp dir, removed with everything in it at scope exit.

std::string le64(uint64_t n) {
  std::string s;
  for (int i = 0; i < 8; ++i) s.push_back(char((n >> (8 * i)) & 0xff));
  return s;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A safetensors file with the given header text (space-padded to a multiple of 8) and `data_size`
// bytes of buffer (bytes 0, 1, 2, ...).
void write_crafted(const std::string& path, std::string header, uint64_t data_size, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  std::string data;
  for (uint64_t i = 0; i < data_size; ++i) data.push_back(char(i & 0xff));
  write_bytes(path, le64(header.size()) + header + data);
}

// One header entry: "name":{"dtype":..,"shape":..,"data_offsets":[b,e]}
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, uint64_t b,
                  uint64_t e) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(b) + "," + std::to_string(e) + "]}";
}

// Opens `path`, expects moelab::Error, returns its message (empty and a failure when none was thrown).
std::string open_error(const std::string& path) {
  try {
    SafetensorsFile f(path);
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected moelab::Error, got another exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected moelab::Error opening " << path << ", but it opened";
  return {};
}

// The file must be rejected with a one-line message naming the file and every one of `needles`.
void expect_rejected(const std::string& path, std::initializer_list<std::string> needles) {
  const std::string msg = open_error(path);
  if (msg.empty()) return;
  EXPECT_NE(msg.find(path), std::string::npos) << "message does not name the file: " << msg;
  for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "no '" << n << "' in: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
  EXPECT_EQ(msg.find('\r'), std::string::npos) << "message is not one line: " << msg;
}

template <typename T>
TensorToWrite make_tensor(std::string name, DType dtype, std::vector<int64_t> shape, const std::vector<T>& v) {
  TensorToWrite t{std::move(name), dtype, std::move(shape), {}};
  t.data.resize(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(t.data.data(), v.data(), t.data.size());
  return t;
}

uint64_t header_len_of(const std::string& bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  return n;
}

std::vector<std::byte> as_bytes(const std::string& s) {
  std::vector<std::byte> v(s.size());
  std::memcpy(v.data(), s.data(), s.size());
  return v;
}

}  // namespace

// ================================================================= writer round trip

TEST(SafetensorsWriter, RoundTripKeepsBytesShapesDtypesAndMetadata) {
  TempDir dir;
  const std::string path = dir.file("rt.safetensors");
  std::vector<TensorToWrite> tensors;
  tensors.push_back(make_tensor<uint8_t>("a_u8", DType::U8, {5}, {1, 2, 3, 4, 5}));
  tensors.push_back(make_tensor<double>("b_f64", DType::F64, {2}, {1.25, -7.5}));
  tensors.push_back(make_tensor<float>("c_f32", DType::F32, {2, 3}, {0, 1, 2, 3, 4, 5}));
  tensors.push_back(make_tensor<uint16_t>("d_bf16", DType::BF16, {3}, {0x3F80, 0xC040, 0x4049}));
  tensors.push_back(make_tensor<uint16_t>("e_f16", DType::F16, {3, 1}, {0x3C00, 0xC000, 0x7BFF}));
  tensors.push_back(make_tensor<int32_t>("m_i32", DType::I32, {2}, {-1, 123456}));
  tensors.push_back(make_tensor<int64_t>("z_i64", DType::I64, {1}, {int64_t(1) << 40}));
  tensors.push_back(make_tensor<uint8_t>("y_bool", DType::BOOL, {3}, {1, 0, 1}));
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "hello world"}};
  write_safetensors(path, tensors, metadata);

  // Only the final file is left (the temporary was renamed).
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);

  SafetensorsFile f(path);
  EXPECT_EQ(f.path(), path);
  ASSERT_EQ(f.tensors().size(), tensors.size());
  EXPECT_EQ(f.metadata(), metadata);
  for (const auto& t : tensors) {
    SCOPED_TRACE(t.name);
    ASSERT_TRUE(f.contains(t.name));
    const auto& info = f.info(t.name);
    EXPECT_EQ(info.name, t.name);
    EXPECT_EQ(info.dtype, t.dtype);
    EXPECT_EQ(info.shape, t.shape);
    EXPECT_EQ(info.nbytes(), t.data.size());
    const auto bytes = f.bytes(t.name);
    ASSERT_EQ(bytes.size(), t.data.size());
    EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), t.data.begin()));
  }

  // Layout: header length a multiple of 8, padded with spaces, the file exactly header + data.
  const std::string raw = read_bytes(path);
  const uint64_t n = header_len_of(raw);
  EXPECT_EQ(n % 8, 0u);
  uint64_t total = 0;
  for (const auto& t : tensors) total += t.data.size();
  EXPECT_EQ(raw.size(), 8 + n + total);
  const std::string header = raw.substr(8, n);
  const size_t close = header.find_last_of('}');
  ASSERT_NE(close, std::string::npos);
  EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos) << "padding is not spaces";
  EXPECT_EQ(header.rfind("{\"__metadata__\":", 0), 0u) << "__metadata__ first: " << header;
  const auto j = nlohmann::json::parse(header);
  EXPECT_EQ(j["__metadata__"]["note"], "hello world");

  // Order in the buffer: descending dtype alignment, then name.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& [name, info] : f.tensors()) by_offset.push_back(&info);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  std::vector<std::string> order;
  for (auto* t : by_offset) order.push_back(t->name);
  const std::vector<std::string> want = {"b_f64",  "z_i64", "c_f32", "m_i32",
                                         "d_bf16", "e_f16", "a_u8",  "y_bool"};
  EXPECT_EQ(order, want);
  EXPECT_EQ(by_offset.front()->begin, 0u);
  for (size_t i = 1; i < by_offset.size(); ++i) EXPECT_EQ(by_offset[i]->begin, by_offset[i - 1]->end);
  // With this order every tensor is aligned to its element size within the 8-aligned buffer.
  for (auto* t : by_offset) EXPECT_EQ(t->begin % uint64_t(std::max(1, dtype_bits(t->dtype) / 8)), 0u) << t->name;
}

// The reference implementation's own serialization tests (safetensors/src/tensor.rs test_empty):
// identical bytes for an empty file with and without metadata.
TEST(SafetensorsWriter, EmptyFileMatchesReferenceBytes) {
  TempDir dir;
  const std::string a = dir.file("empty.safetensors"), b = dir.file("meta.safetensors");
  write_safetensors(a, {});
  EXPECT_EQ(read_bytes(a), le64(8) + "{}      ");
  write_safetensors(b, {}, {{"framework", "pt"}});
  EXPECT_EQ(read_bytes(b), le64(40) + "{\"__metadata__\":{\"framework\":\"pt\"}}     ");
  SafetensorsFile fa(a), fb(b);
  EXPECT_TRUE(fa.tensors().empty());
  EXPECT_TRUE(fb.tensors().empty());
  EXPECT_EQ(fb.metadata().at("framework"), "pt");
}

// tensor.rs test_serialization: "attn.0" F32 [1, 2, 3] = 0..5 gives a 64-byte header, no padding.
TEST(SafetensorsWriter, SingleTensorMatchesReferenceLayout) {
  TempDir dir;
  const std::string path = dir.file("attn.safetensors");
  const float v[] = {0, 1, 2, 3, 4, 5};
  write_safetensors(path, {make_f32_tensor("attn.0", {1, 2, 3}, v)});
  const std::string raw = read_bytes(path);
  ASSERT_EQ(header_len_of(raw), 64u);
  EXPECT_EQ(nlohmann::json::parse(raw.substr(8, 64)),
            nlohmann::json::parse(R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})"));
  ASSERT_EQ(raw.size(), 8u + 64u + 24u);
  EXPECT_EQ(std::memcmp(raw.data() + 72, v, 24), 0);
}

TEST(SafetensorsWriter, RejectsDataSizeMismatchAndLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  TensorToWrite t{"weights.bad", DType::F32, {2, 2}, std::vector<std::byte>(12)};
  try {
    write_safetensors(path, {t});
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("weights.bad"), std::string::npos) << msg;
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

// The writer must never produce a file the reader (or the Rust reader) rejects.
TEST(SafetensorsWriter, RejectsTensorsThatWouldMakeAnInvalidFile) {
  TempDir dir;
  const std::string path = dir.file("never.safetensors");
  auto expect_writer_error = [&](const std::vector<TensorToWrite>& tensors, const std::string& needle) {
    try {
      write_safetensors(path, tensors);
      ADD_FAILURE() << "writer accepted tensors that make an invalid file (" << needle << ")";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    }
    EXPECT_FALSE(fs::exists(path));
    std::error_code ec;
    fs::remove(path, ec);
  };
  const std::vector<float> four = {1, 2, 3, 4};
  // Duplicate names (same and different dtypes): the header would hold a duplicate key.
  expect_writer_error({make_tensor<float>("twin", DType::F32, {4}, four), make_tensor<float>("twin", DType::F32, {4}, four)},
                      "twin");
  expect_writer_error({make_tensor<float>("twin", DType::F32, {4}, four),
                       make_tensor<uint16_t>("twin", DType::BF16, {2}, {0x3F80, 0x4000})},
                      "twin");
  // A tensor named like the metadata key.
  expect_writer_error({make_tensor<float>("__metadata__", DType::F32, {4}, four)}, "__metadata__");
  // Negative dimensions whose product still matches the data size.
  expect_writer_error({make_tensor<float>("neg", DType::F32, {-2, -2}, four)}, "neg");
  // A sub-byte dtype whose bit count is not whole bytes (3 x 4 bits).
  expect_writer_error({TensorToWrite{"nibbles", DType::F4, {3}, std::vector<std::byte>(1)}}, "nibbles");
}

TEST(SafetensorsWriter, OverwritesExistingFileAtomically) {
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  const float one[] = {1.0f}, two[] = {2.0f, 3.0f};
  write_safetensors(path, {make_f32_tensor("a", {1}, one)});
  write_safetensors(path, {make_f32_tensor("b", {2}, two)});
  SafetensorsFile f(path);
  EXPECT_FALSE(f.contains("a"));
  EXPECT_EQ(f.read_f32("b"), (std::vector<float>{2.0f, 3.0f}));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
}

// ================================================================= reading values

TEST(SafetensorsRead, ReadF32ConvertsFloatDtypes) {
  TempDir dir;
  const std::string path = dir.file("floats.safetensors");
  write_safetensors(path, {
      make_tensor<float>("f32", DType::F32, {2, 2}, {1.5f, -2.0f, 1e-30f, 65536.0f}),
      make_tensor<uint16_t>("bf16", DType::BF16, {4}, {0x3F80, 0xC040, 0x4049, 0x0001}),
      make_tensor<uint16_t>("f16", DType::F16, {2, 2}, {0x3C00, 0xC000, 0x7BFF, 0x0001}),
      make_tensor<double>("f64", DType::F64, {2}, {1.5, -2.25}),
  });
  SafetensorsFile f(path);
  EXPECT_EQ(f.read_f32("f32"), (std::vector<float>{1.5f, -2.0f, 1e-30f, 65536.0f}));
  EXPECT_EQ(f.read_f32("bf16"), (std::vector<float>{1.0f, -3.0f, 3.140625f, std::ldexp(1.0f, -133)}));
  EXPECT_EQ(f.read_f32("f16"), (std::vector<float>{1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24)}));
  EXPECT_EQ(f.read_f32("f64"), (std::vector<float>{1.5f, -2.25f}));

  // A sub-range.
  float part[2] = {0, 0};
  f.read_f32(f.info("f16"), 1, 2, part);
  EXPECT_EQ(part[0], -2.0f);
  EXPECT_EQ(part[1], 65504.0f);
  f.read_f32(f.info("bf16"), 3, 1, part);
  EXPECT_EQ(part[0], std::ldexp(1.0f, -133));
}

TEST(SafetensorsRead, ReadF32OutOfRangeThrows) {
  TempDir dir;
  const std::string path = dir.file("r.safetensors");
  write_safetensors(path, {make_tensor<float>("w", DType::F32, {4}, {1, 2, 3, 4})});
  SafetensorsFile f(path);
  float out[8];
  EXPECT_THROW(f.read_f32(f.info("w"), 3, 2, out), Error);
  EXPECT_THROW(f.read_f32(f.info("w"), -1, 1, out), Error);
  EXPECT_THROW(f.read_f32(f.info("w"), 0, -1, out), Error);
  EXPECT_NO_THROW(f.read_f32(f.info("w"), 4, 0, out));
}

TEST(SafetensorsRead, ReadF32OnNonFloatTensorThrows) {
  TempDir dir;
  const std::string path = dir.file("ints.safetensors");
  write_safetensors(path, {make_tensor<int32_t>("token_ids", DType::I32, {3}, {1, 2, 3}),
                           make_tensor<uint8_t>("fp8.weight", DType::F8_E4M3, {2}, {0x38, 0x40})});
  SafetensorsFile f(path);
  for (const std::string name : {"token_ids", "fp8.weight"}) {
    try {
      f.read_f32(name);
      ADD_FAILURE() << "no error for " << name;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      EXPECT_NE(msg.find(name), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
  // The raw bytes are still readable.
  const auto b = f.bytes("token_ids");
  ASSERT_EQ(b.size(), 12u);
  int32_t ids[3];
  std::memcpy(ids, b.data(), 12);
  EXPECT_EQ(ids[2], 3);
}

TEST(SafetensorsRead, UnknownTensorNameThrows) {
  TempDir dir;
  const std::string path = dir.file("u.safetensors");
  write_safetensors(path, {make_tensor<float>("present", DType::F32, {1}, {1})});
  SafetensorsFile f(path);
  try {
    f.info("absent.weight");
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("absent.weight"), std::string::npos) << msg;
  }
  EXPECT_THROW(f.read_f32("absent.weight"), Error);
}

TEST(SafetensorsRead, EmptyAndScalarTensorsAreAccepted) {
  TempDir dir;
  const std::string path = dir.file("edge.safetensors");
  write_safetensors(path, {make_tensor<float>("empty", DType::F32, {0}, {}),
                           make_tensor<float>("empty2d", DType::F32, {3, 0}, {}),
                           make_tensor<float>("scalar", DType::F32, {}, {2.5f}),
                           make_tensor<uint16_t>("scalar_bf16", DType::BF16, {}, {0xC040})});
  SafetensorsFile f(path);
  EXPECT_EQ(f.info("empty").numel(), 0);
  EXPECT_EQ(f.info("empty").nbytes(), 0u);
  EXPECT_TRUE(f.read_f32("empty").empty());
  EXPECT_EQ(f.info("empty2d").shape, (std::vector<int64_t>{3, 0}));
  EXPECT_TRUE(f.read_f32("empty2d").empty());
  EXPECT_TRUE(f.info("scalar").shape.empty());
  EXPECT_EQ(f.info("scalar").numel(), 1);
  EXPECT_EQ(f.read_f32("scalar"), std::vector<float>{2.5f});
  EXPECT_EQ(f.read_f32("scalar_bf16"), std::vector<float>{-3.0f});
}

TEST(SafetensorsRead, CraftedEmptyTensorsAnywhereInTheBufferAreAccepted) {
  TempDir dir;
  const std::string path = dir.file("empties.safetensors");
  // Zero-length tensors at the start, in the middle and at the end; a tensor-free file with padding.
  write_crafted(path, "{" + entry("e0", "F32", "[0]", 0, 0) + "," + entry("a", "F32", "[2]", 0, 8) + "," +
                          entry("e1", "BF16", "[4,0]", 8, 8) + "," + entry("b", "U8", "[3]", 8, 11) + "," +
                          entry("e2", "I64", "[0]", 11, 11) + "}",
                11);
  SafetensorsFile f(path);
  EXPECT_EQ(f.tensors().size(), 5u);
  EXPECT_EQ(f.info("b").begin, 8u);
  const auto b = f.bytes("b");
  EXPECT_EQ(uint8_t(b[0]), 8);
  EXPECT_EQ(uint8_t(b[2]), 10);

  const std::string empty = dir.file("nothing.safetensors");
  write_crafted(empty, "{}", 0);
  EXPECT_TRUE(SafetensorsFile(empty).tensors().empty());
}

TEST(SafetensorsRead, SubByteDtypeWithWholeBytesIsAccepted) {
  TempDir dir;
  const std::string path = dir.file("f4.safetensors");
  write_crafted(path, "{" + entry("packed", "F4", "[2,2]", 0, 2) + "}", 2);
  SafetensorsFile f(path);
  EXPECT_EQ(f.info("packed").nbytes(), 2u);
  EXPECT_THROW(f.read_f32("packed"), Error);
}

// ================================================================= validation, one rule per test

TEST(SafetensorsValidation, MissingFileAndDirectory) {
  TempDir dir;
  expect_rejected(dir.file("does_not_exist.safetensors"), {});
  expect_rejected(dir.path().string(), {});
}

TEST(SafetensorsValidation, FileShorterThan8Bytes) {
  TempDir dir;
  for (int size : {0, 1, 7}) {
    const std::string path = dir.file("short" + std::to_string(size) + ".safetensors");
    write_bytes(path, std::string(size_t(size), '\0'));
    expect_rejected(path, {});
  }
}

TEST(SafetensorsValidation, HeaderLengthOverLimit) {
  TempDir dir;
  const std::string path = dir.file("huge_header.safetensors");
  write_bytes(path, le64(100'000'001) + "{}      ");
  expect_rejected(path, {"100000001"});
  const std::string max = dir.file("max_header.safetensors");
  write_bytes(max, le64(~uint64_t(0)) + "{}      ");
  expect_rejected(max, {});
}

TEST(SafetensorsValidation, HeaderLengthPastEndOfFile) {
  TempDir dir;
  const std::string path = dir.file("past_eof.safetensors");
  write_bytes(path, le64(64) + "{}      ");  // 8 header bytes present, 64 claimed
  expect_rejected(path, {"64"});
  // Exactly at the limit but the file is tiny: still past the end.
  const std::string at_limit = dir.file("at_limit.safetensors");
  write_bytes(at_limit, le64(100'000'000) + "{}      ");
  expect_rejected(at_limit, {});
}

TEST(SafetensorsValidation, TruncatedInsideHeader) {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  const float v[] = {1, 2};
  write_safetensors(path, {make_f32_tensor("w", {2}, v)});
  const uint64_t n = header_len_of(read_bytes(path));
  fs::resize_file(path, 8 + n - 3);
  expect_rejected(path, {});
}

TEST(SafetensorsValidation, HeaderNotJson) {
  TempDir dir;
  const std::string path = dir.file("not_json.safetensors");
  write_crafted(path, "{this is not json}", 0);
  expect_rejected(path, {"JSON"});
  // A newline inside the broken header must not leak a line break into the message.
  const std::string nl = dir.file("not_json_nl.safetensors");
  write_crafted(nl, "{\n\"a\":\n", 0);
  expect_rejected(nl, {});
  // Trailing garbage after the object.
  const std::string trail = dir.file("trailing_garbage.safetensors");
  write_crafted(trail, "{} {}", 0);
  expect_rejected(trail, {});
  // NUL padding instead of spaces.
  const std::string nul = dir.file("nul_padding.safetensors");
  write_crafted(nul, std::string("{}") + std::string(6, '\0'), 0, false);
  expect_rejected(nul, {});
}

TEST(SafetensorsValidation, HeaderNotUtf8) {
  TempDir dir;
  const std::string path = dir.file("latin1.safetensors");
  write_crafted(path, "{" + entry("caf\xe9", "F32", "[1]", 0, 4) + "}", 4);
  expect_rejected(path, {});
}

TEST(SafetensorsValidation, HeaderJsonNotAnObject) {
  TempDir dir;
  int i = 0;
  for (const std::string header : {"[]", "[1, 2, 3]", "\"text\"", "42", "null"}) {
    const std::string path = dir.file("not_object" + std::to_string(i++) + ".safetensors");
    write_crafted(path, header, 0);
    expect_rejected(path, {});
  }
}

TEST(SafetensorsValidation, HeaderNotStartingWithBrace) {
  TempDir dir;
  const std::string space = dir.file("leading_space.safetensors");
  write_crafted(space, " {}", 0);
  expect_rejected(space, {"{"});
  const std::string bom = dir.file("bom.safetensors");
  write_crafted(bom, "\xEF\xBB\xBF{}", 0);
  expect_rejected(bom, {"{"});
  const std::string empty = dir.file("empty_header.safetensors");
  write_bytes(empty, le64(0));
  expect_rejected(empty, {});
}

TEST(SafetensorsValidation, DuplicateTensorKey) {
  TempDir dir;
  const std::string path = dir.file("dup.safetensors");
  write_crafted(path, "{" + entry("twice", "F32", "[1]", 0, 4) + "," + entry("twice", "F32", "[1]", 4, 8) + "}", 8);
  expect_rejected(path, {"twice", "duplicate"});
  // Even when the duplicates are identical and the last one alone would be valid.
  const std::string same = dir.file("dup_same.safetensors");
  write_crafted(same, "{" + entry("twice", "F32", "[1]", 0, 4) + "," + entry("twice", "F32", "[1]", 0, 4) + "}", 4);
  expect_rejected(same, {"twice"});
}

TEST(SafetensorsValidation, DuplicateFieldInsideEntryOrMetadata) {
  TempDir dir;
  const std::string path = dir.file("dup_field.safetensors");
  write_crafted(path, R"({"w":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})", 4);
  expect_rejected(path, {"dtype"});
  const std::string meta = dir.file("dup_meta.safetensors");
  write_crafted(meta, R"({"__metadata__":{"format":"pt","format":"np"}})", 0);
  expect_rejected(meta, {"format"});
  const std::string mm = dir.file("dup_metadata_key.safetensors");
  write_crafted(mm, R"({"__metadata__":{"a":"b"},"__metadata__":{"c":"d"}})", 0);
  expect_rejected(mm, {"__metadata__"});
}

TEST(SafetensorsValidation, SameFieldNamesInSiblingEntriesAreNotDuplicates) {
  TempDir dir;
  const std::string path = dir.file("siblings.safetensors");
  write_crafted(path, "{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 4, 8) + "}", 8);
  EXPECT_EQ(SafetensorsFile(path).tensors().size(), 2u);
}

TEST(SafetensorsValidation, UnknownDtype) {
  TempDir dir;
  const std::string path = dir.file("dtype.safetensors");
  write_crafted(path, "{" + entry("layer.w", "F33", "[1]", 0, 4) + "}", 4);
  expect_rejected(path, {"layer.w", "F33"});
  const std::string lower = dir.file("dtype_lower.safetensors");
  write_crafted(lower, "{" + entry("layer.w", "f32", "[1]", 0, 4) + "}", 4);
  expect_rejected(lower, {"layer.w", "f32"});
  const std::string num = dir.file("dtype_number.safetensors");
  write_crafted(num, R"({"layer.w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", 4);
  expect_rejected(num, {"layer.w", "dtype"});
}

// A name 100 000 bytes long in an invalid entry: the message shows its two ends around "...", not all of it.
TEST(SafetensorsValidation, HugeNamesAreShortenedInMessages) {
  TempDir dir;
  const std::string name = "model.layers.0." + std::string(100000, 'x') + ".w1.weight";
  const std::string path = dir.file("huge_name.safetensors");
  write_crafted(path, "{" + entry(name, "F33", "[1]", 0, 4) + "}", 4);
  expect_rejected(path, {"'model.layers.0.xxx", "xxx...xxx", "xxx.w1.weight'", "F33"});
  EXPECT_LT(open_error(path).size(), 1000u);
  const std::string dup = dir.file("huge_dup.safetensors");
  write_crafted(dup, "{" + entry(name, "F32", "[1]", 0, 4) + "," + entry(name, "F32", "[1]", 4, 8) + "}", 8);
  expect_rejected(dup, {"duplicate", "xxx...xxx"});
  EXPECT_LT(open_error(dup).size(), 1000u);
}

// A header nested 200,000 levels deep (in __metadata__) is refused while parsed, naming the file: nothing may
// later walk it recursively.
TEST(SafetensorsValidation, DeeplyNestedHeaderIsRefused) {
  TempDir dir;
  const std::string path = dir.file("deep.safetensors");
  write_crafted(path, R"({"__metadata__": )" + std::string(200000, '[') + std::string(200000, ']') + "," +
                          entry("w", "F32", "[1]", 0, 4) + "}", 4);
  expect_rejected(path, {"safetensors header nested more than 64 levels deep"});
}

TEST(SafetensorsValidation, MissingDtype) {
  TempDir dir;
  const std::string path = dir.file("no_dtype.safetensors");
  write_crafted(path, R"({"layer.w":{"shape":[1],"data_offsets":[0,4]}})", 4);
  expect_rejected(path, {"layer.w", "dtype"});
}

TEST(SafetensorsValidation, MissingShape) {
  TempDir dir;
  const std::string path = dir.file("no_shape.safetensors");
  write_crafted(path, R"({"layer.w":{"dtype":"F32","data_offsets":[0,4]}})", 4);
  expect_rejected(path, {"layer.w", "shape"});
  const std::string scalar = dir.file("shape_scalar.safetensors");
  write_crafted(scalar, R"({"layer.w":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", 4);
  expect_rejected(scalar, {"layer.w", "shape"});
}

TEST(SafetensorsValidation, MissingDataOffsets) {
  TempDir dir;
  const std::string path = dir.file("no_offsets.safetensors");
  write_crafted(path, R"({"layer.w":{"dtype":"F32","shape":[1]}})", 4);
  expect_rejected(path, {"layer.w", "data_offsets"});
  const std::string three = dir.file("three_offsets.safetensors");
  write_crafted(three, R"({"layer.w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 4);
  expect_rejected(three, {"layer.w", "data_offsets"});
  const std::string neg = dir.file("negative_offsets.safetensors");
  write_crafted(neg, R"({"layer.w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4);
  expect_rejected(neg, {"layer.w", "data_offsets"});
  const std::string frac = dir.file("fractional_offsets.safetensors");
  write_crafted(frac, R"({"layer.w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}})", 4);
  expect_rejected(frac, {"layer.w", "data_offsets"});
}

TEST(SafetensorsValidation, EntryNotAnObject) {
  TempDir dir;
  const std::string path = dir.file("entry_array.safetensors");
  write_crafted(path, R"({"layer.w":["F32",[1],[0,4]]})", 4);
  expect_rejected(path, {"layer.w"});
}

TEST(SafetensorsValidation, NegativeOrNonIntegerShape) {
  TempDir dir;
  int i = 0;
  for (const std::string shape : {"[-1]", "[2,-2]", "[1.5]", "[2.0]", "[\"2\"]", "[null]", "[[2]]", "[true]"}) {
    SCOPED_TRACE(shape);
    const std::string path = dir.file("shape" + std::to_string(i++) + ".safetensors");
    write_crafted(path, "{" + entry("layer.w", "F32", shape, 0, 8) + "}", 8);
    expect_rejected(path, {"layer.w", "shape"});
  }
}

TEST(SafetensorsValidation, DataOffsetsEndBeforeBegin) {
  TempDir dir;
  const std::string path = dir.file("backwards.safetensors");
  write_crafted(path, "{" + entry("layer.w", "F32", "[0]", 8, 4) + "}", 8);
  expect_rejected(path, {"layer.w", "data_offsets"});
}

TEST(SafetensorsValidation, ShapeTimesDtypeSizeDiffersFromByteSpan) {
  TempDir dir;
  const std::string path = dir.file("span.safetensors");
  write_crafted(path, "{" + entry("layer.w", "F32", "[2,2]", 0, 12) + "}", 12);
  expect_rejected(path, {"layer.w", "[2, 2]", "16", "12"});
  const std::string bf = dir.file("span_bf16.safetensors");
  write_crafted(bf, "{" + entry("layer.w", "BF16", "[4]", 0, 16) + "}", 16);  // F32-sized span, BF16 dtype
  expect_rejected(bf, {"layer.w"});
}

TEST(SafetensorsValidation, ShapeOverflowAndPartialBytes) {
  TempDir dir;
  const std::string path = dir.file("overflow.safetensors");
  write_crafted(path, "{" + entry("layer.w", "F32", "[4611686018427387904,4611686018427387904]", 0, 8) + "}", 8);
  expect_rejected(path, {"layer.w"});
  const std::string u64 = dir.file("overflow_u64.safetensors");
  write_crafted(u64, "{" + entry("layer.w", "U8", "[18446744073709551615,2]", 0, 8) + "}", 8);
  expect_rejected(u64, {"layer.w"});
  const std::string bits = dir.file("f4_odd.safetensors");
  write_crafted(bits, "{" + entry("packed", "F4", "[3]", 0, 2) + "}", 2);  // 12 bits
  expect_rejected(bits, {"packed"});
}

TEST(SafetensorsValidation, TruncatedFileTensorPastEndOfBuffer) {
  TempDir dir;
  const std::string path = dir.file("truncated.safetensors");
  std::vector<float> a(4, 1.0f);
  write_safetensors(path, {make_tensor<float>("alpha", DType::F32, {4}, a),
                           make_tensor<uint8_t>("omega", DType::U8, {3}, {7, 8, 9})});
  ASSERT_NO_THROW(SafetensorsFile{path});
  fs::resize_file(path, fs::file_size(path) - 2);  // cuts into omega, the last tensor
  expect_rejected(path, {"omega"});
}

TEST(SafetensorsValidation, TensorPastEndOfBufferCrafted) {
  TempDir dir;
  const std::string path = dir.file("past_end.safetensors");
  write_crafted(path, "{" + entry("first", "F32", "[1]", 0, 4) + "," + entry("second", "F32", "[2]", 4, 12) + "}",
                10);
  expect_rejected(path, {"second"});
}

TEST(SafetensorsValidation, OverlappingTensors) {
  TempDir dir;
  const std::string path = dir.file("overlap.safetensors");
  write_crafted(path, "{" + entry("first", "F32", "[2]", 0, 8) + "," + entry("second", "F32", "[2]", 4, 12) + "}",
                12);
  expect_rejected(path, {"second", "overlap"});
  // Two tensors sharing the very same bytes.
  const std::string alias = dir.file("alias.safetensors");
  write_crafted(alias, "{" + entry("first", "F32", "[2]", 0, 8) + "," + entry("second", "F32", "[2]", 0, 8) + "}",
                8);
  expect_rejected(alias, {"second"});
  // An empty tensor placed inside another one's bytes.
  const std::string inside = dir.file("empty_inside.safetensors");
  write_crafted(inside, "{" + entry("first", "F32", "[2]", 0, 8) + "," + entry("hole", "F32", "[0]", 4, 4) + "}",
                8);
  expect_rejected(inside, {"hole"});
}

TEST(SafetensorsValidation, GapBetweenTensors) {
  TempDir dir;
  const std::string path = dir.file("gap.safetensors");
  write_crafted(path, "{" + entry("first", "F32", "[2]", 0, 8) + "," + entry("second", "F32", "[2]", 12, 20) + "}",
                20);
  expect_rejected(path, {"second", "gap"});
  // The first tensor must start at 0.
  const std::string lead = dir.file("leading_gap.safetensors");
  write_crafted(lead, "{" + entry("only", "F32", "[2]", 4, 12) + "}", 12);
  expect_rejected(lead, {"only"});
}

TEST(SafetensorsValidation, TrailingBytesAfterLastTensor) {
  TempDir dir;
  const std::string path = dir.file("trailing.safetensors");
  const float v[] = {1, 2, 3};
  write_safetensors(path, {make_f32_tensor("w", {3}, v)});
  {
    std::ofstream out(path, std::ios::binary | std::ios::app);
    out.write("junk", 4);
  }
  expect_rejected(path, {"trailing"});
  // No tensors at all but a non-empty buffer.
  const std::string none = dir.file("trailing_no_tensors.safetensors");
  write_crafted(none, "{}", 3);
  expect_rejected(none, {});
}

TEST(SafetensorsValidation, MetadataWithNonStringValue) {
  TempDir dir;
  int i = 0;
  for (const std::string value : {"1", "true", "null", "[\"pt\"]", "{\"x\":\"y\"}"}) {
    SCOPED_TRACE(value);
    const std::string path = dir.file("meta" + std::to_string(i++) + ".safetensors");
    write_crafted(path, R"({"__metadata__":{"format":"pt","step":)" + value + "}}", 0);
    expect_rejected(path, {"step"});
  }
  const std::string not_obj = dir.file("meta_not_object.safetensors");
  write_crafted(not_obj, R"({"__metadata__":"pt"})", 0);
  expect_rejected(not_obj, {"__metadata__"});
}

// Names come from the file; a control character in one must not break the one-line message.
TEST(SafetensorsValidation, ControlCharactersInNamesStayOnOneLine) {
  TempDir dir;
  const std::string path = dir.file("newline_name.safetensors");
  write_crafted(path, "{" + entry("evil\\nname", "F33", "[1]", 0, 4) + "}", 4);
  expect_rejected(path, {"evil", "name"});
  const std::string meta = dir.file("newline_meta.safetensors");
  write_crafted(meta, R"({"__metadata__":{"bad\r\nkey":1}})", 0);
  expect_rejected(meta, {"bad", "key"});
  const std::string dup = dir.file("newline_dup.safetensors");
  write_crafted(dup, "{" + entry("x\\ny", "F32", "[1]", 0, 4) + "," + entry("x\\ny", "F32", "[1]", 4, 8) + "}", 8);
  expect_rejected(dup, {});
}

// A valid file written by the writer stays valid after the test crafted every broken variant above:
// the helper itself produces accepted files.
TEST(SafetensorsValidation, CraftedValidFileIsAccepted) {
  TempDir dir;
  const std::string path = dir.file("valid.safetensors");
  write_crafted(path,
                R"({"__metadata__":{"format":"pt"},)" + entry("b", "U8", "[2]", 8, 10) + "," +
                    entry("a", "F32", "[2]", 0, 8) + "}",
                10);
  SafetensorsFile f(path);
  EXPECT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.info("a").begin, 0u);
  EXPECT_EQ(f.info("b").end, 10u);
  EXPECT_EQ(as_bytes(std::string("\x08\x09", 2)),
            std::vector<std::byte>(f.bytes("b").begin(), f.bytes("b").end()));
}
