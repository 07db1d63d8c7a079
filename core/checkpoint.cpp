#include "core/checkpoint.hpp"

#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "core/regular_file.hpp"
#include "core/progress.hpp"
#include "core/json_bounded.hpp"

namespace moelab {

namespace fs = std::filesystem;


std::unique_ptr<Checkpoint> Checkpoint::open(const std::string& dir, bool show_progress) {
  if (path_type(dir) != fs::file_type::directory) throw Error(fmt::format("{}: not a directory (expected a checkpoint folder)", dir));
  std::unique_ptr<Checkpoint> ck(new Checkpoint());
  ck->dir_ = dir;
  const fs::path root(dir);
  ck->config_ = ModelConfig::from_json_file((root / "config.json").string());

  const fs::path single = root / "model.safetensors";
  const fs::path index = root / "model.safetensors.index.json";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  if (path_type(index) != fs::file_type::not_found) {
    const std::string text = read_regular_file(index.string(), "safetensors index", 256u << 20);
    nlohmann::json j;
    try {
      j = parse_json_bounded(text, index.string());
    } catch (const nlohmann::json::exception& e) {
      throw Error(fmt::format("{}: not valid JSON ({})", index.string(), e.what()));
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw Error(fmt::format("{}: no 'weight_map' object", index.string()));
    std::set<std::string> seen;
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) throw Error(fmt::format("{}: weight_map['{}'] is not a file name", index.string(), printable_name(name)));
      const auto f = file.get<std::string>();
      if (f.find('/') != std::string::npos || f == "..")
        throw Error(fmt::format("{}: shard name '{}' for '{}' is not a plain file name", index.string(),
                                printable_name(f), printable_name(name)));
      weight_map[name] = f;
      if (seen.insert(f).second) shard_names.push_back(f);
    }
    for (const auto& f : shard_names)
      if (path_type(root / f) == fs::file_type::not_found)
        throw Error(fmt::format("{}: missing shard (listed in {})", printable((root / f).string()),
                                index.filename().string()));
  } else if (path_type(single) != fs::file_type::not_found) {
    shard_names.push_back("model.safetensors");
  } else {
    throw Error(fmt::format("{}: no model.safetensors or model.safetensors.index.json", dir));
  }

  Progress progress("validating shards", int64_t(shard_names.size()), show_progress);
  for (const auto& f : shard_names) {
    ck->shards_.push_back(std::make_unique<SafetensorsFile>((root / f).string()));
    progress.advance();
  }
  progress.finish();

  for (const auto& shard : ck->shards_) {
    const auto shard_file = fs::path(shard->path()).filename().string();
    for (const auto& [name, _] : shard->tensors()) {
      if (!weight_map.empty()) {
        auto it = weight_map.find(name);
        if (it == weight_map.end()) {
          ck->warnings_.push_back(
              fmt::format("{}: tensor '{}' is not listed in the index", shard->path(), printable_name(name)));
          continue;
        }
        if (it->second != shard_file) continue;  // the index says it lives elsewhere
      }
      if (!ck->where_.emplace(name, shard.get()).second)
        throw Error(fmt::format("{}: tensor '{}' also appears in {}", shard->path(), printable_name(name),
                                ck->where_[name]->path()));
    }
  }
  for (const auto& [name, file] : weight_map)
    if (!ck->where_.count(name))
      throw Error(fmt::format("{}: tensor '{}' is listed in the index for this shard but is not in it",
                              printable((root / file).string()), printable_name(name)));
  ck->validate_against_config();
  return ck;
}

