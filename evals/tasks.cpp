#include "evals/tasks.hpp"

#include <fmt/format.h>

#include <unordered_set>

#include "core/error.hpp"

namespace moelab::evals {

TaskSpec task_spec(const std::string& name) {
  TaskSpec t;
  t.name = name;
  t.reported_key = name;
  if (name == "hellaswag" || name == "arc_easy" || name == "arc_challenge" || name == "piqa") {
    t.metrics = {"acc", "acc_norm"};
  } else if (name == "mmlu") {
    t.metrics = {"acc"};
    t.first_n_fewshot = true;
    t.default_shots = 5;
    t.fewshot_split = "dev";
  } else if (name == "winogrande") {
    t.metrics = {"acc"};
  } else if (name == "multiple_choice") {
    t.metrics = {"acc", "acc_norm", "acc_bytes"};
    t.reported_key.clear();
  } else if (name == "gsm8k" || name == "generate") {
    t.type = TaskType::Generate;
    t.metrics = {"exact_match"};
    t.until = {"Question:", "</s>", "<|im_end|>"};
    t.default_shots = name == "gsm8k" ? 5 : 0;
    if (name == "generate") t.reported_key.clear();
    if (name == "gsm8k") {  // gsm8k.yaml: fewshot_split: train (7,473 docs); 5-shot's draws are bundled
      t.fewshot_split = "train";
      t.fewshot_split_size = 7473;
      t.bundled_fewshot = "evals/data/gsm8k-train-fewshot.jsonl";
    }
  } else if (name == "humaneval") {
    t.type = TaskType::Code;
    t.metrics = {"pass@1"};
    t.until = {"\nclass", "\ndef", "\n#", "\nif", "\nprint"};
    t.max_gen_toks = 512;
  } else if (name == "wikitext" || name == "rolling") {
    t.type = TaskType::Rolling;
    t.metrics = {"word_perplexity", "byte_perplexity", "bits_per_byte"};
    if (name == "rolling") t.reported_key.clear();
  } else {
    throw Error(fmt::format("unknown task '{}' (known: {})", name, fmt::join(task_names(), ", ")));
  }
  // The harness's hellaswag, arc_*, winogrande and piqa have a training split and no fewshot_split: their
  // examples come from train.
  for (const char* n : {"hellaswag", "arc_easy", "arc_challenge", "winogrande", "piqa"})
    if (name == n) t.fewshot_split = "train";
  return t;
}

std::vector<std::string> task_names() {
  return {"hellaswag", "arc_easy", "arc_challenge", "mmlu", "winogrande", "piqa", "gsm8k",
          "humaneval", "wikitext", "multiple_choice", "generate", "rolling"};
}

std::string describe(const TaskSpec& t, const Doc& d) {
  if (t.name != "mmlu" || d.subject.empty()) return t.description;
  std::string s = d.subject;
  for (auto& c : s) if (c == '_') c = ' ';
  return fmt::format("The following are multiple choice questions (with answers) about {}.\n\n", s);
}

namespace {
std::string example_text(const Doc& d) {
  if (d.partial()) return d.contexts.at(size_t(d.gold));
  return d.query.empty() ? d.text : d.query;
}
std::string example_target(const Doc& d) {
  if (d.partial()) return d.continuation;
  if (!d.choices.empty()) return d.choices.at(size_t(d.gold));
  return d.target;
}
}  // namespace

std::string fewshot_context(const TaskSpec& t, const Doc& doc, int shots, const std::vector<Doc>& pool,
                            bool same_split, size_t self_index, PyRandom& rnd) {
  std::string out = describe(t, doc);
  if (shots > 0) {
    std::vector<size_t> picked;
    const size_t n = size_t(shots) + (same_split ? 1 : 0);
    if (t.first_n_fewshot) {
      if (n > pool.size()) throw Error("few-shot: fewer few-shot documents than shots");
      for (size_t i = 0; i < n; ++i) picked.push_back(i);
    } else {
      picked = rnd.sample(pool.size(), n);
    }
    int used = 0;
    for (size_t i : picked) {
      if (same_split && i == self_index) continue;
      if (used++ == shots) break;
      const Doc& ex = pool[i];
      if (ex.absent())
        throw Error(fmt::format("{}: the few-shot draw needs document {} of the {} split, which this sparse slice "
                                "does not hold; pass the full {} file with --fewshot-data",
                                ex.absent_from, i, ex.absent_split, ex.absent_split));
      out += example_text(ex);
      const std::string target = example_target(ex);
      if (!target.empty()) out += t.target_delimiter + target + t.fewshot_delimiter;
    }
  }
  if (!doc.partial()) out += doc.query.empty() ? doc.text : doc.query;
  return out;
}

FewshotOrigin fewshot_origin(const std::vector<Doc>& docs, const std::vector<Doc>& fewshot, bool eval_split,
                             const std::string& declared_split) {
  FewshotOrigin o{.eval_split = eval_split, .declared_split = declared_split, .pool_size = fewshot.size(),
                  .shared_with_eval = 0};
  if (eval_split) return o;
  std::unordered_set<std::string> texts;
  for (const auto& d : docs) texts.insert(example_text(d));
  for (const auto& d : fewshot)
    if (!d.absent() && texts.count(example_text(d))) ++o.shared_with_eval;
  return o;
}

std::string fewshot_protocol_difference(const TaskSpec& t, int shots, const FewshotOrigin& o) {
  if (shots <= 0 || t.fewshot_split.empty()) return "";
  const std::string& h = t.fewshot_split;
  if (o.eval_split) return fmt::format("few-shot drawn from the evaluated split (harness: {})", h);
  if (!o.declared_split.empty() && o.declared_split != h)
    return fmt::format("few-shot from a slice of the {} split (harness: {})", o.declared_split, h);
  if (o.shared_with_eval > 0)
    return fmt::format("few-shot data holds {} evaluated doc{} (harness: {} split)", o.shared_with_eval,
                       o.shared_with_eval == 1 ? "" : "s", h);
  if (t.fewshot_split_size > 0 && o.pool_size != t.fewshot_split_size)
    return fmt::format("few-shot pool of {} docs (harness: the {} split's {})", o.pool_size, h, t.fewshot_split_size);
  return "";
}

}  // namespace moelab::evals
