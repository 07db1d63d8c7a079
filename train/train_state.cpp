// Training checkpoints: writing one atomically and reading one back with every check a resume needs.
#include "train/train_state.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "core/error.hpp"
#include "core/regular_file.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"

namespace moelab::train {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "moelab-finetune-checkpoint";
constexpr int kVersion = 1;

std::string describe(const nlohmann::json& v) { return v.is_null() ? "nothing" : v.dump(); }

}  // namespace

void write_train_checkpoint(const std::string& dir, const LoraParams<float>& params, const LoraRecipe& recipe,
                            const std::string& base_model, const AdamW& adam, std::span<const ParamView> views,
                            const TrainCounters& c, const nlohmann::json& fingerprint, const std::string& log_csv) {
  const fs::path final_dir(dir);
  const fs::path tmp = final_dir.parent_path() / fmt::format(".{}.tmp-{}", final_dir.filename().string(), ::getpid());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  try {
    fs::create_directories(tmp);
    params.save(tmp.string(), recipe, base_model);
    std::vector<TensorToWrite> tensors;
    for (const auto& v : views)
      tensors.push_back(make_f32_tensor("param." + v.name, {int64_t(v.value.size())}, v.value.data()));
    const auto st = adam.state(views);
    for (const auto& [name, values] : st.tensors)
      tensors.push_back(make_f32_tensor(name, {int64_t(values.size())}, values.data()));
    write_safetensors((tmp / "optimizer.safetensors").string(), tensors, {{"format", kFormat}});
    nlohmann::ordered_json j;
    j["format"] = kFormat;
    j["version"] = kVersion;
    j["step"] = c.step;
    j["epoch"] = c.epoch;
    j["elapsed_s"] = c.elapsed_s;
    j["tokens"] = c.tokens;
    j["target_tokens"] = c.target_tokens;
    j["evals"] = c.evals;
    j["adamw_steps"] = st.steps;
    j["fingerprint"] = fingerprint;
    write_file_atomic((tmp / "trainer_state.json").string(), j.dump(2) + "\n");
    if (!log_csv.empty() && fs::exists(log_csv)) fs::copy_file(log_csv, tmp / "train_log.csv");
    // A checkpoint of the same step from an earlier run (a resume from before it) is replaced.
    if (fs::exists(final_dir)) fs::remove_all(final_dir);
    fs::rename(tmp, final_dir);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw Error(fmt::format("{}: cannot write the checkpoint ({})", dir, e.code().message()));
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

void read_train_checkpoint(const std::string& dir, std::span<const ParamView> views, AdamW& adam, TrainCounters& c,
                           const nlohmann::json& fingerprint) {
  const std::string state_path = (fs::path(dir) / "trainer_state.json").string();
  if (!fs::is_directory(dir))
    throw Error(fmt::format("{}: --resume-from-checkpoint is not a folder (give OUTPUT/checkpoint-STEP)", dir));
  if (!fs::exists(state_path))
    throw Error(fmt::format("{}: no trainer_state.json; not a moelab finetune checkpoint", dir));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_regular_file(state_path, "trainer state"));
    if (j.value("format", "") != kFormat || j.value("version", 0) != kVersion)
      throw Error(fmt::format("{}: not a {} version {} file", state_path, kFormat, kVersion));
    c.step = j.at("step").get<int64_t>();
    c.epoch = j.at("epoch").get<double>();
    c.elapsed_s = j.at("elapsed_s").get<double>();
    c.tokens = j.at("tokens").get<int64_t>();
    c.target_tokens = j.at("target_tokens").get<int64_t>();
    c.evals = j.at("evals");
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: {}", state_path, e.what()));
  }
  const auto& saved = j["fingerprint"];
  for (const auto& [key, value] : fingerprint.items()) {
    const nlohmann::json was = saved.contains(key) ? saved[key] : nlohmann::json();
    if (was != value)
      throw Error(fmt::format("{}: the checkpoint was trained with {} = {}, this run has {}; a resume must use the "
                              "same data and training options", dir, key, describe(was), describe(value)));
  }
  const SafetensorsFile f((fs::path(dir) / "optimizer.safetensors").string());
  AdamW::State st;
  try {
    st.steps = j.at("adamw_steps").get<std::map<std::string, int64_t>>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: adamw_steps: {}", state_path, e.what()));
  }
  auto read = [&](const std::string& name, size_t n) {
    if (!f.contains(name)) throw Error(fmt::format("{}: no tensor {}", f.path(), name));
    const auto& t = f.info(name);
    if (t.numel() != int64_t(n))
      throw Error(fmt::format("{}: {} has {} values, the adapter {}", f.path(), name, t.numel(), n));
    std::vector<float> v(n);
    f.read_f32(t, 0, int64_t(n), v.data(), /*check_finite=*/true);
    return v;
  };
  for (const auto& v : views) {
    const auto values = read("param." + v.name, v.value.size());
    std::memcpy(v.value.data(), values.data(), values.size() * sizeof(float));
    if (!st.steps.empty()) {
      st.tensors["exp_avg." + v.name] = read("exp_avg." + v.name, v.value.size());
      st.tensors["exp_avg_sq." + v.name] = read("exp_avg_sq." + v.name, v.value.size());
    }
  }
  adam.restore(views, st, dir);
}

}  // namespace moelab::train
