// Routing statistics: counts are accumulated per group (the whole trace, each domain) in one pass over
// its sequences, then turned into shares and balance figures. Definitions: analysis/stats.hpp and
// docs/stats-json.md.
#include "analysis/stats.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>

#include "core/error.hpp"

namespace moelab::analysis {

double first_choice_baseline(int num_experts) { return 1.0 / num_experts; }

double first_or_second_baseline(int num_experts, int top_k) {
  // P(two random k-subsets are disjoint) = C(E−k,k)/C(E,k) = Π_{i<k} (E−k−i)/(E−i); zero once E < 2k.
  double disjoint = 1;
  for (int i = 0; i < top_k; ++i) disjoint *= std::max(0, num_experts - top_k - i) / double(num_experts - i);
  return 1 - disjoint;
}

double coefficient_of_variation(const std::vector<double>& shares) {
  const double n = double(shares.size());
  double mean = 0;
  for (double s : shares) mean += s;
  mean /= n;
  double var = 0;  // population variance: the shares are the whole distribution, not a sample
  for (double s : shares) var += (s - mean) * (s - mean);
  var /= n;
  return mean > 0 ? std::sqrt(var) / mean : 0;
}

double max_over_mean(const std::vector<double>& shares) {
  double sum = 0, mx = 0;
  for (double s : shares) sum += s, mx = std::max(mx, s);
  return sum > 0 ? mx * double(shares.size()) / sum : 0;
}

double normalized_entropy(const std::vector<double>& shares) {
  if (shares.size() <= 1) return 1;  // one expert: 0/0, and trivially balanced
  double h = 0;
  for (double s : shares)
    if (s > 0) h -= s * std::log(s);  // 0 · ln 0 = 0
  return h / std::log(double(shares.size()));
}

std::optional<double> Repetition::first_choice() const {
  if (pairs == 0) return std::nullopt;
  return double(first_choice_same) / double(pairs);
}

std::optional<double> Repetition::first_or_second() const {
  if (pairs == 0) return std::nullopt;
  return double(topk_sets_overlap) / double(pairs);
}

void validate_trace(const TraceData& tr) {
  const auto fail = [](const std::string& what) { throw Error("trace: " + what); };
  if (tr.num_layers <= 0 || tr.top_k <= 0 || tr.num_experts <= 0)
    fail(fmt::format("num_layers {}, top_k {}, num_experts {} must be positive", tr.num_layers, tr.top_k,
                     tr.num_experts));
  if (tr.top_k > tr.num_experts) fail(fmt::format("top_k {} > num_experts {}", tr.top_k, tr.num_experts));
  if (tr.num_experts > 256) fail(fmt::format("num_experts {} does not fit the uint8 expert ids", tr.num_experts));
  const int64_t n = tr.num_tokens(), lk = int64_t(tr.num_layers) * tr.top_k;
  if (int64_t(tr.experts.size()) != n * lk)
    fail(fmt::format("experts has {} values, expected N·L·k = {}", tr.experts.size(), n * lk));
  if (!tr.gates.empty() && int64_t(tr.gates.size()) != n * lk)
    fail(fmt::format("gates has {} values, expected N·L·k = {}", tr.gates.size(), n * lk));
  if (tr.has_prefetch_guess() && int64_t(tr.prefetch_guess.size()) != n * lk)
    fail(fmt::format("prefetch_guess has {} values, expected N·L·k = {}", tr.prefetch_guess.size(), n * lk));
  for (size_t i = 0; i < tr.prefetch_guess.size(); ++i)
    if (tr.prefetch_guess[i] >= tr.num_experts && tr.prefetch_guess[i] != 255)
      fail(fmt::format("prefetch_guess: expert id {} >= num_experts {} at token {} layer {}", int(tr.prefetch_guess[i]),
                       tr.num_experts, i / size_t(lk), i / size_t(tr.top_k) % size_t(tr.num_layers)));
  if (tr.has_router_logits() && int64_t(tr.router_logits.size()) != n * tr.num_layers * tr.num_experts)
    fail(fmt::format("router_logits has {} values, expected N·L·E = {}", tr.router_logits.size(),
                     n * tr.num_layers * tr.num_experts));
  for (size_t i = 0; i < tr.router_logits.size(); ++i)  // an inf (float16 overflow) would make softmax NaN
    if (!std::isfinite(tr.router_logits[i]))
      fail(fmt::format("router_logits: non-finite value at token {} layer {} expert {}",
                       i / size_t(tr.num_layers * tr.num_experts), (i / size_t(tr.num_experts)) % size_t(tr.num_layers),
                       i % size_t(tr.num_experts)));
  const auto& off = tr.sequence_offsets;
  if (off.empty() || off.front() != 0 || off.back() != n)
    fail(fmt::format("sequence_offsets must run from 0 to the token count {}", n));
  for (size_t s = 1; s < off.size(); ++s)
    if (off[s] < off[s - 1]) fail(fmt::format("sequence_offsets decrease at sequence {}", s - 1));
  const int64_t num_seq = tr.num_sequences();
  if (!tr.sequence_domain.empty() && int64_t(tr.sequence_domain.size()) != num_seq)
    fail(fmt::format("sequence_domain has {} entries for {} sequences", tr.sequence_domain.size(), num_seq));
  for (size_t s = 0; s < tr.sequence_domain.size(); ++s)
    if (tr.sequence_domain[s] >= int32_t(tr.domain_names.size()))
      fail(fmt::format("sequence {} has domain id {}, but there are {} domain names", s, tr.sequence_domain[s],
                       tr.domain_names.size()));
  // Expert ids in range and distinct within a token's top-k (a repeat would double-count co-selection).
  for (int64_t i = 0; i < n * tr.num_layers; ++i) {
    const uint8_t* row = &tr.experts[size_t(i * tr.top_k)];
    for (int j = 0; j < tr.top_k; ++j) {
      if (row[j] >= tr.num_experts)
        fail(fmt::format("token {} layer {}: expert id {} >= num_experts {}", i / tr.num_layers, i % tr.num_layers,
                         int(row[j]), tr.num_experts));
      for (int j2 = 0; j2 < j; ++j2)
        if (row[j2] == row[j])
          fail(fmt::format("token {} layer {}: expert {} chosen twice", i / tr.num_layers, i % tr.num_layers,
                           int(row[j])));
    }
  }
}

namespace {

// Raw counts for one layer of one group; shares and figures are derived at the end.
struct LayerCounts {
  std::vector<int64_t> counts, top1, cosel;
  std::vector<double> prob_sum;  // Σ over tokens of softmax(router logits), when recorded
  Repetition rep;
};

// True when the top-k sets of two tokens share an expert (k is tiny; a quadratic scan is fastest).
bool sets_overlap(const uint8_t* a, const uint8_t* b, int k) {
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j)
      if (a[i] == b[j]) return true;
  return false;
}

class GroupAccumulator {
 public:
  explicit GroupAccumulator(const TraceData& tr) : tr_(tr) {
    const size_t e = size_t(tr.num_experts);
    layers_.resize(size_t(tr.num_layers));
    for (auto& lc : layers_) {
      lc.counts.assign(e, 0);
      lc.top1.assign(e, 0);
      lc.cosel.assign(e * e, 0);
      if (tr.has_router_logits()) lc.prob_sum.assign(e, 0.0);
    }
  }

