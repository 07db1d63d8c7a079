#include "core/lora.hpp"

// Reading follows peft 0.21.2 (tuners/lora/config.py, tuners/tuners_utils.py check_target_module_exists,
// utils/other.py get_pattern_key, tuners/lora/layer.py update_layer): which modules an adapter_config.json
// selects is decided the way peft decides it when it builds the model, over the module names
// transformers' MixtralForCausalLM / MistralForCausalLM have (model.named_modules()).

#include <fmt/format.h>
#include <fmt/ranges.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <re2/re2.h>

#include <algorithm>
#include <cctype>
#include <cfloat>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.hpp"
#include "core/regular_file.hpp"
#include "core/safetensors.hpp"
#include "core/json_bounded.hpp"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;  // rank_pattern / alpha_pattern are tried in the file's order, as peft does

// A peft config is a flat object whose deepest field (layer_replication, a list of pairs) is 3 levels down;
// nothing past kJsonNestingLimit (core/json_bounded.hpp) is read, so a document nested deeper is refused while
// it is parsed, before any recursive walk over it (serializing one 200,000 levels deep for a message
// overflowed the stack).
// Regular expressions from the config (target_modules, exclude_modules, layers_pattern, rank_pattern and
// alpha_pattern keys) are matched by RE2, in time linear in the name matched, where RE2 can read them. The
// longest a real one gets is a few hundred bytes (an alternation of module names); this is far above that.
constexpr size_t kMaxPatternBytes = 4096;
constexpr int64_t kMaxPatternMemory = 8 << 20;  // RE2's compiled-program and DFA budget, per expression
// A pattern with a lookaround or a backreference (Python's re reads them, RE2 cannot) is matched by PCRE2,
// which backtracks: these bound one match, so a pathological pattern ends in an error within milliseconds
// instead of running for hours. A real pattern over a module name needs a few hundred to a few thousand steps.
// Every pattern is tried on every module (928 on Mixtral-8x7B), so the number of backtracking patterns in one
// config is bounded too: 4096 rank_pattern keys each just under the step limit took 50 s on a 34-module model
// (review); 16 patterns x 928 names x 20,000 steps is about a second.
constexpr uint32_t kPcre2MatchLimit = 20000;
constexpr int kMaxBacktrackingPatterns = 16;
constexpr uint32_t kPcre2DepthLimit = 10000;
constexpr uint32_t kPcre2HeapLimitKiB = 16 * 1024;
// ordered_json (rank_pattern is tried in the file's order) finds each new key of an object by a linear
// search, so parsing an object of n fields costs n^2 / 2 string comparisons: 200,000 fields took tens of
// seconds. A peft config has a few dozen fields, and a rank_pattern at most one per module of the model.
constexpr size_t kMaxObjectFields = 16384;
// How much of a value from the file an error message shows.
constexpr size_t kShownBytes = 60;
const char* const kAdaptable = "the attention projections q_proj/k_proj/v_proj/o_proj, the router gate and the experts' w1/w2/w3 "
                               "(gate_proj/up_proj/down_proj in a dense model)";

// A module of transformers' model, by its named_modules() name; adaptable Linears carry their weight's
// checkpoint name and shape.
struct Module {
  std::string name, kind;
  std::string weight;  // empty: not adaptable by moelab
  int64_t out = 0, in = 0;
};

std::vector<Module> model_modules(const ModelConfig& c) {
  const std::string arch = c.is_moe() ? "Mixtral" : "Mistral";
  const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_experts;
  const int64_t q = int64_t(c.num_heads) * c.head_dim, kv = int64_t(c.num_kv_heads) * c.head_dim;
  std::vector<Module> m;
  const auto add = [&](std::string name, std::string kind) { m.push_back({std::move(name), std::move(kind), "", 0, 0}); };
  const auto linear = [&](std::string name, int64_t out, int64_t in) {
    std::string w = name + ".weight";
    m.push_back({std::move(name), "Linear", std::move(w), out, in});
  };
  add("model", arch + "Model");
  add("model.embed_tokens", "Embedding");
  add("model.layers", "ModuleList");
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}", l);
    add(p, arch + "DecoderLayer");
    add(p + ".self_attn", arch + "Attention");
    linear(p + ".self_attn.q_proj", q, H);
    linear(p + ".self_attn.k_proj", kv, H);
    linear(p + ".self_attn.v_proj", kv, H);
    linear(p + ".self_attn.o_proj", H, q);
    if (c.is_moe()) {
      add(p + ".block_sparse_moe", "MixtralSparseMoeBlock");
      linear(p + ".block_sparse_moe.gate", E, H);
      add(p + ".block_sparse_moe.experts", "ModuleList");
      for (int e = 0; e < c.num_experts; ++e) {
        const std::string x = fmt::format("{}.block_sparse_moe.experts.{}", p, e);
        add(x, "MixtralBlockSparseTop2MLP");
        linear(x + ".w1", I, H);
        linear(x + ".w2", H, I);
        linear(x + ".w3", I, H);
        add(x + ".act_fn", "SiLUActivation");
      }
    } else {
      add(p + ".mlp", "MistralMLP");
      linear(p + ".mlp.gate_proj", I, H);
      linear(p + ".mlp.up_proj", I, H);
      linear(p + ".mlp.down_proj", H, I);
      add(p + ".mlp.act_fn", "SiLUActivation");
    }
    add(p + ".input_layernorm", arch + "RMSNorm");
    add(p + ".post_attention_layernorm", arch + "RMSNorm");
  }
  add("model.norm", arch + "RMSNorm");
  add("model.rotary_emb", arch + "RotaryEmbedding");
  m.push_back({"lm_head", "Linear", "", 0, 0});  // a Linear, but not one moelab adapts
  return m;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// peft's list matching: the name itself, or a dotted suffix of it.