void Checkpoint::validate_against_config() {
  std::set<std::string> expected;
  std::vector<std::string> nf4_prefixes;
  // Tensor by tensor, without building the whole list first: a config claiming 1000 layers over a
  // 2-layer checkpoint stops at the first missing tensor, having allocated nothing more.
  config_.for_each_expected_tensor([&](const TensorSpec& spec) {
    expected.insert(spec.name);
    auto it = where_.find(spec.name);
    if (it == where_.end())
      throw Error(fmt::format("{}: missing tensor '{}' (config.json implies it with shape {})", dir_,
                              printable(spec.name), shape_str(spec.shape)));
    const auto& t = it->second->info(spec.name);
    if (spec.nf4) {
      // A bitsandbytes NF4 weight: packed codes here, its statistics beside it (checked in full by
      // the NF4 engines when they read it, still before any compute).
      int64_t numel = 1;
      for (auto d : spec.shape) numel *= d;
      const std::vector<int64_t> packed{(numel + 1) / 2, 1};
      if (t.dtype != DType::U8 || t.shape != packed)
        throw Error(fmt::format("{}: tensor '{}' is {} {} but an NF4 weight of shape {} is stored as U8 {}",
                                it->second->path(), printable(spec.name), dtype_name(t.dtype), shape_str(t.shape),
                                shape_str(spec.shape), shape_str(packed)));
      for (const char* aux : {".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"})
        if (!where_.count(spec.name + aux))
          throw Error(fmt::format("{}: NF4 weight '{}' has no '{}{}' tensor", dir_, printable(spec.name),
                                  printable(spec.name), aux));
      nf4_prefixes.push_back(spec.name + ".");
      // Its float statistics (absmax, quant maps, offset) are small and are used as they are: a NaN among
      // them is caught now, naming the tensor and file (the codes themselves cannot be non-finite).
      for (auto aux = where_.lower_bound(spec.name + "."); aux != where_.end() && aux->first.rfind(spec.name + ".", 0) == 0;
           ++aux)
        aux->second->check_finite(aux->second->info(aux->first));
      return;
    }
    if (t.shape != spec.shape)
      throw Error(fmt::format("{}: tensor '{}' has shape {} but config.json implies {}", it->second->path(),
                              printable(spec.name), shape_str(t.shape), shape_str(spec.shape)));
    if (!dtype_is_float_convertible(t.dtype))
      throw Error(fmt::format("{}: tensor '{}' has dtype {}, expected F32, F16 or BF16", it->second->path(),
                              printable(spec.name), dtype_name(t.dtype)));
  });
  auto is_nf4_aux = [&](const std::string& name) {
    for (const auto& p : nf4_prefixes)
      if (name.rfind(p, 0) == 0) return true;
    return false;
  };
  for (const auto& [name, file] : where_)
    if (!expected.count(name) && !is_nf4_aux(name) && name.find("rotary_emb.inv_freq") == std::string::npos)
      warnings_.push_back(fmt::format("{}: tensor '{}' is not used by a {} with this config", file->path(),
                                      printable_name(name), config_.arch_name()));
}

std::string Checkpoint::tokenizer_path() const { return (fs::path(dir_) / "tokenizer.model").string(); }

const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error(fmt::format("{}: no tensor named '{}'", dir_, printable_name(name)));
  return *it->second;
}

const TensorInfo& Checkpoint::info(const std::string& name) const { return file_of(name).info(name); }

// Weights are checked for NaN / infinity as they are converted: a corrupt value fails the load, naming
// the tensor and the file, instead of giving garbage text.
std::vector<float> Checkpoint::read_f32(const std::string& name) const {
  return file_of(name).read_f32(name, /*check_finite=*/true);
}

void Checkpoint::read_rows_f32(const std::string& name, int64_t first, int64_t count, float* dst) const {
  const auto& f = file_of(name);
  const auto& t = f.info(name);
  if (t.shape.size() != 2) throw Error(fmt::format("{}: tensor '{}' is not 2-D", f.path(), name));
  if (first < 0 || first + count > t.shape[0])
    throw Error(fmt::format("{}: tensor '{}': rows [{}, {}) outside its {} rows", f.path(), name, first,
                            first + count, t.shape[0]));
  f.read_f32(t, first * t.shape[1], count * t.shape[1], dst, /*check_finite=*/true);
}

}  // namespace moelab