  void add_sequence(int64_t s) {
    const int64_t begin = tr_.sequence_offsets[size_t(s)], end = tr_.sequence_offsets[size_t(s) + 1];
    for (int64_t t = begin; t < end; ++t)
      for (int l = 0; l < tr_.num_layers; ++l) {
        add_token(t, l);
        if (t > begin) add_pair(t - 1, t, l);  // both tokens in this sequence: boundaries never pair
      }
    tokens_ += end - begin;
    ++sequences_;
  }

  GroupStats finish(std::string name) const;

 private:
  const uint8_t* topk(int64_t t, int l) const {
    return &tr_.experts[size_t((t * tr_.num_layers + l) * tr_.top_k)];
  }

  void add_token(int64_t t, int l) {
    auto& lc = layers_[size_t(l)];
    const uint8_t* ex = topk(t, l);
    const int k = tr_.top_k, e = tr_.num_experts;
    ++lc.top1[ex[0]];
    for (int i = 0; i < k; ++i) {
      ++lc.counts[ex[i]];
      for (int j = 0; j < k; ++j) ++lc.cosel[size_t(ex[i]) * size_t(e) + ex[j]];  // i == j: the diagonal
    }
    if (!lc.prob_sum.empty()) {
      // softmax in double, shifted by the max so exp never overflows
      const float* z = &tr_.router_logits[size_t((t * tr_.num_layers + l) * e)];
      const double mx = *std::max_element(z, z + e);
      double sum = 0;
      for (int i = 0; i < e; ++i) sum += std::exp(double(z[i]) - mx);
      for (int i = 0; i < e; ++i) lc.prob_sum[size_t(i)] += std::exp(double(z[i]) - mx) / sum;
    }
  }