bool list_matches(const std::vector<std::string>& list, const std::string& key) {
  for (const auto& t : list)
    if (key == t || ends_with(key, "." + t)) return true;
  return false;
}

// The first `max` bytes of `s` or fewer, never ending inside a UTF-8 character.
std::string_view utf8_prefix(std::string_view s, size_t max) {
  if (s.size() <= max) return s;
  size_t cut = max;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  return s.substr(0, cut);
}

// A string from the file for a message: at most `max` bytes, "..." when cut, escaped for one terminal line
// (a message never carries a megabyte-long field or a control character).
std::string clipped(std::string_view s, size_t max = kShownBytes) {
  if (s.size() <= max) return printable(s);
  return printable(utf8_prefix(s, max - 3)) + "...";
}

// A JSON value as dump() writes it, but only its first `budget` bytes or so: containers are written element
// by element, and strings cut, until the budget is spent, so a huge value is never serialized whole.
void preview(const ojson& v, std::string& out, size_t budget) {
  if (v.is_string()) {
    out += ojson(std::string(utf8_prefix(v.get_ref<const std::string&>(), budget))).dump();
  } else if (v.is_array() || v.is_object()) {
    out += v.is_array() ? '[' : '{';
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (out.size() > budget) return;
      if (it != v.begin()) out += ',';
      if (v.is_object()) out += ojson(std::string(utf8_prefix(it.key(), budget))).dump() + ":";
      preview(*it, out, budget);
    }
    out += v.is_array() ? ']' : '}';
  } else {
    out += v.dump();  // a number, true/false or null: short
  }
}

bool is_empty_value(const ojson& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_array() && v.empty()) ||
         (v.is_object() && v.empty()) || (v.is_string() && v.get<std::string>().empty());
}

// What a pattern's text holds that decides how it can be read: syntax only a backtracking matcher reads,
// or syntax that RE2 and PCRE2 read differently from Python's re (a silent wrong answer if compiled).
struct PatternScan {
  bool backtracking_only = false;  // a lookaround or a backreference
  std::string misread;             // why the pattern is refused; empty when nothing is misread
};

PatternScan scan_pattern(const std::string& p) {
  PatternScan scan;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char ch = p[i];
    const char next = i + 1 < p.size() ? p[i + 1] : '\0';
    if (ch == '\\') {  // an escape: the next character is never syntax
      if (!in_class && next >= '1' && next <= '9') scan.backtracking_only = true;
      ++i;
    } else if (in_class) {
      if (ch == '[' && next == ':' && scan.misread.empty())
        scan.misread = "has a POSIX class '[:...:]': Python reads '[[:digit:]]' as the characters '[', ':', 'd', ... "
                       "followed by ']', RE2 as a class of digits; list the characters instead (e.g. [0-9])";
      if (ch == ']') in_class = false;
    } else if (ch == '[') {
      in_class = true;
      // A ']' first in the class (after an optional '^') is one of its characters, not its end.
      if (next == '^') ++i;
      if (i + 1 < p.size() && p[i + 1] == ']') ++i;
    } else if (ch == '{' && next == ',') {
      if (scan.misread.empty())
        scan.misread = "has a '{,n}' quantifier: Python reads it as '{0,n}', RE2 as the text '{,n}'; write {0,n}";
    } else if (ch == '(' && (p.compare(i, 3, "(?=") == 0 || p.compare(i, 3, "(?!") == 0 || p.compare(i, 4, "(?<=") == 0 ||
                             p.compare(i, 4, "(?<!") == 0 || p.compare(i, 4, "(?P=") == 0)) {
      scan.backtracking_only = true;
    }
  }
  return scan;
}

// A regular expression from one field of an adapter_config.json, compiled by RE2 or, where it needs a
// lookaround or a backreference, by PCRE2 with bounded matching. Copies share the compiled program.
class Regex {
 public:
  Regex() = default;
  Regex(std::shared_ptr<const RE2> re2, std::string path, std::string field, std::string pattern)
      : re2_(std::move(re2)), path_(std::move(path)), field_(std::move(field)), pattern_(std::move(pattern)) {}
  Regex(std::shared_ptr<pcre2_code> code, std::shared_ptr<pcre2_match_context> limits, std::string path, std::string field,
        std::string pattern)
      : pcre2_(std::move(code)), pcre2_limits_(std::move(limits)), path_(std::move(path)), field_(std::move(field)),
        pattern_(std::move(pattern)) {}

