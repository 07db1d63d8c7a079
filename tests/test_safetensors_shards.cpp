// The streaming shard writer (moelab quantize's output) against write_safetensors, the in-memory writer
// whose layout the safetensors tests check against the reference library's bytes: one shard must be
// the same file byte for byte, several shards must hold every tensor once with the index naming it.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <algorithm>

#include "core/error.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_shards.hpp"
#include "core/safetensors_writer.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;

struct Scratch {
  fs::path dir = fs::temp_directory_path() / ("moelab-shards-" + std::to_string(::getpid()) + "-" +
                                              ::testing::UnitTest::GetInstance()->current_test_info()->name());
  Scratch() {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~Scratch() { fs::remove_all(dir); }
};

// Mixed dtypes and odd sizes, so the layout's dtype ordering and unaligned ends are exercised.
std::vector<TensorToWrite> some_tensors() {
  std::mt19937 rng(3);
  std::vector<TensorToWrite> ts;
  const std::pair<DType, std::vector<int64_t>> specs[] = {
      {DType::U8, {1001, 1}}, {DType::F32, {17, 3}}, {DType::BF16, {5, 7}}, {DType::U8, {3}}, {DType::F32, {256}},
      {DType::I32, {2, 2}},   {DType::U8, {70000}}};
  int i = 0;
  for (const auto& [dtype, shape] : specs) {
    TensorToWrite t{"t." + std::to_string(i++), dtype, shape, {}};
    int64_t numel = 1;
    for (const int64_t d : shape) numel *= d;
    t.data.resize(size_t(numel * dtype_bits(dtype) / 8));
    for (auto& b : t.data) b = std::byte(rng());
    ts.push_back(std::move(t));
  }
  return ts;
}

TEST(SafetensorsShards, OneShardIsByteIdenticalToTheInMemoryWriter) {
  Scratch s;
  const auto ts = some_tensors();
  const std::map<std::string, std::string> meta{{"format", "pt"}};
  write_safetensors((s.dir / "expected.safetensors").string(), ts, meta);
  fs::create_directories(s.dir / "out");
  SafetensorsShardWriter w(s.dir / "out", int64_t(1) << 30, meta);
  for (const auto& t : ts) w.add(t);
  w.finish();
  EXPECT_EQ(read_file_bytes(s.dir / "out" / "model.safetensors"), read_file_bytes(s.dir / "expected.safetensors"));
  // Nothing else is left in the folder: no spill file, no index, no parts.
  EXPECT_EQ(std::distance(fs::directory_iterator(s.dir / "out"), fs::directory_iterator{}), 1);
}

TEST(SafetensorsShards, SeveralShardsHoldEveryTensorOnceAndTheIndexNamesIt) {
  Scratch s;
  const auto ts = some_tensors();
  SafetensorsShardWriter w(s.dir, 2000, {{"format", "pt"}});  // a few tensors per shard, 70000 B alone
  for (const auto& t : ts) w.add(t);
  w.finish();
  EXPECT_EQ(w.total_bytes(), [&] {
    int64_t n = 0;
    for (const auto& t : ts) n += int64_t(t.data.size());
    return n;
  }());
  const auto index = nlohmann::json::parse(read_file_bytes(s.dir / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), w.total_bytes());
  std::set<std::string> shards;
  for (const auto& t : ts) {
    const std::string shard = index["weight_map"][t.name].get<std::string>();
    shards.insert(shard);
    SafetensorsFile f((s.dir / shard).string());
    const auto bytes = f.bytes(t.name);
    ASSERT_EQ(bytes.size(), t.data.size()) << t.name;
    EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), t.data.begin())) << t.name;
    EXPECT_EQ(f.info(t.name).shape, t.shape);
    EXPECT_EQ(f.metadata().at("format"), "pt");
  }
  EXPECT_GE(shards.size(), 3u);
  for (const auto& shard : shards) EXPECT_TRUE(shard.starts_with("model-0000")) << shard;
  EXPECT_FALSE(fs::exists(s.dir / ".spill.tmp"));
}

// A tensor whose bytes disagree with its shape is refused before it reaches a shard, and the writer
// leaves no shard behind when abandoned (as quantize does on any error: the folder is then removed).
TEST(SafetensorsShards, BadTensorIsAClearErrorAndAbandoningLeavesNoShard) {
  Scratch s;
  {
    SafetensorsShardWriter w(s.dir, 1 << 20, {});
    TensorToWrite bad{"bad", DType::F32, {3}, std::vector<std::byte>(5)};
    w.add(bad);
    try {
      w.finish();
      FAIL() << "a 5-byte F32 [3] tensor was written";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("'bad' has 5 bytes of data, its shape needs 12"), std::string::npos) << e.what();
    }
  }
  for (const auto& e : fs::directory_iterator(s.dir)) ADD_FAILURE() << "left behind: " << e.path();
}

}  // namespace
}  // namespace moelab::test