  void add_pair(int64_t a, int64_t b, int l) {
    auto& rep = layers_[size_t(l)].rep;
    const uint8_t *ea = topk(a, l), *eb = topk(b, l);
    ++rep.pairs;
    rep.first_choice_same += ea[0] == eb[0];
    rep.topk_sets_overlap += sets_overlap(ea, eb, tr_.top_k);
  }

  const TraceData& tr_;
  std::vector<LayerCounts> layers_;
  int64_t tokens_ = 0, sequences_ = 0;
};

// E · Σ_i f_i · P_i with f_i = count_i / n (sums to k) and P_i = prob_sum_i / n.
double aux_loss(const std::vector<int64_t>& counts, const std::vector<double>& prob_sum, double n) {
  double acc = 0;
  for (size_t i = 0; i < counts.size(); ++i) acc += (double(counts[i]) / n) * (prob_sum[i] / n);
  return double(counts.size()) * acc;
}

GroupStats GroupAccumulator::finish(std::string name) const {
  GroupStats g;
  g.name = std::move(name);
  g.tokens = tokens_;
  g.sequences = sequences_;
  const double n = double(tokens_), choices = n * tr_.top_k;
  const size_t e = size_t(tr_.num_experts);
  std::vector<int64_t> pooled_counts(e, 0);
  std::vector<double> pooled_probs(e, 0.0);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& lc = layers_[l];
    LayerStats ls;
    ls.layer = int(l);
    ls.counts = lc.counts;
    ls.top1_counts = lc.top1;
    for (size_t i = 0; i < e; ++i) {
      ls.load_share.push_back(double(lc.counts[i]) / choices);
      ls.top1_share.push_back(double(lc.top1[i]) / n);
      pooled_counts[i] += lc.counts[i];
    }
    ls.cv = coefficient_of_variation(ls.load_share);
    ls.max_over_mean = max_over_mean(ls.load_share);
    ls.normalized_entropy = normalized_entropy(ls.load_share);
    if (!lc.prob_sum.empty()) {
      std::vector<double> p(e);
      for (size_t i = 0; i < e; ++i) p[i] = lc.prob_sum[i] / n, pooled_probs[i] += lc.prob_sum[i];
      ls.mean_router_prob = p;
      ls.aux_loss = aux_loss(lc.counts, lc.prob_sum, n);
    }
    ls.coselection = lc.cosel;
    ls.repetition = lc.rep;
    g.layers.push_back(std::move(ls));
  }
  if (tr_.has_router_logits()) g.aux_loss_all_layers = aux_loss(pooled_counts, pooled_probs, n * tr_.num_layers);
  return g;
}

constexpr const char* kUnlabeled = "(unlabeled)";

}  // namespace

