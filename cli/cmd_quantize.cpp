// moelab quantize: write a pre-quantized NF4 checkpoint in the form transformers 4.x saves bnb-4bit
// models (packed uint8 weights with absmax / quant_map / nested statistics / quant_state JSON beside
// them, and quantization_config in config.json), which moelab's NF4 engines then memory-map.
#include <fcntl.h>
#include <fmt/format.h>
#include <omp.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "cli/output_folder.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/regular_file.hpp"
#include "core/safetensors_shards.hpp"
#include "core/safetensors_writer.hpp"
#include "optimized/nf4/nf4.hpp"
#include "core/json_bounded.hpp"

namespace moelab::cli {
namespace {

namespace fs = std::filesystem;

nlohmann::json read_json(const fs::path& p) {
  const std::string text = read_regular_file(p.string(), "config");
  try {
    return parse_json_bounded(text, p.string());
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", p.string(), e.what()));
  }
}

bool looks_like_checkpoint(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const auto name = e.path().filename().string();
    if (name == "config.json" || e.path().extension() == ".safetensors" || name == "model.safetensors.index.json")
      return true;
  }
  return false;
}

// What --output holds now: nothing, an empty folder, or a folder to replace (only with --force, and only a
// checkpoint: --force never deletes a folder of other files). Anything else is refused before any work.
bool out_exists_and_may_be_replaced(const fs::path& out, const std::string& model, bool force) {
  std::error_code ec;
  const auto st = fs::status(out, ec);
  if (ec && st.type() != fs::file_type::not_found)
    throw Error(fmt::format("{}: cannot use as --output ({})", out.string(), ec.message()));
  if (st.type() == fs::file_type::not_found) return false;
  if (st.type() != fs::file_type::directory)
    throw Error(fmt::format("{}: --output exists and is not a folder", out.string()));
  if (fs::equivalent(model, out, ec)) throw Error("--output must differ from --model");
  const auto m = fs::weakly_canonical(model, ec), o = fs::weakly_canonical(out, ec);
  if (!ec && std::mismatch(o.begin(), o.end(), m.begin(), m.end()).first == o.end())
    throw Error(fmt::format("{}: --output contains --model {}; choose another folder", out.string(), model));
  const bool empty = fs::is_empty(out, ec);
  if (ec) throw Error(fmt::format("{}: cannot read --output ({})", out.string(), ec.message()));
  if (empty) return true;
  if (!force)
    throw Error(fmt::format("{}: --output is not empty; pass --force to replace it with the new checkpoint (its files are "
                            "then deleted)", out.string()));
  if (!looks_like_checkpoint(out))
    throw Error(fmt::format("{}: --force replaces only a folder holding a checkpoint (config.json, *.safetensors), "
                            "and this one holds none: remove it yourself or choose another --output", out.string()));
  return true;
}

// Puts the finished checkpoint `tmp` at `out` in one step: a rename when `out` is absent, else an atomic
// exchange (renameat2 RENAME_EXCHANGE) after which the old checkpoint, now at `tmp`, is deleted. A reader
// sees the old checkpoint or the new one, never a mixture.
void swap_into_place(const fs::path& tmp, const fs::path& out, bool out_exists) {
  if (!out_exists) {
    if (::rename(tmp.c_str(), out.c_str()) != 0)
      throw Error(fmt::format("{}: cannot move the new checkpoint into place ({})", out.string(), std::strerror(errno)));
    return;
  }
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, out.c_str(), RENAME_EXCHANGE) != 0) {
    if (errno != EINVAL && errno != ENOSYS)
      throw Error(fmt::format("{}: cannot swap the new checkpoint into place ({})", out.string(), std::strerror(errno)));
    // No atomic exchange on this filesystem: move the old one aside, then the new one in.
    const fs::path old = fs::path(tmp).concat(".old");
    if (::rename(out.c_str(), old.c_str()) != 0)
      throw Error(fmt::format("{}: cannot move the old checkpoint aside ({})", out.string(), std::strerror(errno)));
    if (::rename(tmp.c_str(), out.c_str()) != 0) {
      const int e = errno;
      ::rename(old.c_str(), out.c_str());
      throw Error(fmt::format("{}: cannot move the new checkpoint into place ({})", out.string(), std::strerror(e)));
    }
    std::error_code ec;
    fs::remove_all(old, ec);
    return;
  }
  std::error_code ec;
  fs::remove_all(tmp, ec);  // the old checkpoint
  if (ec)
    fmt::print(stderr, "warning: {}: the replaced checkpoint could not be deleted ({})\n", tmp.string(), ec.message());
}

struct QuantizeArgs {
  std::string model, out;
  int blocksize = 64;
  bool no_double_quant = false;
  double shard_mb = 4096;
  bool force = false;
};

struct QuantizeSizes {
  int64_t before = 0, after = 0;
};

