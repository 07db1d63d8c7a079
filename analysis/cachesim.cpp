// The cache simulator's driver (analysis/cachesim.hpp): routing sources, the step stream (one token of each
// running sequence), calibration, and the one pass that feeds every policy and cache size.
#include "analysis/cachesim.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <set>

#include "analysis/cachesim_belady.hpp"
#include "analysis/cachesim_policy.hpp"
#include "analysis/stats.hpp"
#include "analysis/trace_stream.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "optimized/cuda/weight_arena.hpp"

namespace moelab::analysis {

using cachesim::ExpertSet;
using cachesim::LayerCounts;
using cachesim::Policy;

// ---- sources ------------------------------------------------------------------------------------------

namespace {

class FileSource : public RoutingSource {
 public:
  explicit FileSource(const std::string& path) : s_(path) {}
  std::string name() const override { return s_.path(); }
  int num_layers() const override { return s_.num_layers(); }
  int top_k() const override { return s_.top_k(); }
  int num_experts() const override { return s_.num_experts(); }
  const std::vector<int64_t>& sequence_offsets() const override { return s_.sequence_offsets(); }
  nlohmann::json model_config() const override { return s_.attributes().value("model_config", nlohmann::json()); }
  void read_experts(int64_t first, int64_t n, std::vector<uint8_t>& out) const override { s_.read_experts(first, n, out); }
  bool has_prefetch_guess() const override { return s_.has_prefetch_guess(); }
  void read_prefetch_guess(int64_t first, int64_t n, std::vector<uint8_t>& out) const override {
    s_.read_prefetch_guess(first, n, out);
  }

 private:
  TraceStream s_;
};

class MemorySource : public RoutingSource {
 public:
  MemorySource(const TraceData& t, std::string name) : t_(t), name_(std::move(name)) { validate_trace(t); }
  std::string name() const override { return name_; }
  int num_layers() const override { return t_.num_layers; }
  int top_k() const override { return t_.top_k; }
  int num_experts() const override { return t_.num_experts; }
  const std::vector<int64_t>& sequence_offsets() const override { return t_.sequence_offsets; }
  nlohmann::json model_config() const override {
    return t_.attributes.is_object() ? t_.attributes.value("model_config", nlohmann::json()) : nlohmann::json();
  }
  void read_experts(int64_t first, int64_t n, std::vector<uint8_t>& out) const override {
    const size_t lk = size_t(t_.num_layers) * size_t(t_.top_k);
    out.assign(t_.experts.begin() + long(size_t(first) * lk), t_.experts.begin() + long(size_t(first + n) * lk));
  }
  bool has_prefetch_guess() const override { return t_.has_prefetch_guess(); }
  void read_prefetch_guess(int64_t first, int64_t n, std::vector<uint8_t>& out) const override {
    if (!t_.has_prefetch_guess()) throw Error(fmt::format("{}: no prefetch guesses", name_));
    const size_t lk = size_t(t_.num_layers) * size_t(t_.top_k);
    out.assign(t_.prefetch_guess.begin() + long(size_t(first) * lk),
               t_.prefetch_guess.begin() + long(size_t(first + n) * lk));
  }