StatsReport compute_stats(const TraceData& tr, bool by_domain, const std::string& source) {
  validate_trace(tr);
  if (tr.num_tokens() == 0) throw Error(source + ": no tokens to compute statistics on");
  StatsReport r;
  r.num_layers = tr.num_layers;
  r.top_k = tr.top_k;
  r.num_experts = tr.num_experts;
  r.tokens = tr.num_tokens();
  r.sequences = tr.num_sequences();
  r.has_router_logits = tr.has_router_logits();
  r.baseline_first_choice = first_choice_baseline(tr.num_experts);
  r.baseline_first_or_second = first_or_second_baseline(tr.num_experts, tr.top_k);
  r.trace_attributes = tr.attributes;

  // Each group's co-selection tables are layers x experts^2 doubles however few tokens the trace holds (a
  // 300 KB trace of 65536 layers and 256 experts asked for 32 GiB, twice): refused before anything is
  // allocated. Mixtral-8x7B's take 16 KiB a group; DeepSeek-V3's (61 layers of 256 experts) 32 MiB.
  {
    std::set<int32_t> domains;
    if (by_domain) {
      for (int64_t s = 0; s < tr.num_sequences(); ++s)
        domains.insert(tr.sequence_domain.empty() ? -1 : std::max<int32_t>(-1, tr.sequence_domain[size_t(s)]));
    }
    constexpr double kBudgetBytes = double(uint64_t(8) << 30);
    const double e = double(tr.num_experts);
    const double bytes = double(1 + domains.size()) * double(tr.num_layers) * (e * e + 4 * e) * 8.0 * 2.0;
    if (bytes > kBudgetBytes)
      throw Error(fmt::format("{}: {} layers of {} experts in {} group(s) need {:.1f} GiB for the co-selection "
                              "tables, more than the {:.0f} GiB moelab stats allows{}", source, tr.num_layers, tr.num_experts,
                              1 + domains.size(), bytes / double(1 << 30), kBudgetBytes / double(1 << 30),
                              by_domain ? "; try without --by-domain" : ""));
  }

  GroupAccumulator all(tr);
  for (int64_t s = 0; s < tr.num_sequences(); ++s) all.add_sequence(s);
  r.overall = all.finish("all");

  if (by_domain) {
    // Sequences without a label (no sequence_domain, or a negative id) form their own group, listed last.
    const int32_t unlabeled = int32_t(tr.domain_names.size());
    std::map<int32_t, GroupAccumulator> groups;
    for (int64_t s = 0; s < tr.num_sequences(); ++s) {
      int32_t d = tr.sequence_domain.empty() ? -1 : tr.sequence_domain[size_t(s)];
      if (d < 0) d = unlabeled;
      groups.try_emplace(d, tr).first->second.add_sequence(s);
    }
    for (const auto& [d, acc] : groups) {
      GroupStats g = acc.finish(d == unlabeled ? kUnlabeled : tr.domain_names[size_t(d)]);
      if (g.tokens > 0) r.domains.push_back(std::move(g));
    }
  }
  return r;
}

// ---- JSON -------------------------------------------------------------------------------------------

namespace {

template <class T>
nlohmann::json opt_json(const std::optional<T>& v) {
  return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
}

nlohmann::json layer_json(const LayerStats& ls) {
  const size_t e = ls.counts.size();
  nlohmann::json cosel = nlohmann::json::array();
  for (size_t i = 0; i < e; ++i)
    cosel.push_back(std::vector<int64_t>(ls.coselection.begin() + long(i * e), ls.coselection.begin() + long((i + 1) * e)));
  return {{"layer", ls.layer},
          {"expert_counts", ls.counts},
          {"top1_counts", ls.top1_counts},
          {"load_share", ls.load_share},
          {"top1_share", ls.top1_share},
          {"cv", ls.cv},
          {"max_over_mean", ls.max_over_mean},
          {"normalized_entropy", ls.normalized_entropy},
          {"mean_router_prob", opt_json(ls.mean_router_prob)},
          {"aux_loss", opt_json(ls.aux_loss)},
          {"coselection", cosel},
          {"repetition",
           {{"pairs", ls.repetition.pairs},
            {"first_choice_same", ls.repetition.first_choice_same},
            {"topk_sets_overlap", ls.repetition.topk_sets_overlap},
            {"first_choice", opt_json(ls.repetition.first_choice())},
            {"first_or_second_choice", opt_json(ls.repetition.first_or_second())}}}};
}

nlohmann::json group_json(const GroupStats& g) {
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& ls : g.layers) layers.push_back(layer_json(ls));
  return {{"name", g.name},
          {"tokens", g.tokens},
          {"sequences", g.sequences},
          {"aux_loss_all_layers", opt_json(g.aux_loss_all_layers)},
          {"layers", layers}};
}

}  // namespace

