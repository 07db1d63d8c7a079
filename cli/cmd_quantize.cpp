// moelab quantize: write a pre-quantized NF4 checkpoint in the form transformers 4.x saves bnb-4bit
// models (packed uint8 weights with absmax / quant_map / nested statistics / quant_state JSON beside
// them, and quantization_config in config.json), which moelab's NF4 engines then memory-map.
#include <fmt/format.h>
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "cli/commands.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::cli {
namespace {

namespace fs = std::filesystem;

// Shards of at most `limit` bytes, written as they fill so memory stays at one shard.
class ShardWriter {
 public:
  ShardWriter(fs::path dir, int64_t limit) : dir_(std::move(dir)), limit_(limit) {}

  void add(TensorToWrite t) {
    if (!pending_.empty() && bytes_ + int64_t(t.data.size()) > limit_) flush();
    bytes_ += int64_t(t.data.size());
    total_ += int64_t(t.data.size());
    pending_.push_back(std::move(t));
  }

  // Names the shards (model.safetensors when one suffices) and writes the index.
  void finish() {
    flush();
    if (parts_.size() == 1) {
      fs::rename(parts_[0].first, dir_ / "model.safetensors");
      return;
    }
    nlohmann::json index = {{"metadata", {{"total_size", total_}}}, {"weight_map", nlohmann::json::object()}};
    for (size_t i = 0; i < parts_.size(); ++i) {
      const auto name = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, parts_.size());
      fs::rename(parts_[i].first, dir_ / name);
      for (const auto& tensor : parts_[i].second) index["weight_map"][tensor] = name;
    }
    write_file_atomic((dir_ / "model.safetensors.index.json").string(), index.dump(2) + "\n");
  }

 private:
  void flush() {
    if (pending_.empty()) return;
    const auto path = dir_ / fmt::format("shard-{}.safetensors.part", parts_.size());
    write_safetensors(path.string(), pending_, {{"format", "pt"}});
    std::vector<std::string> names;
    for (const auto& t : pending_) names.push_back(t.name);
    parts_.emplace_back(path, std::move(names));
    pending_.clear();
    bytes_ = 0;
  }

  fs::path dir_;
  int64_t limit_, bytes_ = 0, total_ = 0;
  std::vector<TensorToWrite> pending_;
  std::vector<std::pair<fs::path, std::vector<std::string>>> parts_;
};

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", p.string(), e.what()));
  }
}

}  // namespace

void register_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand("quantize", "Write an NF4 (bitsandbytes, transformers bnb-4bit layout) checkpoint");
  static std::string model, out;
  static int blocksize = 64;
  static bool no_double_quant = false;
  static double shard_mb = 4096;
  cmd->add_option("--model", model, "Float checkpoint folder")->required();
  cmd->add_option("--out", out, "Output folder")->required();
  cmd->add_option("--blocksize", blocksize, "NF4 block size")->capture_default_str()
      ->check(CLI::IsMember({32, 64, 128, 256, 512, 1024, 2048, 4096}));
  cmd->add_flag("--no-double-quant", no_double_quant, "Keep absmax in FP32 (bnb_4bit_use_double_quant=false)");
  cmd->add_option("--shard-size-mb", shard_mb, "Largest shard")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->callback([] {
    const auto ck = Checkpoint::open(model, stderr_is_terminal());
    const auto& c = ck->config();
    if (c.quantization.nf4) throw Error(fmt::format("{}: already an NF4 checkpoint", model));
    if (fs::exists(out) && fs::equivalent(model, out)) throw Error("--out must differ from --model");
    fs::create_directories(out);
    // The dtype bitsandbytes records is that of the weights it quantized.
    const std::string dtype = c.torch_dtype.empty() ? "float32" : c.torch_dtype;
    const auto nf4_names = c.nf4_weight_names();
    const std::set<std::string> quantize(nf4_names.begin(), nf4_names.end());
    const auto specs = c.expected_tensors();
    ShardWriter shards(out, int64_t(shard_mb * double(1 << 20)));
    Progress progress("quantizing", int64_t(specs.size()), stderr_is_terminal());
    int64_t before = 0, after = 0;
    for (const auto& spec : specs) {
      const auto& info = ck->info(spec.name);
      before += int64_t(info.nbytes());
      if (quantize.count(spec.name)) {
        const auto values = ck->read_f32(spec.name);
        auto q = nf4::quantize_nf4(values.data(), int64_t(values.size()), blocksize, !no_double_quant,
                                   omp_get_max_threads());
        q.shape = spec.shape;
        q.dtype = dtype;
        for (auto& t : nf4::to_safetensors(q, spec.name)) {
          after += int64_t(t.data.size());
          shards.add(std::move(t));
        }
      } else {
        const auto bytes = ck->file_of(spec.name).bytes(info);
        after += int64_t(bytes.size());
        shards.add(TensorToWrite{spec.name, info.dtype, info.shape, {bytes.begin(), bytes.end()}});
      }
      progress.advance();
    }
    progress.finish();
    shards.finish();
    if (fs::exists(ck->tokenizer_path()))
      fs::copy_file(ck->tokenizer_path(), fs::path(out) / "tokenizer.model", fs::copy_options::overwrite_existing);
    // config.json last: a folder left by an interrupted run is not mistaken for a checkpoint.
    auto config = read_json(fs::path(model) / "config.json");
    config["quantization_config"] = {{"quant_method", "bitsandbytes"},
                                     {"_load_in_4bit", true},
                                     {"_load_in_8bit", false},
                                     {"load_in_4bit", true},
                                     {"load_in_8bit", false},
                                     {"bnb_4bit_quant_type", "nf4"},
                                     {"bnb_4bit_use_double_quant", !no_double_quant},
                                     {"bnb_4bit_compute_dtype", dtype},
                                     {"bnb_4bit_quant_storage", "uint8"},
                                     {"llm_int8_skip_modules", nullptr},
                                     {"llm_int8_threshold", 6.0},
                                     {"llm_int8_has_fp16_weight", false},
                                     {"llm_int8_enable_fp32_cpu_offload", false}};
    write_file_atomic((fs::path(out) / "config.json").string(), config.dump(2) + "\n");
    fmt::print("wrote {}: {} weights in NF4 (blocksize {}, double quantization {}), {:.1f} MiB -> {:.1f} MiB\n", out,
               nf4_names.size(), blocksize, no_double_quant ? "off" : "on", double(before) / double(1 << 20),
               double(after) / double(1 << 20));
  });
}

}  // namespace moelab::cli
