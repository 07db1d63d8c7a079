#include "evals/runner.hpp"

#include <fmt/format.h>

#include <chrono>
#include <cmath>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/sampling.hpp"
#include "evals/extract.hpp"
#include "evals/generate_until.hpp"
#include "evals/lm_eval_samples.hpp"
#include "evals/loglikelihood.hpp"
#include "evals/metrics.hpp"
#include "evals/rolling.hpp"
#include "evals/sandbox.hpp"

namespace moelab::evals {

using nlohmann::json;
using nlohmann::ordered_json;

namespace {

void add_mean(TaskResult& r, const std::string& metric, const std::string& filter, const std::vector<double>& v) {
  r.metrics[metric + "," + filter] = mean(v);
  r.metrics[metric + "_stderr," + filter] = mean_stderr(v);
}

void run_multiple_choice(Engine& engine, const TextCodec& codec, const TaskSpec& spec, const std::vector<Doc>& docs,
                         const std::vector<std::string>& contexts, const RunOptions& opts, TaskResult& r) {
  std::vector<TokenRequest> reqs;
  std::vector<std::pair<std::string, std::string>> args;
  std::vector<size_t> first(docs.size() + 1, 0);
  for (size_t i = 0; i < docs.size(); ++i) {
    first[i] = reqs.size();
    const Doc& d = docs[i];
    const size_t n = d.partial() ? d.contexts.size() : d.choices.size();
    for (size_t c = 0; c < n; ++c) {
      std::string ctx = d.partial() ? contexts[i] + d.contexts[c] : contexts[i];
      std::string cont = spec.target_delimiter + (d.partial() ? d.continuation : d.choices[c]);
      args.push_back({ctx, cont});
      auto [a, b] = encode_pair(codec, ctx, cont);
      reqs.push_back({std::move(a), std::move(b)});
    }
  }
  first[docs.size()] = reqs.size();
  int64_t done = 0;
  ScoreStats stats;
  const auto res = score_requests(engine, reqs, &stats, [&] {
    if (opts.progress) opts.progress(++done, int64_t(reqs.size()));
  });
  std::map<std::string, std::vector<double>> per_metric;
  for (size_t i = 0; i < docs.size(); ++i) {
    const Doc& d = docs[i];
    std::vector<double> lls;
    std::vector<bool> greedy;
    SampleFields f;
    for (size_t k = first[i]; k < first[i + 1]; ++k) {
      lls.push_back(res[k].logprob);
      greedy.push_back(res[k].is_greedy);
      f.arguments.push_back({args[k].first, args[k].second});
      f.resps.push_back(ordered_json::array({{res[k].logprob, res[k].is_greedy}}));  // one (ll, is_greedy) per request
      f.filtered_resps.push_back({res[k].logprob, res[k].is_greedy});
    }
    // acc_norm divides by the length of the choice strings as doc_to_choice returns them.
    const auto& choice_strings = d.partial() ? d.contexts : d.choices;
    const ChoiceScores s = score_choices(lls, greedy, choice_strings, d.gold);
    f.doc_id = int64_t(i);
    f.doc = harness_doc(spec.name, d);
    // doc_to_target: the gold index, or for partial scoring (WinoGrande) the continuation text.
    f.target = d.partial() ? ordered_json(d.continuation) : ordered_json(d.gold);
    for (const auto& m : spec.metrics) {
      const double v = m == "acc" ? s.acc : m == "acc_norm" ? s.acc_norm : m == "acc_bytes" ? s.acc_bytes : s.exact_match;
      per_metric[m].push_back(v);
      f.metrics.emplace_back(m, v);
    }
    ordered_json sample = sample_record(std::move(f));
    r.samples.push_back(std::move(sample));
  }
  for (const auto& m : spec.metrics) add_mean(r, m, "none", per_metric[m]);
  r.tokens_forwarded = stats.tokens_forwarded;
  if (stats.truncated)
    r.warnings.push_back(fmt::format("{} choice(s) longer than the model's context of {} tokens: only their last "
                                     "tokens were scored (lm-evaluation-harness stops with an assertion there)",
                                     stats.truncated, engine.max_context()));
}

void run_rolling(Engine& engine, const TextCodec& codec, const TaskSpec& spec, const std::vector<Doc>& docs,
                 const RunOptions& opts, TaskResult& r) {
  Weighted words, bytes;
  for (size_t i = 0; i < docs.size(); ++i) {
    const Doc& d = docs[i];
    const auto rr = rolling_loglikelihood(engine, codec.encode(d.text), codec.prefix_token);
    const double nw = double(count_words(d.page)), nb = double(count_bytes(d.page));
    words.push_back({rr.logprob, nw});
    bytes.push_back({rr.logprob, nb});
    SampleFields f;
    f.doc_id = int64_t(i);
    f.doc = harness_doc(spec.name, d);
    f.target = d.text;  // doc_to_target: the detokenized page, which is also the request's one argument
    f.arguments.push_back({d.text});
    f.resps.push_back({rr.logprob});
    f.filtered_resps.push_back(rr.logprob);
    f.metrics = {{"word_perplexity", {rr.logprob, nw}}, {"byte_perplexity", {rr.logprob, nb}},
                 {"bits_per_byte", {rr.logprob, nb}}};
    ordered_json sample = sample_record(std::move(f));
    sample["windows"] = rr.windows;  // moelab's: how many windows the document took
    r.samples.push_back(std::move(sample));
    if (opts.progress) opts.progress(int64_t(i + 1), int64_t(docs.size()));
  }
  const double nan = std::nan("");
  r.metrics["word_perplexity,none"] = weighted_perplexity(words);
  r.metrics["word_perplexity_stderr,none"] = nan;
  r.metrics["byte_perplexity,none"] = weighted_perplexity(bytes);
  r.metrics["byte_perplexity_stderr,none"] = nan;
  r.metrics["bits_per_byte,none"] = bits_per_byte(bytes);
  r.metrics["bits_per_byte_stderr,none"] = nan;
}

void run_generate(Engine& engine, const TextCodec& codec, const TaskSpec& spec, const std::vector<Doc>& docs,
                  const std::vector<std::string>& contexts, const RunOptions& opts, TaskResult& r) {
  GenerateOptions go;
  go.until = spec.until;
  // The harness keeps max_gen_toks and left-truncates the context to max_length - max_gen_toks; on a
  // model whose context is not longer than that (the tiny fixtures) half the context is used instead.
  go.max_gen_toks = std::min(spec.max_gen_toks, std::max(1, engine.max_context() / 2));
  const bool sampling = opts.temperature > 0;
  const int k = sampling ? std::max(1, opts.repeats) : 1;
  std::vector<double> strict, flexible, maj;
  SamplingParams sp;
  sp.temperature = opts.temperature;
  sp.seed = opts.sampling_seed;
  Sampler sampler(sp);
  // The request's second argument: the task's generation_kwargs as its YAML gives them (gsm8k.yaml).
  const ordered_json gen_kwargs = {{"until", go.until}, {"do_sample", sampling}, {"temperature", double(opts.temperature)}};
  std::vector<ordered_json> strict_records, flexible_records;
  for (size_t i = 0; i < docs.size(); ++i) {
    std::vector<std::string> texts, strict_answers;
    for (int s = 0; s < k; ++s) texts.push_back(generate_until(engine, codec, contexts[i], go, sampler).text);
    for (const auto& t : texts) strict_answers.push_back(gsm8k_strict(t));
    const std::string fs = gsm8k_flexible(texts[0]);
    const double em_s = gsm8k_exact_match(strict_answers[0], docs[i].target);
    const double em_f = gsm8k_exact_match(fs, docs[i].target);
    strict.push_back(em_s);
    flexible.push_back(em_f);
    // One record per (doc, filter); the harness lists every doc of a filter before the next filter's.
    SampleFields f;
    f.doc_id = int64_t(i);
    f.doc = harness_doc(spec.name, docs[i]);
    f.target = docs[i].target;  // gsm8k.yaml: doc_to_target "{{answer}}"
    f.arguments.push_back({contexts[i], gen_kwargs});
    f.resps.push_back(texts);
    SampleFields a = f, b = f;
    a.filter = "strict-match", a.filtered_resps.push_back(strict_answers[0]), a.metrics = {{"exact_match", em_s}};
    b.filter = "flexible-extract", b.filtered_resps.push_back(fs), b.metrics = {{"exact_match", em_f}};
    strict_records.push_back(sample_record(std::move(a)));
    flexible_records.push_back(sample_record(std::move(b)));
    if (k > 1) {
      std::vector<std::string> valid;
      for (const auto& s : strict_answers) valid.push_back(s == "[invalid]" ? "" : s);
      const auto vote = majority_vote(valid);
      maj.push_back(vote ? gsm8k_exact_match(*vote, docs[i].target) : 0.0);
    }
    if (opts.progress) opts.progress(int64_t(i + 1), int64_t(docs.size()));
  }
  for (auto* records : {&strict_records, &flexible_records})
    for (auto& rec : *records) r.samples.push_back(std::move(rec));
  add_mean(r, "exact_match", "strict-match", strict);
  add_mean(r, "exact_match", "flexible-extract", flexible);
  if (k > 1) add_mean(r, fmt::format("maj@{}", k), "strict-match", maj);
}

// HumanEval: completions of the prompt until the task's stop strings, each run with the tests in the
// sandbox; pass@k (unbiased) for k = 1 and, with n >= 10 samples, k = 10.
void run_code(Engine& engine, const TextCodec& codec, const TaskSpec& spec, const std::vector<Doc>& docs,
              const RunOptions& opts, TaskResult& r) {
  GenerateOptions go;
  go.until = spec.until;
  go.max_gen_toks = std::min(spec.max_gen_toks, std::max(1, engine.max_context() / 2));
  const bool sampling = opts.temperature > 0;
  const int n = sampling ? std::max(1, opts.repeats) : 1;
  SamplingParams sp;
  sp.temperature = opts.temperature;
  sp.seed = opts.sampling_seed;
  Sampler sampler(sp);
  std::vector<int> ks = {1};
  if (n >= 10) ks.push_back(10);
  std::map<int, std::vector<double>> per_k;
  SandboxLimits limits;
  limits.timeout_seconds = opts.code_timeout_seconds;
  for (size_t i = 0; i < docs.size(); ++i) {
    const Doc& d = docs[i];
    int correct = 0;
    ordered_json runs = ordered_json::array();
    std::vector<std::string> texts;
    for (int s = 0; s < n; ++s) {
      const std::string completion = generate_until(engine, codec, d.prompt, go, sampler).text;
      const SandboxResult sr = run_python_sandboxed(humaneval_program(d.prompt, completion, d.test, d.entry_point), limits);
      correct += sr.passed;
      texts.push_back(completion);
      runs.push_back({{"passed", sr.passed}, {"timed_out", sr.timed_out}, {"exit_code", sr.exit_code},
                      {"signal", sr.signal}, {"network_isolated", sr.network_isolated}, {"output_tail", sr.output},
                      {"sandbox_error", sr.error}});
    }
    SampleFields f;
    f.doc_id = int64_t(i);
    f.doc = harness_doc(spec.name, d);
    f.target = d.test + "\ncheck(" + d.entry_point + ")";  // humaneval.yaml's doc_to_target
    // humaneval.yaml's generation_kwargs, in its order (max_gen_toks: what ran here).
    f.arguments.push_back({d.prompt, ordered_json{{"until", go.until}, {"max_gen_toks", go.max_gen_toks}, {"do_sample", sampling}}});
    f.resps.push_back(texts);
    ordered_json programs = ordered_json::array();  // the create_test filter: prompt + completion
    for (const auto& t : texts) programs.push_back(d.prompt + t);
    f.filtered_resps.push_back(programs);
    f.filter = "create_test";
    for (int k : ks) {
      const double v = pass_at_k(n, correct, k);
      per_k[k].push_back(v);
      f.metrics.emplace_back(fmt::format("pass@{}", k), v);
    }
    ordered_json sample = sample_record(std::move(f));
    sample["runs"] = runs;  // moelab's: each program's sandbox outcome
    r.samples.push_back(std::move(sample));
    if (opts.progress) opts.progress(int64_t(i + 1), int64_t(docs.size()));
  }
  for (int k : ks) add_mean(r, fmt::format("pass@{}", k), "create_test", per_k[k]);
}

}  // namespace

TaskResult run_task(Engine& engine, const TextCodec& codec, const TaskSpec& spec, const std::vector<Doc>& docs,
                    const std::vector<Doc>& fewshot_docs, bool same_split, const RunOptions& opts) {
  const auto t0 = std::chrono::steady_clock::now();
  TaskResult r;
  r.task = spec.name;
  r.n = int64_t(docs.size());
  if (docs.empty()) throw Error(spec.name + ": no documents");
  std::vector<std::string> contexts;
  if (spec.type == TaskType::MultipleChoice || spec.type == TaskType::Generate) {
    PyRandom rnd(opts.fewshot_seed);
    if (opts.shots > 0 && fewshot_docs.size() < size_t(opts.shots) + (same_split ? 1 : 0))
      throw Error(spec.name + ": fewer few-shot documents than --shots");
    for (size_t i = 0; i < docs.size(); ++i)
      contexts.push_back(fewshot_context(spec, docs[i], opts.shots, fewshot_docs, same_split, i, rnd));
  }
  switch (spec.type) {
    case TaskType::MultipleChoice: run_multiple_choice(engine, codec, spec, docs, contexts, opts, r); break;
    case TaskType::Rolling: run_rolling(engine, codec, spec, docs, opts, r); break;
    case TaskType::Generate: run_generate(engine, codec, spec, docs, contexts, opts, r); break;
    case TaskType::Code: run_code(engine, codec, spec, docs, opts, r); break;
  }
  r.seconds = seconds_since(t0);
  return r;
}

}  // namespace moelab::evals