  // Python's re.fullmatch.
  bool full_match(const std::string& text) const {
    if (re2_) return RE2::FullMatch(text, *re2_);
    std::string unused;
    return pcre2_match_at(text, PCRE2_ANCHORED | PCRE2_ENDANCHORED, unused);
  }
  // Python's re.search; on a match `last_group` is the last capturing group's text (empty when that group
  // took no part in the match).
  bool search(const std::string& text, std::string& last_group) const {
    last_group.clear();
    if (re2_) {
      std::vector<re2::StringPiece> groups(size_t(re2_->NumberOfCapturingGroups()) + 1);
      if (!re2_->Match(text, 0, text.size(), RE2::UNANCHORED, groups.data(), int(groups.size()))) return false;
      if (groups.back().data()) last_group.assign(groups.back().data(), groups.back().size());
      return true;
    }
    return pcre2_match_at(text, 0, last_group);
  }

 private:
  bool pcre2_match_at(const std::string& text, uint32_t options, std::string& last_group) const {
    const std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
        pcre2_match_data_create_from_pattern(pcre2_.get(), nullptr), &pcre2_match_data_free);
    if (!data) throw std::bad_alloc();
    const int rc = pcre2_match(pcre2_.get(), reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), 0, options,
                               data.get(), pcre2_limits_.get());
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT || rc == PCRE2_ERROR_HEAPLIMIT) {
      const std::string limit = rc == PCRE2_ERROR_MATCHLIMIT ? fmt::format("{} steps", kPcre2MatchLimit)
                                : rc == PCRE2_ERROR_DEPTHLIMIT ? fmt::format("a depth of {}", kPcre2DepthLimit)
                                                               : fmt::format("{} KiB of memory", kPcre2HeapLimitKiB);
      throw Error(fmt::format("{}: field '{}' holds '{}', which backtracks past moelab's limit ({}) on the module "
                              "name '{}': simplify it (a lookaround or backreference is matched by backtracking)",
                              path_, field_, clipped(pattern_), limit, clipped(text)));
    }
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof message);
      throw Error(fmt::format("{}: field '{}': matching '{}' against '{}' failed (PCRE2: {})", path_, field_,
                              clipped(pattern_), clipped(text), reinterpret_cast<const char*>(message)));
    }
    uint32_t groups = 0;
    pcre2_pattern_info(pcre2_.get(), PCRE2_INFO_CAPTURECOUNT, &groups);
    if (groups > 0 && uint32_t(rc) > groups) {  // rc: 1 + the highest group that took part
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
      if (ovector[2 * groups] != PCRE2_UNSET)
        last_group = text.substr(ovector[2 * groups], ovector[2 * groups + 1] - ovector[2 * groups]);
    }
    return true;
  }

  std::shared_ptr<const RE2> re2_;  // RE2 objects cannot be copied or moved
  std::shared_ptr<pcre2_code> pcre2_;
  std::shared_ptr<pcre2_match_context> pcre2_limits_;
  std::string path_, field_, pattern_;
};

class ConfigReader {
 public:
  ConfigReader(std::string path, const ojson& j) : path_(std::move(path)), j_(j) {}

  Error error(const std::string& field, const std::string& what) const {
    return Error(fmt::format("{}: field '{}' {}", path_, field, what));
  }
  bool has(const char* field) const { return j_.contains(field) && !j_.at(field).is_null(); }
  const ojson& at(const char* field) const { return j_.at(field); }

