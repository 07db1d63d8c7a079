// moelab merge: a checkpoint with a LoRA adapter merged into its weights, W' = W + scale · B A for every
// adapted weight, as peft's merge_and_unload() computes it ((lora_B.weight @ lora_A.weight) * scaling, in
// FP32), written as safetensors (F32, or BF16 rounded to nearest even) with config.json and
// tokenizer.model beside them. Tensor by tensor: memory stays at one weight's FP32 copy.
#include <fcntl.h>
#include <fmt/format.h>
#include <stdio.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "cli/output_folder.hpp"
#include "core/checkpoint.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "core/progress.hpp"
#include "core/regular_file.hpp"
#include "core/safetensors_shards.hpp"
#include "core/safetensors_writer.hpp"
#include "core/json_bounded.hpp"

namespace moelab::cli {
namespace {

namespace fs = std::filesystem;

struct MergeArgs {
  std::string model, adapter, out, dtype = "f32";
  double shard_mb = 4096;
};

// A merged weight must be finite in the dtype written: W + scale * B A can overflow float where the adapter
// or the base weight is extreme, and a finite float beyond BF16's range rounds to Inf. A checkpoint with an
// Inf is refused by every reader afterwards, so the merge stops here, naming the tensor, before the output
// folder is renamed into place (the caller removes it).
void check_merged_finite(const std::vector<float>& values, DType dtype, const std::string& tensor, const std::string& source) {
  for (size_t i = 0; i < values.size(); ++i) {
    const bool finite = std::isfinite(values[i]) && (dtype != DType::BF16 || std::isfinite(bf16_to_f32(f32_to_bf16(values[i]))));
    if (!finite)
      throw Error(fmt::format("{}: merging gives tensor '{}' the value {} at element {}{}, which a checkpoint cannot hold; "
                              "nothing was written", source, tensor, values[i], i,
                              std::isfinite(values[i]) ? " (beyond BF16's range)" : ""));
  }
}

// Writes the merged checkpoint into the (new, empty) folder `dir`; returns how many weights were adapted.
size_t write_merged(const Checkpoint& ck, const LoraAdapter& adapter, const MergeArgs& a, const fs::path& dir) {
  const auto& c = ck.config();
  const DType dtype = a.dtype == "bf16" ? DType::BF16 : DType::F32;
  SafetensorsShardWriter shards(dir, shard_size_bytes(a.shard_mb), {{"format", "pt"}});
  const auto specs = c.expected_tensors();
  int64_t input_bytes = 0;
  for (const auto& spec : specs) input_bytes += int64_t(ck.info(spec.name).nbytes());
  Progress progress("merging", input_bytes, /*enabled=*/true, Progress::Unit::Bytes);
  size_t merged = 0;
  for (const auto& spec : specs) {
    const auto& info = ck.info(spec.name);
    std::vector<float> values = ck.read_f32(spec.name);  // a NaN / Inf fails here, naming the tensor and shard
    ck.file_of(spec.name).release(info);
    if (const LoraFactors* f = adapter.find(spec.name)) {
      Eigen::Map<MatrixRF> w(values.data(), spec.shape[0], spec.shape[1]);
      const MatrixRF delta = (f->b * f->a) * float(f->scale);  // peft: (B @ A) * scaling, in FP32
      w += delta;
      ++merged;
    }
    check_merged_finite(values, dtype, spec.name, adapter.find(spec.name) ? adapter.dir() : ck.dir());
    TensorToWrite t{spec.name, dtype, spec.shape, {}};
    if (dtype == DType::F32) {
      t.data.resize(values.size() * sizeof(float));
      std::memcpy(t.data.data(), values.data(), t.data.size());
    } else {
      t.data.resize(values.size() * sizeof(uint16_t));
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t bits = f32_to_bf16(values[i]);
        std::memcpy(t.data.data() + 2 * i, &bits, 2);
      }
    }
    shards.add(t);
    progress.advance(int64_t(info.nbytes()));
  }
  progress.finish();
  shards.finish();
  for (const char* file : {"tokenizer.model", "generation_config.json"})
    copy_if_present(fs::path(ck.dir()) / file, dir / file);
  // config.json last (a folder left by an interrupted run is not mistaken for a checkpoint), with its
  // dtype saying what the weights now are.
  const std::string config_path = (fs::path(ck.dir()) / "config.json").string();
  nlohmann::ordered_json config;
  try {
    config = parse_json_bounded<nlohmann::ordered_json>(read_regular_file(config_path, "config"), config_path);
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", config_path, e.what()));
  }
  const char* dtype_name = dtype == DType::BF16 ? "bfloat16" : "float32";
  bool named = false;
  for (const char* key : {"torch_dtype", "dtype"})
    if (config.contains(key)) config[key] = dtype_name, named = true;
  if (!named) config["torch_dtype"] = dtype_name;
  write_file_atomic((dir / "config.json").string(), config.dump(2) + "\n");
  return merged;
}

void run_merge(const MergeArgs& a) {
  const fs::path out_dir = output_folder(a.out, "merge");
  std::error_code ec;
  if (fs::symlink_status(out_dir, ec).type() != fs::file_type::not_found)
    throw Error(fmt::format("{}: --output exists; merge writes a new folder and never replaces one", out_dir.string()));
  const auto ck = Checkpoint::open(a.model, /*show_progress=*/true);
  if (ck->config().quantization.nf4)
    throw Error(fmt::format("{}: a pre-quantized NF4 checkpoint; merge the adapter into the float checkpoint it was "
                            "quantized from (or run the NF4 one with --adapter)", a.model));
  const auto adapter = LoraAdapter::load(a.adapter, ck->config());
  fmt::print(stderr, "[merge] adapter {}\n", adapter->summary());
  // Written into a new folder beside --output, renamed into place when complete: --output appears whole or
  // not at all.
  const fs::path tmp = make_temp_sibling(out_dir);
  size_t merged = 0;
  try {
    merged = write_merged(*ck, *adapter, a, tmp);
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, out_dir.c_str(), RENAME_NOREPLACE) != 0) {
      if (errno == EEXIST || errno == ENOTEMPTY)
        throw Error(fmt::format("{}: --output appeared while merging; it is left as it is", out_dir.string()));
      if ((errno != EINVAL && errno != ENOSYS) || fs::exists(out_dir) || ::rename(tmp.c_str(), out_dir.c_str()) != 0)
        throw Error(fmt::format("{}: cannot move the merged checkpoint into place ({})", out_dir.string(),
                                std::strerror(errno)));
    }
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw Error(fmt::format("{}: cannot write the merged checkpoint ({})", out_dir.string(), e.code().message()));
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  fmt::print("wrote {}: {} of {} tensors merged with {} (W + scale * B A), {}\n", a.out, merged,
             ck->config().expected_tensor_count(), a.adapter, a.dtype == "bf16" ? "BF16" : "F32");
}

}  // namespace

void register_merge(CLI::App& app) {
  auto* cmd = app.add_subcommand("merge", "Merge a peft LoRA adapter into a checkpoint's weights (as peft's merge_and_unload)");
  static MergeArgs a;
  add_model_option(*cmd, a.model, /*required=*/true);
  cmd->add_option("--adapter", a.adapter, "The peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
      ->required();
  add_output_option(*cmd, a.out, "Output folder (must not exist; written whole, then renamed into place)");
  add_deprecated_alias(*cmd, "--out", "--output", [](const std::string& v) { a.out = v; });
  cmd->add_option("--dtype", a.dtype, "Weights' dtype: f32, or bf16 (rounded to nearest even)")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  add_shard_size_option(*cmd, a.shard_mb);
  add_progress_option(*cmd);
  cmd->callback([] { run_merge(a); });
}

}  // namespace moelab::cli