nlohmann::json StatsReport::to_json() const {
  nlohmann::json domains_json = nlohmann::json::array();
  for (const auto& g : domains) domains_json.push_back(group_json(g));
  return {{"format", "moelab-stats-v1"},
          {"trace",
           {{"num_layers", num_layers},
            {"top_k", top_k},
            {"num_experts", num_experts},
            {"tokens", tokens},
            {"sequences", sequences},
            {"has_router_logits", has_router_logits},
            {"attributes", trace_attributes.is_null() ? nlohmann::json::object() : trace_attributes}}},
          {"baselines",
           {{"load_share", 1.0 / num_experts},
            {"first_choice", baseline_first_choice},
            {"first_or_second_choice", baseline_first_or_second},
            {"aux_loss_balanced", double(top_k)}}},
          {"overall", group_json(overall)},
          {"domains", domains_json}};
}

// ---- Tables -----------------------------------------------------------------------------------------

namespace {

std::string pct(std::optional<double> v) { return v ? fmt::format("{:.1f}", 100 * *v) : std::string("-"); }

std::string load_table(const StatsReport& r, const GroupStats& g) {
  std::string s = fmt::format("load share per expert, % of the N·k = {} choices (uniform {:.1f}%)\n",
                              g.tokens * r.top_k, 100.0 / r.num_experts);
  s += fmt::format("{:>5}", "layer");
  for (int e = 0; e < r.num_experts; ++e) s += fmt::format(" {:>5}", fmt::format("e{}", e));
  s += fmt::format(" {:>6} {:>8} {:>7} {:>8}\n", "CV", "max/mean", "entropy", "aux_loss");
  for (const auto& ls : g.layers) {
    s += fmt::format("{:>5}", ls.layer);
    for (double v : ls.load_share) s += fmt::format(" {:>5.1f}", 100 * v);
    s += fmt::format(" {:>6.3f} {:>8.3f} {:>7.4f} {:>8}\n", ls.cv, ls.max_over_mean, ls.normalized_entropy,
                     ls.aux_loss ? fmt::format("{:.4f}", *ls.aux_loss) : std::string("-"));
  }
  if (g.aux_loss_all_layers)
    s += fmt::format("aux loss, all layers pooled as transformers computes it: {:.4f} (balanced: {})\n",
                     *g.aux_loss_all_layers, r.top_k);
  else
    s += "aux loss: needs router logits (trace without them)\n";
  return s;
}

std::string repetition_table(const StatsReport& r, const GroupStats& g) {
  std::string s = "repetition between consecutive tokens of a sequence, %\n";
  s += fmt::format("{:>5} {:>8} {:>10} {:>7} {:>10} {:>7}\n", "layer", "pairs", "1st choice", "random",
                   "1st or 2nd", "random");
  for (const auto& ls : g.layers)
    s += fmt::format("{:>5} {:>8} {:>10} {:>7.1f} {:>10} {:>7.1f}\n", ls.layer, ls.repetition.pairs,
                     pct(ls.repetition.first_choice()), 100 * r.baseline_first_choice,
                     pct(ls.repetition.first_or_second()), 100 * r.baseline_first_or_second);
  return s;
}

// The Mixtral paper's Figure 7 as a table: for one layer, rows = domains, columns = expert shares.
std::string domain_load_table(const StatsReport& r, int layer, size_t name_w) {
  std::string s = fmt::format("layer {}: load share per expert by domain, % (uniform {:.1f}%)\n", layer,
                              100.0 / r.num_experts);
  s += fmt::format("{:<{}}", "domain", name_w);
  for (int e = 0; e < r.num_experts; ++e) s += fmt::format(" {:>5}", fmt::format("e{}", e));
  s += fmt::format(" {:>6}\n", "CV");
  const auto row = [&](const GroupStats& g) {
    const auto& ls = g.layers[size_t(layer)];
    std::string line = fmt::format("{:<{}}", g.name, name_w);
    for (double v : ls.load_share) line += fmt::format(" {:>5.1f}", 100 * v);
    return line + fmt::format(" {:>6.3f}\n", ls.cv);
  };
  for (const auto& g : r.domains) s += row(g);
  return s + row(r.overall);
}

// The Mixtral paper's Table 5: rows = domains, first choice and first-or-second at the chosen layers.
std::string domain_repetition_table(const StatsReport& r, const std::vector<int>& layers, size_t name_w) {
  std::string s = "repetition between consecutive tokens by domain, %\n";
  s += fmt::format("{:<{}}", "domain", name_w);
  for (int l : layers) s += fmt::format(" {:>8}", fmt::format("1st L{}", l));
  for (int l : layers) s += fmt::format(" {:>9}", fmt::format("1|2 L{}", l));
  s += "\n";
  const auto row = [&](const GroupStats& g) {
    std::string line = fmt::format("{:<{}}", g.name, name_w);
    for (int l : layers) line += fmt::format(" {:>8}", pct(g.layers[size_t(l)].repetition.first_choice()));
    for (int l : layers) line += fmt::format(" {:>9}", pct(g.layers[size_t(l)].repetition.first_or_second()));
    return line + "\n";
  };
  for (const auto& g : r.domains) s += row(g);
  s += row(r.overall);
  s += fmt::format("{:<{}}", "random", name_w);
  for (size_t i = 0; i < layers.size(); ++i) s += fmt::format(" {:>8.1f}", 100 * r.baseline_first_choice);
  for (size_t i = 0; i < layers.size(); ++i) s += fmt::format(" {:>9.1f}", 100 * r.baseline_first_or_second);
  return s + "\n";
}

}  // namespace

