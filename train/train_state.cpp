// Training checkpoints: writing one atomically and reading one back with every check a resume needs.
#include "train/train_state.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "core/error.hpp"
#include "core/regular_file.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"
#include "core/json_bounded.hpp"

namespace moelab::train {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "moelab-finetune-checkpoint";
constexpr int kVersion = 1;

// A fingerprint value for an error line: JSON (control characters escaped by dump), cut short past 200
// characters so a huge value from a damaged file stays one readable line.
std::string describe(const nlohmann::json& v) {
  if (v.is_null()) return "nothing";
  std::string s = v.dump();
  if (s.size() > 200) s = s.substr(0, 200) + "...";
  return s;
}

// trainer_state.json nests three levels; far deeper nesting is a damaged or hostile file, refused while parsing
// (nlohmann's recursive destructor and dump would overflow the stack on a value nested 100000 deep).
constexpr int kMaxStateDepth = 16;

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

std::vector<std::string> read_train_checkpoint(const std::string& dir, std::span<const ParamView> views, AdamW& adam,
                                               TrainCounters& c, const nlohmann::json& fingerprint) {
  const std::string state_path = (fs::path(dir) / "trainer_state.json").string();
  std::error_code ec;
  // error_code forms: a symbolic-link loop or an unreadable parent is one line naming the path, not an exception
  // from the standard library.
  const auto dir_type = fs::status(dir, ec).type();
  if (ec && dir_type != fs::file_type::not_found)
    throw Error(fmt::format("{}: --resume-from-checkpoint: {}", dir, ec.message()));
  if (dir_type != fs::file_type::directory)
    throw Error(fmt::format("{}: --resume-from-checkpoint is not a folder (give OUTPUT/checkpoint-STEP)", dir));
  const auto state_type = fs::status(state_path, ec).type();
  if (ec && state_type != fs::file_type::not_found) throw Error(fmt::format("{}: {}", state_path, ec.message()));
  if (state_type == fs::file_type::not_found)
    throw Error(fmt::format("{}: no trainer_state.json; not a moelab finetune checkpoint", dir));
  nlohmann::json j;
  try {
    j = parse_json_bounded(read_regular_file(state_path, "trainer state"), state_path, true, kMaxStateDepth);
    if (!j.is_object() || j.value("format", "") != kFormat || j.value("version", 0) != kVersion)
      throw Error(fmt::format("{}: not a {} version {} file", state_path, kFormat, kVersion));
    // Counts are integers: nlohmann would truncate 1.5 to 1 without a word.
    for (const char* key : {"step", "tokens", "target_tokens"})
      if (!j.at(key).is_number_integer())
        throw Error(fmt::format("{}: \"{}\" is {}, not an integer", state_path, key, j.at(key).dump().substr(0, 40)));
    if (!j.contains("fingerprint") || !j.at("fingerprint").is_object())
      throw Error(fmt::format("{}: no \"fingerprint\" object", state_path));
    c.step = j.at("step").get<int64_t>();
    c.epoch = j.at("epoch").get<double>();
    c.elapsed_s = j.at("elapsed_s").get<double>();
    c.tokens = j.at("tokens").get<int64_t>();
    c.target_tokens = j.at("target_tokens").get<int64_t>();
    c.evals = j.at("evals");
    // Each evaluation is {"step": S, "eval_loss": L} with S no later than the checkpoint (the loop reads them).
    if (!c.evals.is_array()) throw Error(fmt::format("{}: \"evals\" is {}, not a list", state_path, c.evals.type_name()));
    for (const auto& e : c.evals) {
      if (!e.is_object() || !e.contains("step") || !e.contains("eval_loss") || !e.at("step").is_number_integer() ||
          !e.at("eval_loss").is_number())
        throw Error(fmt::format("{}: an entry of \"evals\" is not {{\"step\": integer, \"eval_loss\": number}}",
                                state_path));
      const int64_t s = e.at("step").get<int64_t>();
      if (s < 0 || s > c.step)
        throw Error(fmt::format("{}: \"evals\" has step {}, outside 0..{} (the checkpoint's step)", state_path, s, c.step));
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: {}", state_path, e.what()));
  }
  // Counters a run can have reached: a negative step would index the data order out of range, a negative
  // count or a non-finite time would be carried into the log and the summary.
  if (c.step < 0) throw Error(fmt::format("{}: \"step\" is {}; a step count is never negative", state_path, c.step));
  if (c.tokens < 0 || c.target_tokens < 0 || c.target_tokens > c.tokens)
    throw Error(fmt::format("{}: \"tokens\" {} and \"target_tokens\" {} are not counts (0 <= target_tokens <= tokens)",
                            state_path, c.tokens, c.target_tokens));
  if (!(std::isfinite(c.epoch) && c.epoch >= 0) || !(std::isfinite(c.elapsed_s) && c.elapsed_s >= 0))
    throw Error(fmt::format("{}: \"epoch\" {} and \"elapsed_s\" {} must be finite and not negative", state_path,
                            c.epoch, c.elapsed_s));
  const nlohmann::json& saved = j.at("fingerprint");
  std::vector<std::string> changed;
  for (const auto& [key, value] : fingerprint.items()) {
    // The model's and the data's identities were added to the fingerprint later: a checkpoint written before
    // has neither, and resumes on the other keys alone.
    if (!saved.contains(key) && (key == "base_model_identity" || key == "train_data_sha256")) continue;
    const nlohmann::json was = saved.contains(key) ? saved[key] : nlohmann::json();
    const bool adjustable = key == "learning_rate" || key == "weight_decay" || key == "max_grad_norm";
    if (was != value && adjustable && was.is_number()) {
      changed.push_back(fmt::format("{} = {} (the checkpoint's run had {})", key, describe(value), describe(was)));
      continue;
    }
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
  // AdamW counts each tensor's own steps: at most the checkpoint's step (fewer for an expert's factors on steps
  // no token reached it, as torch skips a parameter whose grad is None) and never negative (a count past the
  // step or below zero would make the bias corrections 1 - beta^t wrong, even zero or negative).
  if (c.step > 0 && st.steps.empty())
    throw Error(fmt::format("{}: \"adamw_steps\" is empty at step {}", state_path, c.step));
  for (const auto& [name, t] : st.steps)
    if (t < 0 || t > c.step)
      throw Error(fmt::format("{}: \"adamw_steps\" of {} is {}, outside 0 to the checkpoint's step {}", state_path,
                              printable(name), t, c.step));
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
  adam.restore(views, st, f.path());  // its errors name the file the moments came from
  return changed;
}

}  // namespace moelab::train