 private:
  const TraceData& t_;
  std::string name_;
};

}  // namespace

std::unique_ptr<RoutingSource> open_routing_source(const std::string& path) { return std::make_unique<FileSource>(path); }
std::unique_ptr<RoutingSource> memory_routing_source(const TraceData& trace, std::string name) {
  return std::make_unique<MemorySource>(trace, std::move(name));
}

// ---- sizes and options ---------------------------------------------------------------------------------

ExpertBytes expert_bytes_of(const nlohmann::json& cfg) {
  ExpertBytes b;
  if (!cfg.is_object()) return b;
  const auto h = cfg.find("hidden_size"), i = cfg.find("intermediate_size");
  if (h == cfg.end() || i == cfg.end() || !h->is_number_integer() || !i->is_number_integer()) return b;
  const int64_t H = h->get<int64_t>(), I = i->get<int64_t>();
  if (H <= 0 || I <= 0 || H > (1 << 20) || I > (1 << 22)) return b;
  b.hidden = int(H);
  b.intermediate = int(I);
  b.bf16 = 3 * H * I * 2;
  try {  // the engine's own layout: optimized/cuda/engine_load.cpp builds exactly this one
    cuda::WeightArena layout;
    layout.add("w1", I, H);
    layout.add("w3", I, H);
    layout.add("w2", H, I);
    b.nf4 = cuda::align_up(layout.bytes(), cuda::kArenaAlign);
  } catch (const Error&) {  // a shape the GEMV refuses (columns not a multiple of 32): the same sums
    int64_t end = 0;
    for (int m = 0; m < 3; ++m) {
      const int64_t n = H * I;
      end = cuda::align_up(end, cuda::kArenaAlign) + (n + 1) / 2;
      end = cuda::align_up(end, cuda::kArenaAlign) + (n + cuda::kNf4Block - 1) / cuda::kNf4Block * 4;
    }
    b.nf4 = cuda::align_up(end, cuda::kArenaAlign);
  }
  return b;
}

int64_t Calibration::resolve(int64_t total) const {
  if (tokens > 0) return std::min(tokens, total);
  return std::min<int64_t>(total, int64_t(std::llround(fraction * double(total))));
}

Calibration parse_calibration(const std::string& text) {
  const auto bad = [&] {
    return Error(fmt::format("--calibrate {}: give a token count (4096), a fraction below 1 (0.1) or a percentage (10%)", text));
  };
  if (text.empty()) throw bad();
  Calibration c;
  try {
    size_t used = 0;
    if (text.back() == '%') {
      const double p = std::stod(text.substr(0, text.size() - 1), &used);
      if (used != text.size() - 1 || !(p >= 0 && p < 100)) throw bad();
      c.fraction = p / 100;
      return c;
    }
    if (text.find_first_of(".eE") != std::string::npos) {
      const double f = std::stod(text, &used);
      if (used != text.size() || !(f >= 0 && f < 1)) throw bad();
      c.fraction = f;
      return c;
    }
    const long long n = std::stoll(text, &used);
    if (used != text.size() || n < 0) throw bad();
    c.tokens = n;
    return c;
  } catch (const std::logic_error&) {
    throw bad();
  }
}

std::vector<int> parse_cache_sizes(const std::string& text) {
  const auto bad = [&](const std::string& why) {
    return Error(fmt::format("--cache-sizes {}: {} (write 1-8, 2,4,8 or 1-3,8)", text, why));
  };
  std::set<int> out;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t comma = std::min(text.find(',', at), text.size());
    const std::string part = text.substr(at, comma - at);
    const auto number = [&](const std::string& s) {
      if (s.empty() || s.size() > 6 || s.find_first_not_of("0123456789") != std::string::npos)
        throw bad(fmt::format("'{}' is not a cache size", s));
      return std::stoi(s);
    };
    const size_t dash = part.find('-');
    if (dash == std::string::npos) {
      out.insert(number(part));
    } else {
      const int a = number(part.substr(0, dash)), b = number(part.substr(dash + 1));
      if (a > b) throw bad(fmt::format("the range {} runs backwards", part));
      for (int c = a; c <= b; ++c) out.insert(c);
    }
    at = comma + 1;
  }
  return {out.begin(), out.end()};
}

std::vector<Policy> parse_policies(const std::string& text) {
  if (text == "all") return cachesim::all_policies();
  std::vector<Policy> out;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t comma = std::min(text.find(',', at), text.size());
    const Policy p = cachesim::parse_policy(text.substr(at, comma - at));
    if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
    at = comma + 1;
  }
  return out;
}

LayerCounts CacheSimResult::total() const {
  LayerCounts t;
  for (const auto& l : layers) t += l;
  return t;
}

const CacheSimResult* CacheSimReport::find(Policy p, int cache_size) const {
  for (const auto& r : results)
    if (r.policy == p && r.cache_size == cache_size) return &r;
  return nullptr;
}

// ---- the step stream ---------------------------------------------------------------------------------