  // Fields that must be absent, null, false or empty: what each would ask for is not applied here.
  void refuse_unless_empty(const char* field, const std::string& why) const {
    if (j_.contains(field) && !is_empty_value(j_.at(field)))
      throw error(field, fmt::format("is {}: {}", shown(j_.at(field)), why));
  }
  static std::string shown(const ojson& v) {
    std::string s;
    preview(v, s, kShownBytes);
    if (s.size() > kShownBytes) s = std::string(utf8_prefix(s, kShownBytes - 3)) + "...";
    return printable(s);
  }
  std::vector<std::string> string_list(const char* field) const {
    const auto& v = at(field);
    if (!v.is_array()) throw error(field, "is neither a string nor a list of strings");
    std::vector<std::string> out;
    for (const auto& e : v) {
      if (!e.is_string()) throw error(field, fmt::format("holds {}, not a string", shown(e)));
      out.push_back(e.get<std::string>());
    }
    return out;
  }
  // A regular expression from a field. peft matches with Python's re. RE2 reads what it can, matching in
  // time linear in the text, with compilation bounded by the pattern's length and kMaxPatternMemory. What
  // RE2 refuses because it needs backtracking (a lookaround or a backreference, which Python reads) goes to
  // PCRE2, whose matching is bounded by kPcre2*Limit. Syntax both read differently from Python ('{,n}',
  // '[[:digit:]]') is refused, and so is anything else RE2 cannot read: never approximated.
  Regex regex(const std::string& field, const std::string& pattern) const {
    if (pattern.size() > kMaxPatternBytes)
      throw error(field, fmt::format("holds a regular expression of {} bytes ('{}'): at most {} are read", pattern.size(),
                                     clipped(pattern), kMaxPatternBytes));
    const PatternScan scan = scan_pattern(pattern);
    if (!scan.misread.empty()) throw error(field, fmt::format("holds '{}', which {}", clipped(pattern), scan.misread));
    // A lookaround or backreference goes to PCRE2 directly: RE2 may read some of that text otherwise than
    // Python does (it takes '\12' as an octal escape, where Python's re reads a backreference to group 12).
    if (!scan.backtracking_only) {
      RE2::Options options;
      options.set_log_errors(false);  // the reason goes into the one error line, not onto stderr
      options.set_max_mem(kMaxPatternMemory);  // UTF-8, as by default; PCRE2_UTF below matches it
      auto re = std::make_shared<const RE2>(pattern, options);
      if (re->ok()) return Regex(re, path_, field, pattern);
      throw error(field, fmt::format("'{}' is not a regular expression moelab can read (RE2: {})", clipped(pattern),
                                     clipped(re->error(), 200)));
    }
    if (++backtracking_patterns_ > kMaxBacktrackingPatterns)
      throw error(field, fmt::format("holds '{}', the {}th pattern with a lookaround or backreference: at most {} are "
                                     "read (each is matched by backtracking against every module)",
                                     clipped(pattern), backtracking_patterns_, kMaxBacktrackingPatterns));
    int code_error = 0;
    PCRE2_SIZE error_offset = 0;
    std::shared_ptr<pcre2_code> code(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                                   PCRE2_UTF | PCRE2_NEVER_BACKSLASH_C, &code_error, &error_offset, nullptr),
                                     &pcre2_code_free);
    if (!code) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(code_error, message, sizeof message);
      throw error(field, fmt::format("'{}' is not a regular expression moelab can read (PCRE2: {} at offset {})",
                                     clipped(pattern), reinterpret_cast<const char*>(message), error_offset));
    }
    std::shared_ptr<pcre2_match_context> limits(pcre2_match_context_create(nullptr), &pcre2_match_context_free);
    if (!limits) throw std::bad_alloc();
    pcre2_set_match_limit(limits.get(), kPcre2MatchLimit);
    pcre2_set_depth_limit(limits.get(), kPcre2DepthLimit);
    pcre2_set_heap_limit(limits.get(), kPcre2HeapLimitKiB);
    return Regex(code, limits, path_, field, pattern);
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const ojson& j_;
  mutable int backtracking_patterns_ = 0;  // compiled for PCRE2 so far (kMaxBacktrackingPatterns)
};

// peft's target selection, for one adapter_config.json.
struct Selection {
  bool regex_target = false;
  Regex target_regex;
  std::vector<std::string> target_list;
  bool regex_exclude = false;
  Regex exclude_regex;
  std::vector<std::string> exclude_list;
  std::vector<int> layers;  // layers_to_transform (empty: every layer)
  std::vector<Regex> layer_index_patterns;
  std::vector<std::pair<Regex, int>> rank_pattern;
  std::vector<std::pair<Regex, double>> alpha_pattern;

