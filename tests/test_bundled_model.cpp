// The bundled default model (models/default -> models/tiny-mixtral) is what its model card says it is.
// The card's figures were computed by scripts/train_tiny_mixtral.py with transformers on the shipped
// BF16 weights; here moelab's reference engine recomputes them from the checkpoint, independently: the
// held-out loss of every domain and the first-choice expert load per domain; the loss must beat the
// held-out tokens' own unigram entropy, computed here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/checkpoint.hpp"
#include "core/tokenizer.hpp"
#include "reference/model.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;

constexpr int kWindow = 256;  // the card's evaluation windows (SEQ_LEN in the training script)

// First-choice expert counts per layer, for one forward call.
struct FirstChoice : Probe {
  std::vector<std::vector<int64_t>>* counts = nullptr;
  void on_layer(const LayerObservation& o) override {
    for (Eigen::Index t = 0; t < o.experts->rows(); ++t) ++(*counts)[size_t(o.layer)][size_t((*o.experts)(t, 0))];
  }
};

TEST(BundledModel, ReproducesItsModelCard) {
  const fs::path dir = MOELAB_BUNDLED_MODEL;
  ASSERT_TRUE(fs::exists(dir / "model_card.json")) << dir;
  std::ifstream card_in(dir / "model_card.json");
  const auto card = nlohmann::json::parse(card_in);

  // At most 16 MB in the repository, as the issue asks, and shaped like Mixtral.
  uintmax_t bytes = 0;
  for (const auto& f : fs::recursive_directory_iterator(dir))
    if (f.is_regular_file()) bytes += f.file_size();
  EXPECT_LE(bytes, 16u * 1000 * 1000);
  const auto ck = Checkpoint::open(dir.string());
  const auto& c = ck->config();
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_LT(c.num_kv_heads, c.num_heads);  // GQA
  EXPECT_EQ(c.total_params(), card["parameters"].get<int64_t>());

  const Tokenizer tok(ck->tokenizer_path());
  ref::Model<float> model(*ck);
  std::map<std::string, double> nll;
  std::map<std::string, int64_t> predicted;
  std::map<std::string, std::map<int32_t, int64_t>> unigram;  // counts of the predicted tokens
  std::map<std::string, std::vector<std::vector<int64_t>>> load;
  std::ifstream corpus(dir / "corpus" / "heldout.jsonl");
  ASSERT_TRUE(corpus) << "corpus/heldout.jsonl";
  for (std::string line; std::getline(corpus, line);) {
    if (line.empty()) continue;
    const auto doc = nlohmann::json::parse(line);
    const std::string domain = doc["domain"];
    auto ids = tok.encode(doc["text"].get<std::string>(), /*add_bos=*/true);
    ids.push_back(int32_t(tok.eos_id()));
    auto& counts = load[domain];
    counts.resize(size_t(c.num_layers), std::vector<int64_t>(size_t(c.num_experts)));
    FirstChoice probe;
    probe.counts = &counts;
    for (size_t s = 0; s + 1 < ids.size(); s += kWindow) {
      const size_t end = std::min(ids.size(), s + kWindow + 1);
      const std::vector<int32_t> input(ids.begin() + int64_t(s), ids.begin() + int64_t(end) - 1);
      model.reset();
      const MatrixRF logits = model.forward(input, &probe);
      for (size_t t = 0; t + 1 < end - s; ++t) {
        const auto row = logits.row(Eigen::Index(t)).cast<double>();
        const double lse = row.maxCoeff() + std::log((row.array() - row.maxCoeff()).exp().sum());
        nll[domain] += lse - row(ids[s + t + 1]);
        ++predicted[domain];
        ++unigram[domain][ids[s + t + 1]];
      }
    }
  }

  ASSERT_EQ(nll.size(), card["heldout"].size());
  // share[l][e] over domains, to see how far apart domains route.
  std::vector<std::vector<std::vector<double>>> share_by_domain(size_t(c.num_layers),
                                                                std::vector<std::vector<double>>(size_t(c.num_experts)));
  for (const auto& [domain, sum] : nll) {
    SCOPED_TRACE(domain);
    const auto& want = card["heldout"][domain];
    EXPECT_EQ(predicted[domain], want["tokens"].get<int64_t>());
    // The card rounds to 1e-4 nats; Eigen and PyTorch sum in different orders in FP32 (~1e-6 relative on
    // a loss of ~3), so 1e-3 catches any real disagreement in tokenization, windows or the forward pass.
    EXPECT_NEAR(sum / double(predicted[domain]), want["loss"].get<double>(), 1e-3);
    // Trained: clearly better than any model that ignores context. The best such model for these very
    // tokens is their own frequency table (cross-entropy is smallest against the empirical distribution),
    // so its loss, the entropy of the predicted tokens' unigram distribution computed here in float64,
    // bounds every unigram model from below, the card's add-one model fitted on training text included.
    // The loss measured above must beat it by half a nat (it does by 1.1 to 2.8 nats in every domain).
    double unigram_entropy = 0;
    for (const auto& [id, n] : unigram[domain]) {
      const double p = double(n) / double(predicted[domain]);
      unigram_entropy -= p * std::log(p);
    }
    RecordProperty(domain + "_unigram_entropy", std::to_string(unigram_entropy));
    EXPECT_LT(sum / double(predicted[domain]), unigram_entropy - 0.5);
    // First-choice load per layer as the card has it. A router logit near a tie can flip between
    // implementations, so shares agree to 0.01 rather than exactly.
    for (int l = 0; l < c.num_layers; ++l) {
      const auto& counts = load[domain][size_t(l)];
      int64_t total = 0;
      for (auto n : counts) total += n;
      for (int e = 0; e < c.num_experts; ++e) {
        const double share = double(counts[size_t(e)]) / double(total);
        EXPECT_NEAR(share, card["expert_load_first_choice"][domain][size_t(l)][size_t(e)].get<double>(), 0.01)
            << "layer " << l << " expert " << e;
        share_by_domain[size_t(l)][size_t(e)].push_back(share);
      }
    }
  }
  // Experts specialize: somewhere an expert's first-choice share differs between two domains by more
  // than the uniform share itself (1/8). Routing that ignored the domain would differ only by sampling
  // noise, a few hundredths with thousands of tokens per domain.
  double widest = 0;
  for (const auto& layer : share_by_domain)
    for (const auto& shares : layer)
      widest = std::max(widest, *std::max_element(shares.begin(), shares.end()) - *std::min_element(shares.begin(), shares.end()));
  EXPECT_GT(widest, 1.0 / c.num_experts);
}

}  // namespace
}  // namespace moelab::test