namespace {

struct Step {
  int64_t tokens = 0;
  bool scored = false;
  std::vector<ExpertSet> sets;   // [L]: the experts the step needs at each layer
  std::vector<ExpertSet> guess;  // [L]: the union of its tokens' recorded prefetch guesses (when read)
};

// Batches of B sequences in file order, source after source; a step is one token of each running sequence.
class StepStream {
 public:
  StepStream(const std::vector<const RoutingSource*>& sources, int batch, int64_t calibration_tokens, bool guesses)
      : sources_(sources), batch_(batch), calibration_(calibration_tokens), guesses_(guesses),
        layers_(sources.front()->num_layers()), k_(sources.front()->top_k()) {}

  bool next(Step& out) {
    while (pos_ >= longest_)
      if (!load_batch()) return false;
    out.sets.assign(size_t(layers_), ExpertSet{});
    out.guess.assign(guesses_ ? size_t(layers_) : 0, ExpertSet{});
    out.tokens = 0;
    int64_t first_token = -1;  // the step's lowest token index in the stream
    for (size_t j = 0; j < starts_.size(); ++j) {
      if (lengths_[j] <= pos_) continue;
      const int64_t row = starts_[j] + pos_;
      if (first_token < 0) first_token = base_ + batch_row_ + row;
      ++out.tokens;
      const uint8_t* r = &rows_[size_t(row) * size_t(layers_) * size_t(k_)];
      for (int l = 0; l < layers_; ++l)
        for (int i = 0; i < k_; ++i) out.sets[size_t(l)].add(r[l * k_ + i]);
      if (guesses_) {
        const uint8_t* g = &guess_rows_[size_t(row) * size_t(layers_) * size_t(k_)];
        for (int l = 0; l < layers_; ++l)
          for (int i = 0; i < k_; ++i)
            if (g[l * k_ + i] != 255) out.guess[size_t(l)].add(g[l * k_ + i]);
      }
    }
    out.scored = first_token >= calibration_;
    ++pos_;
    return true;
  }

 private:
  bool load_batch() {
    for (;;) {
      if (src_ >= sources_.size()) return false;
      const auto& off = sources_[src_]->sequence_offsets();
      const int64_t S = int64_t(off.size()) - 1;
      if (seq_ >= S) {
        base_ += off.back();
        ++src_;
        seq_ = 0;
        continue;
      }
      const int64_t s1 = std::min(S, seq_ + batch_);
      batch_row_ = off[size_t(seq_)];
      sources_[src_]->read_experts(batch_row_, off[size_t(s1)] - batch_row_, rows_);
      if (guesses_) sources_[src_]->read_prefetch_guess(batch_row_, off[size_t(s1)] - batch_row_, guess_rows_);
      starts_.clear();
      lengths_.clear();
      longest_ = 0;
      for (int64_t s = seq_; s < s1; ++s) {
        starts_.push_back(off[size_t(s)] - batch_row_);
        lengths_.push_back(off[size_t(s) + 1] - off[size_t(s)]);
        longest_ = std::max(longest_, lengths_.back());
      }
      seq_ = s1;
      pos_ = 0;
      if (longest_ > 0) return true;
    }
  }

  std::vector<const RoutingSource*> sources_;
  int batch_;
  int64_t calibration_;
  bool guesses_;
  int layers_, k_;
  size_t src_ = 0;
  int64_t base_ = 0, seq_ = 0;  // the current source's first token in the stream; its next sequence
  int64_t batch_row_ = 0;       // the batch's first row in the source
  std::vector<uint8_t> rows_;   // the batch's routing
  std::vector<uint8_t> guess_rows_;  // and its recorded prefetch guesses
  std::vector<int64_t> starts_, lengths_;
  int64_t pos_ = 0, longest_ = 0;
};

// Per layer and expert, how often the first `tokens` tokens of the stream chose it.
std::vector<std::vector<int64_t>> calibration_counts(const std::vector<const RoutingSource*>& sources, int64_t tokens) {
  const int L = sources.front()->num_layers(), k = sources.front()->top_k(), E = sources.front()->num_experts();
  std::vector<std::vector<int64_t>> counts(size_t(L), std::vector<int64_t>(size_t(E), 0));
  std::vector<uint8_t> rows;
  for (const RoutingSource* s : sources) {
    const int64_t n = std::min(tokens, s->sequence_offsets().back());
    for (int64_t at = 0; at < n; at += 4096) {
      const int64_t m = std::min<int64_t>(4096, n - at);
      s->read_experts(at, m, rows);
      for (int64_t t = 0; t < m; ++t)
        for (int l = 0; l < L; ++l)
          for (int i = 0; i < k; ++i) ++counts[size_t(l)][rows[size_t((t * L + l) * k + i)]];
    }
    tokens -= n;
    if (tokens <= 0) break;
  }
  return counts;
}

struct Instance {
  Policy policy;
  int capacity;
  std::unique_ptr<cachesim::CachePolicy> sim;
  std::vector<LayerCounts> counts;
  std::vector<cachesim::StepMix> mix;
};

}  // namespace

