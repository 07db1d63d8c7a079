// moelab forward: one forward pass over given tokens, dumping logits and every layer's hidden state,
// router logits, chosen experts and gates to a safetensors file (the contract other tools read).
#include <fmt/format.h>

#include <sstream>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {
namespace {

// Collects the dump contract's tensors: layers.<i>.hidden f32 [n, hidden], layers.<i>.router_logits
// f32 [n, experts] (MoE only), layers.<i>.experts i32 [n, k] rank order, layers.<i>.gates f32 [n, k].
class DumpProbe : public Probe {
 public:
  std::vector<TensorToWrite> tensors;
  void on_layer(const LayerObservation& o) override {
    const auto p = fmt::format("layers.{}.", o.layer);
    add_f32(p + "hidden", *o.hidden);
    if (o.router_logits) add_f32(p + "router_logits", *o.router_logits);
    tensors.push_back(make_i32_tensor(p + "experts", {o.experts->rows(), o.experts->cols()}, o.experts->data()));
    add_f32(p + "gates", *o.gates);
  }
  void add_f32(const std::string& name, const MatrixRF& m) {
    tensors.push_back(make_f32_tensor(name, {m.rows(), m.cols()}, m.data()));
  }
};

std::vector<int32_t> parse_token_list(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      const long v = std::stol(item, &used);
      if (used != item.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(item);
      ids.push_back(int32_t(v));
    } catch (const std::exception&) {
      throw Error(fmt::format("--tokens: '{}' is not a token id (expected e.g. 1,415,2936)", item));
    }
  }
  if (ids.empty()) throw Error("--tokens: no token ids given");
  return ids;
}

}  // namespace

void register_forward(CLI::App& app) {
  auto* cmd = app.add_subcommand("forward", "Run one forward pass and dump logits and per-layer tensors");
  static std::string model, tokens_text, text, dump;
  static bool no_bos = false;
  static EngineOptions eo;
  cmd->add_option("--model", model, "Checkpoint folder (default: the bundled model)");
  auto* tok_opt = cmd->add_option("--tokens", tokens_text, "Comma-separated token ids, used as given");
  auto* text_opt = cmd->add_option("--text", text, "Text, tokenized with BOS");
  tok_opt->excludes(text_opt);
  cmd->add_flag("--no-bos", no_bos, "With --text: do not prepend BOS");
  cmd->add_option("--dump", dump, "Output safetensors file")->required();
  add_engine_options(*cmd, eo);
  cmd->callback([] {
    if (tokens_text.empty() && text.empty()) throw Error("forward: give --tokens or --text");
    if (model.empty()) model = default_model_dir();
    const auto ck = Checkpoint::open(model, stderr_is_terminal());
    const auto ids = !tokens_text.empty() ? parse_token_list(tokens_text)
                                          : Tokenizer(ck->tokenizer_path()).encode(text, !no_bos);
    auto engine = make_engine(*ck, eo);
    DumpProbe probe;
    const MatrixRF logits = engine->forward(ids, &probe);
    probe.add_f32("logits", logits);
    probe.tensors.push_back(make_i32_tensor("tokens", {int64_t(ids.size())}, ids.data()));
    write_safetensors(dump, probe.tensors,
                      {{"engine", engine->name()}, {"model", model}, {"format", "moelab-forward-dump-v1"}});
    fmt::print("wrote {} ({} tokens, {} layers, {} tensors)\n", dump, ids.size(), ck->config().num_layers,
               probe.tensors.size());
  });
}

}  // namespace moelab::cli