  bool excluded(const std::string& key) const {
    if (regex_exclude) return exclude_regex.full_match(key);
    return list_matches(exclude_list, key);
  }
  // check_target_module_exists without the exclusion.
  bool targeted(const std::string& key) const {
    if (regex_target) return target_regex.full_match(key);
    if (std::find(target_list.begin(), target_list.end(), key) != target_list.end()) return true;
    if (!list_matches(target_list, key)) return false;
    if (layers.empty()) return true;
    for (const auto& p : layer_index_patterns) {
      // A search; the layer index is the last group, the (\d+) each pattern ends with.
      std::string idx;
      if (p.search(key, idx)) {
        // Empty when the pattern's own '|' matched without that group: no layer index.
        if (idx.empty() || idx.size() > 9 || !std::all_of(idx.begin(), idx.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
          return false;
        return std::find(layers.begin(), layers.end(), std::stoi(idx)) != layers.end();
      }
    }
    return false;
  }
};

struct Parsed {
  int r = 0;
  double alpha = 0;
  bool rslora = false;
  Selection sel;
};

Parsed parse_config(const std::string& path, const ojson& j, const ModelConfig& cfg) {
  if (!j.is_object()) throw Error(fmt::format("{}: not a JSON object", path));
  ConfigReader c(path, j);

  if (!c.has("peft_type")) throw c.error("peft_type", "is missing (a peft adapter_config.json names its peft_type)");
  if (!c.at("peft_type").is_string() || c.at("peft_type").get<std::string>() != "LORA")
    throw c.error("peft_type", fmt::format("is {}: moelab reads LoRA adapters only (peft_type \"LORA\")",
                                           ConfigReader::shown(c.at("peft_type"))));

  // Every field peft 0.21.2's LoraConfig has, by what moelab does with it.
  static const std::set<std::string> kRead{
      "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
      "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "init_lora_weights",
      "fan_in_fan_out", "bias", "use_dora", "modules_to_save", "lora_bias", "target_parameters",
      "layer_replication", "megatron_config", "trainable_token_indices", "alora_invocation_tokens",
      "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "use_qalora"};
  // No effect on the forward pass of a loaded adapter: bookkeeping, training-only or initialization-only.
  static const std::set<std::string> kNoEffect{
      "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode", "lora_dropout",
      "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
      "qalora_group_size", "ensure_weight_tying"};
  for (const auto& [key, value] : j.items())
    if (!kRead.count(key) && !kNoEffect.count(key) && !is_empty_value(value))
      throw Error(fmt::format("{}: field '{}' is {}: not a LoraConfig field moelab knows (peft 0.21.2's are read); "
                              "refused rather than ignored", path, clipped(key), ConfigReader::shown(value)));

  if (c.has("task_type")) {
    const auto& t = c.at("task_type");
    if (!t.is_string() || t.get<std::string>() != "CAUSAL_LM")
      throw c.error("task_type", fmt::format("is {}: moelab runs causal language models (task_type \"CAUSAL_LM\")",
                                             ConfigReader::shown(t)));
  }
  c.refuse_unless_empty("use_dora", "DoRA (weight-decomposed LoRA) is not supported, only plain LoRA");
  if (c.has("bias") && !(c.at("bias").is_string() && c.at("bias").get<std::string>() == "none"))
    throw c.error("bias", fmt::format("is {}: adapters that train biases are not supported (bias must be \"none\"; "
                                      "Mixtral's Linears have none)", ConfigReader::shown(c.at("bias"))));
  c.refuse_unless_empty("modules_to_save", "fully trained copies of modules (modules_to_save) are not supported");
  c.refuse_unless_empty("fan_in_fan_out", "Mixtral's Linears store [out, in] weights (fan_in_fan_out applies to "
                                          "Conv1D layers); an adapter saved with it is not read");
  c.refuse_unless_empty("lora_bias", "a bias on lora_B is not supported");
  c.refuse_unless_empty("target_parameters", "LoRA on nn.Parameter targets is not supported");
  c.refuse_unless_empty("layer_replication", "layer replication is not supported");
  c.refuse_unless_empty("megatron_config", "Megatron parallel layers are not supported");
  c.refuse_unless_empty("trainable_token_indices", "trainable tokens are not supported");
  c.refuse_unless_empty("use_qalora", "QALoRA is not supported");
  for (const char* variant : {"alora_invocation_tokens", "velora_config", "monteclora_config", "use_bdlora", "arrow_config",
                              "kasa_config"})
    c.refuse_unless_empty(variant, "this LoRA variant changes the forward pass and is not supported");
  if (c.has("init_lora_weights")) {
    const auto& v = c.at("init_lora_weights");
    const bool plain = v.is_boolean() || (v.is_string() && (v.get<std::string>() == "gaussian" ||
                                                            v.get<std::string>() == "eva" ||
                                                            v.get<std::string>() == "orthogonal"));
    if (!plain)
      throw c.error("init_lora_weights",
                    fmt::format("is {}: this initialization changes the base weights (or is a LoRA variant), so the "
                                "adapter is not a plain delta on the original model; convert it with peft's "
                                "save_pretrained(path_initial_model_for_weight_conversion=...) first",
                                ConfigReader::shown(v)));
  }

  Parsed p;
  if (!c.has("r")) throw c.error("r", "is missing");
  if (!c.at("r").is_number_integer() || c.at("r").get<int64_t>() <= 0 || c.at("r").get<int64_t>() > kMaxLoraRank)
    throw c.error("r", fmt::format("is {}: the rank is an integer from 1 to {}", ConfigReader::shown(c.at("r")), kMaxLoraRank));
  p.r = int(c.at("r").get<int64_t>());
  if (!c.has("lora_alpha")) throw c.error("lora_alpha", "is missing");
  if (!c.at("lora_alpha").is_number() || !std::isfinite(c.at("lora_alpha").get<double>()))
    throw c.error("lora_alpha", fmt::format("is {}: a number is expected", ConfigReader::shown(c.at("lora_alpha"))));
  p.alpha = c.at("lora_alpha").get<double>();
  if (c.has("use_rslora")) {
    if (!c.at("use_rslora").is_boolean()) throw c.error("use_rslora", "is not true or false");
    p.rslora = c.at("use_rslora").get<bool>();
  }

  auto& s = p.sel;
  if (!c.has("target_modules")) {
    s.target_list = {"q_proj", "v_proj"};  // peft's default for mixtral and mistral
  } else if (c.at("target_modules").is_string()) {
    const std::string t = c.at("target_modules").get<std::string>();
    std::string lower = t;
    for (auto& ch : lower) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    if (lower == "all-linear") {
      // peft turns "all-linear" into the last name part of every Linear but the output layer, then matches
      // those names as a list (so layers_to_transform applies).
      s.target_list = cfg.is_moe() ? std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"}
                                   : std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"};
    } else {
      s.regex_target = true;
      s.target_regex = c.regex("target_modules", t);
    }
  } else {
    s.target_list = c.string_list("target_modules");
    if (s.target_list.empty()) throw c.error("target_modules", "is an empty list: the adapter adapts nothing");
  }
  if (c.has("exclude_modules")) {
    if (c.at("exclude_modules").is_string()) {
      s.regex_exclude = true;
      s.exclude_regex = c.regex("exclude_modules", c.at("exclude_modules").get<std::string>());
    } else {
      s.exclude_list = c.string_list("exclude_modules");
    }
  }
  if (c.has("layers_to_transform")) {
    const auto& v = c.at("layers_to_transform");
    const auto layer = [&](const ojson& e) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= cfg.num_layers)
        throw c.error("layers_to_transform", fmt::format("holds {}: layers are 0 to {}", ConfigReader::shown(e), cfg.num_layers - 1));
      return int(e.get<int64_t>());
    };
    if (v.is_array())
      for (const auto& e : v) s.layers.push_back(layer(e));
    else
      s.layers.push_back(layer(v));
    if (!s.layers.empty() && !s.target_list.empty()) {
      std::vector<std::string> patterns;
      if (c.has("layers_pattern")) {
        if (c.at("layers_pattern").is_string()) patterns = {c.at("layers_pattern").get<std::string>()};
        else patterns = c.string_list("layers_pattern");
      }
      patterns.erase(std::remove(patterns.begin(), patterns.end(), std::string()), patterns.end());
      if (patterns.empty())  // the first numbered segment (peft: r".*?\.[^.]*\.(?P<idx>\d+)\.")
        s.layer_index_patterns.push_back(c.regex("layers_pattern", R"(^.*?\.[^.]*\.(\d+)\.)"));
      for (const auto& pat : patterns)
        s.layer_index_patterns.push_back(c.regex("layers_pattern", "^(?:^|.*?\\.)" + pat + R"(\.(\d+)\.)"));
    }
  }
  for (const char* field : {"rank_pattern", "alpha_pattern"}) {
    if (!c.has(field)) continue;
    if (!c.at(field).is_object()) throw c.error(field, "is not an object of pattern: value");
    // Each key is a regular expression compiled once and tried on every selected module: a file needs at most
    // one per module of the model, and 200,000 keys took 45 s to compile.
    const size_t max_keys = std::max<size_t>(4096, model_modules(cfg).size());
    if (c.at(field).size() > max_keys)
      throw c.error(field, fmt::format("has {} patterns: at most {} are read (this {} has {} modules)", c.at(field).size(),
                                       max_keys, cfg.arch_name(), model_modules(cfg).size()));
    for (const auto& [key, value] : c.at(field).items()) {
      const Regex re = c.regex(field, "(.*\\.)?(" + key + ")");
      if (std::string(field) == "rank_pattern") {
        if (!value.is_number_integer() || value.get<int64_t>() <= 0 || value.get<int64_t>() > kMaxLoraRank)
          throw c.error(field, fmt::format("gives '{}' the rank {}: a rank is an integer from 1 to {}", clipped(key),
                                           ConfigReader::shown(value), kMaxLoraRank));
        s.rank_pattern.emplace_back(re, int(value.get<int64_t>()));
      } else {
        if (!value.is_number() || !std::isfinite(value.get<double>()))
          throw c.error(field, fmt::format("gives '{}' the alpha {}: a number is expected", clipped(key), ConfigReader::shown(value)));
        s.alpha_pattern.emplace_back(re, value.get<double>());
      }
    }
  }
  return p;
}

ojson read_config_json(const std::string& path) {
  const std::string text = read_regular_file(path, "adapter config", 16u << 20);
  std::string duplicate;
  std::set<std::string> keys;  // the top-level object's
  std::vector<size_t> fields(kJsonNestingLimit + 1);  // fields read so far in the open object at each depth
  const auto callback = [&](int depth, ojson::parse_event_t event, ojson& parsed) {
    // nlohmann's parser keeps its own stack, so this is reached at any depth; stopping here keeps every
    // later walk over the document (messages, destruction) shallow.
    if (opens_past<ojson>(depth, event, kJsonNestingLimit))
      throw Error(fmt::format("{}: nested more than {} levels deep (a peft adapter config is a flat object of fields)",
                              path, kJsonNestingLimit));
    if (event == ojson::parse_event_t::object_start) fields[size_t(depth) + 1] = 0;  // its keys come at depth + 1
    if (event == ojson::parse_event_t::key && ++fields[size_t(depth)] > kMaxObjectFields)
      throw Error(fmt::format("{}: an object of more than {} fields (a peft adapter config has a few dozen, and a "
                              "rank_pattern at most one per module)", path, kMaxObjectFields));
    if (event == ojson::parse_event_t::key && depth == 1 && !keys.insert(parsed.get<std::string>()).second &&
        duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  ojson j;
  try {
    j = ojson::parse(text, callback);
  } catch (const ojson::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", path, clipped(e.what(), 300)));
  }
  if (!duplicate.empty()) throw Error(fmt::format("{}: field '{}' appears twice", path, clipped(duplicate)));
  return j;
}


}  // namespace

std::shared_ptr<const LoraAdapter> LoraAdapter::load(const std::string& dir, const ModelConfig& cfg) {
  if (path_type(dir) != fs::file_type::directory)
    throw Error(fmt::format("{}: not a directory (expected a peft adapter folder with {} and {})", dir, kAdapterConfigFile,
                            kAdapterWeightsFile));
  const std::string config_path = (fs::path(dir) / kAdapterConfigFile).string();
  const std::string weights_path = (fs::path(dir) / kAdapterWeightsFile).string();
  if (path_type(config_path) == fs::file_type::not_found)
    throw Error(fmt::format("{}: missing (a peft adapter folder has one)", config_path));
  const ojson j = read_config_json(config_path);
  const Parsed p = parse_config(config_path, j, cfg);

  // The modules the config selects, as peft selects them; each must be one moelab adapts.
  const auto modules = model_modules(cfg);
  std::map<std::string, const Module*> targeted;  // module name -> module
  for (const auto& m : modules) {
    if (p.sel.excluded(m.name)) continue;
    if (!p.sel.targeted(m.name)) continue;
    if (m.weight.empty())
      throw Error(fmt::format("{}: field 'target_modules' selects '{}' ({}), which moelab does not adapt (it adapts {})",
                              config_path, m.name, m.kind, kAdaptable));
    targeted[m.name] = &m;
  }
  for (const auto& t : p.sel.target_list) {
    bool any = false;
    for (const auto& m : modules) any = any || m.name == t || ends_with(m.name, "." + t);
    if (!any)
      throw Error(fmt::format("{}: field 'target_modules' names '{}', which is no module of this {} (it adapts {})",
                              config_path, clipped(t), cfg.arch_name(), kAdaptable));
  }
  if (targeted.empty())
    throw Error(fmt::format("{}: field 'target_modules' selects no module of this {} (it adapts {})", config_path,
                            cfg.arch_name(), kAdaptable));

  if (path_type(weights_path) == fs::file_type::not_found) {
    if (path_type(fs::path(dir) / "adapter_model.bin") != fs::file_type::not_found)
      throw Error(fmt::format("{}: missing; adapter_model.bin (a pickle) is not read: save the adapter with "
                              "safe_serialization=True", weights_path));
    throw Error(fmt::format("{}: missing (a peft adapter folder has one)", weights_path));
  }
  const SafetensorsFile file(weights_path);  // validates the header; a damaged file fails here

  auto adapter = std::make_shared<LoraAdapter>();
  adapter->dir_ = dir;
  adapter->use_rslora_ = p.rslora;
  const std::string prefix = "base_model.model.";
  std::map<std::string, std::pair<const TensorInfo*, const TensorInfo*>> found;  // module -> (A, B)
  for (const auto& [name, info] : file.tensors()) {
    const bool is_a = ends_with(name, ".lora_A.weight"), is_b = ends_with(name, ".lora_B.weight");
    if (name.rfind(prefix, 0) != 0 || !(is_a || is_b)) {
      std::string hint;
      if (name.find("lora_magnitude_vector") != std::string::npos) hint = " (a DoRA magnitude: DoRA is not supported)";
      else if (ends_with(name, ".lora_B.bias")) hint = " (a lora_B bias: not supported)";
      else if (name.find("modules_to_save") != std::string::npos) hint = " (modules_to_save: not supported)";
      else if (name.find("lora_embedding_") != std::string::npos) hint = " (LoRA on an embedding: not supported)";
      throw Error(fmt::format("{}: tensor '{}' is not a LoRA factor moelab reads (base_model.model.<module>.lora_A.weight "
                              "or .lora_B.weight){}", weights_path, printable_name(name), hint));
    }
    const std::string module = name.substr(prefix.size(), name.size() - prefix.size() - std::string(".lora_A.weight").size());
    if (!targeted.count(module)) {
      const Module* known = nullptr;
      for (const auto& m : modules)
        if (m.name == module) known = &m;
      if (!known)
        throw Error(fmt::format("{}: tensor '{}' is for '{}', which is no module of this {} (num_hidden_layers {}, "
                                "num_local_experts {})", weights_path, printable_name(name), printable_name(module), cfg.arch_name(),
                                cfg.num_layers, cfg.num_experts));
      if (known->weight.empty())
        throw Error(fmt::format("{}: tensor '{}' adapts '{}' ({}), which moelab does not adapt (it adapts {})", weights_path,
                                printable_name(name), module, known->kind, kAdaptable));
      throw Error(fmt::format("{}: tensor '{}' adapts '{}', which {}'s field 'target_modules' does not select", weights_path,
                              printable_name(name), module, kAdapterConfigFile));
    }
    auto& slot = found[module];
    (is_a ? slot.first : slot.second) = &info;
  }

  for (const auto& [module, m] : targeted) {
    const auto it = found.find(module);
    for (const bool a : {true, false}) {
      const TensorInfo* t = it == found.end() ? nullptr : (a ? it->second.first : it->second.second);
      if (!t)
        throw Error(fmt::format("{}: missing tensor '{}{}.{}.weight' ({} selects '{}'{})", weights_path, prefix, module,
                                a ? "lora_A" : "lora_B", kAdapterConfigFile, module,
                                it == found.end() ? "" : fmt::format(", and its {} is present", a ? "lora_B" : "lora_A")));
    }
    LoraFactors f;
    f.rank = p.r;
    for (const auto& [re, rank] : p.sel.rank_pattern)
      if (re.full_match(module)) {
        f.rank = rank;
        break;
      }
    f.alpha = p.alpha;
    for (const auto& [re, alpha] : p.sel.alpha_pattern)
      if (re.full_match(module)) {
        f.alpha = alpha;
        break;
      }
    f.scale = p.rslora ? f.alpha / std::sqrt(double(f.rank)) : f.alpha / double(f.rank);
    // The engines and merge multiply by float(scale): one past float's range is an Inf (or, times a zero
    // factor, a NaN) in every output.
    if (!(std::fabs(f.scale) <= double(FLT_MAX)))
      throw Error(fmt::format("{}: module '{}' gets the scale {:g} (lora_alpha {:g} / {}r {}, fields 'lora_alpha'{} and 'r'), "
                              "beyond float's range ({:g})", config_path, module, f.scale, f.alpha,
                              p.rslora ? "sqrt " : "", f.rank, p.sel.alpha_pattern.empty() ? "" : " / 'alpha_pattern'",
                              double(FLT_MAX)));
    const TensorInfo& ta = *it->second.first;
    const TensorInfo& tb = *it->second.second;
    const std::vector<int64_t> want_a{f.rank, m->in}, want_b{m->out, f.rank};
    for (const auto* t : {&ta, &tb}) {
      const auto& want = t == &ta ? want_a : want_b;
      if (t->shape != want)
        throw Error(fmt::format("{}: tensor '{}' has shape {} but the model's '{}' is [{}, {}] (out, in) and the rank is {} "
                                "(field 'r'{} of {}), so it must be {}", weights_path, printable_name(t->name), shape_str(t->shape),
                                module, m->out, m->in, f.rank, p.sel.rank_pattern.empty() ? "" : " / 'rank_pattern'",
                                kAdapterConfigFile, shape_str(want)));
      if (!dtype_is_float_convertible(t->dtype))
        throw Error(fmt::format("{}: tensor '{}' has dtype {}, expected F32, F16, BF16 or F64", weights_path, printable_name(t->name),
                                dtype_name(t->dtype)));
    }
    f.a.resize(f.rank, m->in);
    f.b.resize(m->out, f.rank);
    file.read_f32(ta, 0, ta.numel(), f.a.data(), /*check_finite=*/true);
    file.read_f32(tb, 0, tb.numel(), f.b.data(), /*check_finite=*/true);
    // scale * B (A x) on an input with |x_j| <= 1, and each element of merge's scale * B A, is at most this
    // in magnitude. Real adapters are many orders below float's range (|A|, |B| ~ 1e-2 .. 1, scale ~ 1 .. 100,
    // r * in ~ 1e6); one whose bound passes it can turn a model's outputs into Inf and NaN, so it is refused
    // here rather than run.
    const double a_max = f.a.size() ? double(f.a.cwiseAbs().maxCoeff()) : 0.0;
    const double b_max = f.b.size() ? double(f.b.cwiseAbs().maxCoeff()) : 0.0;
    const double bound = std::fabs(f.scale) * b_max * a_max * double(f.rank) * double(m->in);
    if (!(bound <= double(FLT_MAX)))
      throw Error(fmt::format("{}: the factors of '{}' can overflow float: |scale| {:g} x max|lora_B| {:g} x max|lora_A| {:g} "
                              "x r {} x in {} = {:g}, beyond float's range ({:g})", weights_path, module, std::fabs(f.scale),
                              b_max, a_max, f.rank, m->in, bound, double(FLT_MAX)));
    adapter->modules_.emplace(m->weight, std::move(f));
  }
  return adapter;
}

const LoraFactors* LoraAdapter::find(const std::string& weight_name) const {
  const auto it = modules_.find(weight_name);
  return it == modules_.end() ? nullptr : &it->second;
}

int64_t LoraAdapter::parameter_count() const {
  int64_t n = 0;
  for (const auto& [_, f] : modules_) n += f.a.size() + f.b.size();
  return n;
}

std::string LoraAdapter::summary() const {
  std::set<int> ranks;
  std::set<double> scales;
  std::set<std::string> kinds;  // the module's last name part: q_proj, gate, w1, ...
  for (const auto& [w, f] : modules_) {
    ranks.insert(f.rank);
    scales.insert(f.scale);
    const std::string m = w.substr(0, w.size() - std::string(".weight").size());
    kinds.insert(m.substr(m.rfind('.') + 1));
  }
  return fmt::format("{}: LoRA r={} scale {}{} on {} modules ({}), {} parameters", dir_, fmt::join(ranks, "/"),
                     fmt::join(scales, "/"), use_rslora_ ? " (rsLoRA)" : "", modules_.size(), fmt::join(kinds, ", "),
                     parameter_count());
}

}  // namespace moelab