// ---- the simulation ----------------------------------------------------------------------------------

CacheSimReport simulate_cache(const std::vector<const RoutingSource*>& sources, const CacheSimOptions& options) {
  if (sources.empty()) throw Error("cachesim: no trace given");
  const RoutingSource& first = *sources.front();
  CacheSimReport r;
  r.num_layers = first.num_layers();
  r.top_k = first.top_k();
  r.num_experts = first.num_experts();
  for (const RoutingSource* s : sources) {
    if (s->num_layers() != r.num_layers || s->top_k() != r.top_k || s->num_experts() != r.num_experts)
      throw Error(fmt::format("{}: {} layers, top-{} of {} experts, but {} has {} layers, top-{} of {}: traces replayed "
                              "together must route alike", s->name(), s->num_layers(), s->top_k(), s->num_experts(),
                              first.name(), r.num_layers, r.top_k, r.num_experts));
    r.traces.push_back(s->name());
    r.tokens += s->sequence_offsets().back();
    r.sequences += int64_t(s->sequence_offsets().size()) - 1;
  }
  if (r.tokens == 0) throw Error(fmt::format("{}: no tokens to simulate", first.name()));
  r.options = options;
  if (r.options.cache_sizes.empty())
    for (int c = 1; c <= r.num_experts; ++c) r.options.cache_sizes.push_back(c);
  bool all_guessed = true;
  for (const RoutingSource* s : sources) all_guessed = all_guessed && s->has_prefetch_guess();
  if (r.options.policies.empty())
    for (Policy p : cachesim::all_policies())
      if (all_guessed || !cachesim::needs_prefetch_guess(p)) r.options.policies.push_back(p);
  for (Policy p : r.options.policies)
    if (cachesim::needs_prefetch_guess(p))
      for (const RoutingSource* s : sources)
        if (!s->has_prefetch_guess())
          throw Error(fmt::format("{}: {} needs the trace's prefetch guesses (/prefetch_guess: trace with "
                                  "--record-prefetch-guess)", s->name(), cachesim::policy_name(p)));
  for (int c : r.options.cache_sizes)
    if (c < 1 || c > r.num_experts)
      throw Error(fmt::format("{}: cache size {} is outside 1..{} (the trace's experts per layer)", first.name(), c,
                              r.num_experts));
  if (r.options.batch < 1) throw Error(fmt::format("cachesim: batch {} must be at least 1", r.options.batch));
  if (r.options.belady_window < 1) throw Error("cachesim: the Belady look-ahead must be at least 1 step");
  r.model_config = first.model_config();
  r.expert_bytes = expert_bytes_of(r.model_config);
  r.calibration_tokens = r.options.calibrate.resolve(r.tokens);
  const auto& policies = r.options.policies;
  const bool wants_static = std::count(policies.begin(), policies.end(), Policy::Static) > 0;
  if (wants_static && r.calibration_tokens == 0)
    throw Error("cachesim: the static policy needs calibration tokens (--calibrate N, a fraction or a percentage)");
  if (r.calibration_tokens >= r.tokens)
    throw Error(fmt::format("cachesim: --calibrate takes all {} tokens of the trace; nothing is left to score", r.tokens));
  r.belady_simulated = std::count(policies.begin(), policies.end(), Policy::Belady) > 0;

  const auto counts = wants_static ? calibration_counts(sources, r.calibration_tokens) : std::vector<std::vector<int64_t>>{};
  cachesim::NextUseIndex future(r.num_layers, r.num_experts);
  std::vector<Instance> sims;
  for (Policy p : policies)
    for (int c : r.options.cache_sizes) {
      cachesim::PolicyParams pp;
      pp.layers = r.num_layers;
      pp.experts = r.num_experts;
      pp.capacity = c;
      pp.expert_bytes = std::max<int64_t>(1, r.expert_bytes.nf4);
      pp.lfu_aging_steps = r.options.lfu_aging_steps;
      if (p == Policy::Static) pp.static_sets = cachesim::most_used(counts, c);
      if (p == Policy::Belady) pp.future = &future, pp.belady_undecided = &r.belady_undecided;
      sims.push_back({p, c, cachesim::make_policy(p, pp), std::vector<LayerCounts>(size_t(r.num_layers)),
                      std::vector<cachesim::StepMix>(size_t(r.num_layers), cachesim::StepMix(r.num_experts))});
    }

  bool wants_guess = false;
  for (Policy p : policies) wants_guess = wants_guess || cachesim::needs_prefetch_guess(p);
  StepStream stream(sources, r.options.batch, r.calibration_tokens, wants_guess);
  const ExpertSet no_guess;
  const size_t window = r.belady_simulated ? size_t(r.options.belady_window) + 1 : 1;
  // Belady sees only the scored steps' needs: warm-up misses cost nothing, so during the warm-up it
  // gathers the experts the scored part wants soonest (and no policy beats it on the scored steps).
  const std::vector<ExpertSet> unscored(size_t(r.num_layers));
  std::deque<Step> ahead;
  int64_t pushed = 0;
  bool ended = false;
  const auto fill = [&] {
    while (!ended && ahead.size() < window) {
      Step s;
      if (!stream.next(s)) {
        ended = true;
        future.set_complete(true);
        break;
      }
      if (r.belady_simulated) future.push(pushed, s.scored ? s.sets : unscored);
      ++pushed;
      ahead.push_back(std::move(s));
    }
  };
  Progress progress("cachesim", r.tokens, r.options.progress);
  std::vector<LayerCounts> warmup(size_t(r.num_layers));
  fill();
  for (int64_t t = 0; !ahead.empty(); ++t) {
    const Step& s = ahead.front();
    if (r.belady_simulated) future.pop(t, s.scored ? s.sets : unscored);
    for (auto& inst : sims)
      for (int l = 0; l < r.num_layers; ++l) {
        LayerCounts& c = s.scored ? inst.counts[size_t(l)] : warmup[size_t(l)];
        const int64_t misses = c.misses, prefetches = c.prefetch_copies;
        const int used = s.sets[size_t(l)].size();
        c.steps += 1;
        c.requests += used;
        inst.sim->step(t, l, s.sets[size_t(l)], s.guess.empty() ? no_guess : s.guess[size_t(l)], c);
        if (s.scored) inst.mix[size_t(l)].add(used, int(c.misses - misses), int(c.prefetch_copies - prefetches));
      }
    if (s.scored) r.scored_tokens += s.tokens, ++r.scored_steps;
    progress.advance(s.tokens);
    ahead.pop_front();
    fill();
  }
  progress.finish();
  for (auto& inst : sims) r.results.push_back({inst.policy, inst.capacity, std::move(inst.counts), std::move(inst.mix)});
  return r;
}

CacheSimReport simulate_cache(const std::vector<std::string>& trace_paths, const CacheSimOptions& options) {
  std::vector<std::unique_ptr<RoutingSource>> owned;
  std::vector<const RoutingSource*> sources;
  for (const auto& p : trace_paths) {
    owned.push_back(open_routing_source(p));
    sources.push_back(owned.back().get());
  }
  return simulate_cache(sources, options);
}

}  // namespace moelab::analysis