std::string StatsReport::table(std::vector<int> domain_layers) const {
  std::string s = fmt::format("routing statistics: {} tokens in {} sequences, {} layers, {} experts, top-{}{}\n\n",
                              tokens, sequences, num_layers, num_experts, top_k,
                              has_router_logits ? ", router logits recorded" : "");
  s.append(load_table(*this, overall)).append("\n").append(repetition_table(*this, overall));
  if (domains.empty()) return s;

  if (domain_layers.empty()) {
    // The paper's choice for 32 layers: 0, 15, 31.
    domain_layers = {0, (num_layers - 1) / 2, num_layers - 1};
    domain_layers.erase(std::unique(domain_layers.begin(), domain_layers.end()), domain_layers.end());
  }
  for (int l : domain_layers)
    if (l < 0 || l >= num_layers) throw Error(fmt::format("stats: layer {} out of range 0..{}", l, num_layers - 1));
  size_t name_w = std::string("domain").size();
  for (const auto& g : domains) name_w = std::max(name_w, g.name.size());

  s += fmt::format("\nby domain ({} domains; 'all' is the whole trace)\n", domains.size());
  // Appended piecewise: `"\n" + std::string` trips a GCC 12 -Wrestrict false positive.
  for (int l : domain_layers) s.append("\n").append(domain_load_table(*this, l, name_w));
  s.append("\n").append(domain_repetition_table(*this, domain_layers, name_w));
  return s;
}

}  // namespace moelab::analysis