// Writes the NF4 checkpoint of `ck` into the (new, empty) folder `out_dir`.
QuantizeSizes write_quantized(const Checkpoint& ck, const QuantizeArgs& a, const fs::path& out_dir) {
  const auto& c = ck.config();
  // The dtype bitsandbytes records is that of the weights it quantized.
  const std::string dtype = c.torch_dtype.empty() ? "float32" : c.torch_dtype;
  const auto nf4_names = c.nf4_weight_names();
  const std::set<std::string> quantize(nf4_names.begin(), nf4_names.end());
  const auto specs = c.expected_tensors();
  // One tensor at a time: read (its pages released from this process once converted), quantized on
  // every thread, spilled to disk; memory stays at one tensor's FP32 copy and its NF4 form.
  SafetensorsShardWriter shards(out_dir, shard_size_bytes(a.shard_mb), {{"format", "pt"}});
  int64_t input_bytes = 0;
  for (const auto& spec : specs) input_bytes += int64_t(ck.info(spec.name).nbytes());
  Progress progress("quantizing", input_bytes, /*enabled=*/true, Progress::Unit::Bytes);
  QuantizeSizes sizes;
  for (const auto& spec : specs) {
    const auto& info = ck.info(spec.name);
    sizes.before += int64_t(info.nbytes());
    if (quantize.count(spec.name)) {
      const auto values = ck.read_f32(spec.name);  // a NaN / Inf fails here, naming the tensor and shard
      ck.file_of(spec.name).release(info);
      auto q = nf4::quantize_nf4(values.data(), int64_t(values.size()), a.blocksize, !a.no_double_quant,
                                 omp_get_max_threads());
      q.shape = spec.shape;
      q.dtype = dtype;
      for (auto& t : nf4::to_safetensors(q, spec.name)) {
        sizes.after += int64_t(t.data.size());
        shards.add(std::move(t));
      }
    } else {
      const auto bytes = ck.file_of(spec.name).bytes(info);
      sizes.after += int64_t(bytes.size());
      shards.add(TensorToWrite{spec.name, info.dtype, info.shape, {bytes.begin(), bytes.end()}});
      ck.file_of(spec.name).release(info);
    }
    progress.advance(int64_t(info.nbytes()));
  }
  progress.finish();
  shards.finish();
  copy_if_present(ck.tokenizer_path(), out_dir / "tokenizer.model");
  // config.json last: a folder left by an interrupted run is not mistaken for a checkpoint.
  auto config = read_json(fs::path(a.model) / "config.json");
  config["quantization_config"] = {{"quant_method", "bitsandbytes"},
                                   {"_load_in_4bit", true},
                                   {"_load_in_8bit", false},
                                   {"load_in_4bit", true},
                                   {"load_in_8bit", false},
                                   {"bnb_4bit_quant_type", "nf4"},
                                   {"bnb_4bit_use_double_quant", !a.no_double_quant},
                                   {"bnb_4bit_compute_dtype", dtype},
                                   {"bnb_4bit_quant_storage", "uint8"},
                                   {"llm_int8_skip_modules", nullptr},
                                   {"llm_int8_threshold", 6.0},
                                   {"llm_int8_has_fp16_weight", false},
                                   {"llm_int8_enable_fp32_cpu_offload", false}};
  write_file_atomic((out_dir / "config.json").string(), config.dump(2) + "\n");
  return sizes;
}

void run_quantize(const QuantizeArgs& a) {
  const fs::path out_dir = output_folder(a.out, "quantize");
  const bool out_exists = out_exists_and_may_be_replaced(out_dir, a.model, a.force);
  const auto ck = Checkpoint::open(a.model, /*show_progress=*/true);
  if (ck->config().quantization.nf4) throw Error(fmt::format("{}: already an NF4 checkpoint", a.model));
  // Everything is written into a new folder beside --output and swapped in when complete: --output never
  // mixes two checkpoints, and a failed run leaves it as it was.
  const fs::path tmp = make_temp_sibling(out_dir);
  QuantizeSizes sizes;
  try {
    sizes = write_quantized(*ck, a, tmp);
  } catch (const fs::filesystem_error& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw Error(fmt::format("{}: cannot write the new checkpoint ({})", out_dir.string(), e.code().message()));
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  swap_into_place(tmp, out_dir, out_exists);
  fmt::print("wrote {}: {} weights in NF4 (blocksize {}, double quantization {}), {:.1f} MiB -> {:.1f} MiB\n", a.out,
             ck->config().nf4_weight_names().size(), a.blocksize, a.no_double_quant ? "off" : "on",
             double(sizes.before) / double(1 << 20), double(sizes.after) / double(1 << 20));
}

}  // namespace

void register_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand("quantize", "Write an NF4 (bitsandbytes, transformers bnb-4bit layout) checkpoint");
  static QuantizeArgs a;
  add_model_option(*cmd, a.model, /*required=*/true);
  add_output_option(*cmd, a.out, "Output folder (new, empty, or with --force a checkpoint to replace)");
  add_deprecated_alias(*cmd, "--out", "--output", [](const std::string& v) { a.out = v; });
  add_progress_option(*cmd);
  cmd->add_option("--blocksize", a.blocksize, "NF4 block size")->capture_default_str()
      ->check(CLI::IsMember({32, 64, 128, 256, 512, 1024, 2048, 4096}));
  cmd->add_flag("--no-double-quant", a.no_double_quant, "Keep absmax in FP32 (bnb_4bit_use_double_quant=false)");
  add_shard_size_option(*cmd, a.shard_mb);
  cmd->add_flag("--force", a.force, "Replace the checkpoint already in --output (swapped atomically once the new one is "
                                    "complete; the old files are then deleted)");
  cmd->callback([] { run_quantize(a); });
}

}  // namespace moelab::cli
