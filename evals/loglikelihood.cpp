#include "evals/loglikelihood.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "core/sampling.hpp"

namespace moelab::evals {

double token_logprob(std::span<const float> row, int32_t token) {
  double mx = -INFINITY;
  for (float v : row) mx = std::max(mx, double(v));
  double sum = 0;
  for (float v : row) sum += std::exp(double(v) - mx);
  return double(row[size_t(token)]) - mx - std::log(sum);
}

LoglikelihoodResult score_rows(const MatrixRF& logits, Eigen::Index first_row, const Tokens& cont) {
  LoglikelihoodResult r;
  r.is_greedy = true;
  for (size_t i = 0; i < cont.size(); ++i) {
    const Eigen::Index row = first_row + Eigen::Index(i);
    std::span<const float> v(logits.row(row).data(), size_t(logits.cols()));
    if (cont[i] < 0 || cont[i] >= logits.cols()) throw Error("loglikelihood: token id outside the vocabulary");
    const double lp = token_logprob(v, cont[i]);
    r.token_logprobs.push_back(lp);
    r.logprob += lp;
    if (argmax(v) != cont[i]) r.is_greedy = false;
  }
  return r;
}

namespace {

// The harness's input for one request: (ctx + cont)[-(L+1):][:-1]; the continuation is scored from
// the last |cont| rows of its logits.
LoglikelihoodResult score_one(Engine& engine, const TokenRequest& req, ScoreStats* stats) {
  const int L = engine.max_context();
  Tokens all = req.context;
  all.insert(all.end(), req.continuation.begin(), req.continuation.end());
  const size_t keep = std::min(all.size(), size_t(L) + 1);
  Tokens input(all.end() - keep, all.end() - 1);
  engine.reset();
  // Only the continuation's rows are scored (all of them when it was truncated to the context).
  const int scored = std::min<int>(int(input.size()), std::max<int>(1, int(req.continuation.size())));
  const MatrixRF logits = engine.forward_tail(input, int(input.size()) - scored);
  if (stats) stats->tokens_forwarded += int64_t(input.size());
  if (int(req.continuation.size()) > L) {
    // The harness asserts here; we score the last L continuation tokens and say so.
    const Tokens tail(req.continuation.end() - L, req.continuation.end());
    auto r = score_rows(logits, logits.rows() - Eigen::Index(L), tail);
    r.truncated = true;
    if (stats) stats->truncated++;
    return r;
  }
  return score_rows(logits, logits.rows() - Eigen::Index(req.continuation.size()), req.continuation);
}

}  // namespace

std::vector<LoglikelihoodResult> score_requests(Engine& engine, const std::vector<TokenRequest>& requests,
                                                ScoreStats* stats, const std::function<void()>& on_done) {
  std::vector<LoglikelihoodResult> out(requests.size());
  const int L = engine.max_context();
  size_t i = 0;
  while (i < requests.size()) {
    if (requests[i].context.empty() || requests[i].continuation.empty())
      throw Error("loglikelihood: empty context or continuation after tokenization");
    size_t j = i + 1;
    while (j < requests.size() && requests[j].context == requests[i].context) ++j;
    if (stats) stats->groups++;
    const Tokens& ctx = requests[i].context;
    bool fits = true;
    for (size_t k = i; k < j; ++k) fits = fits && ctx.size() + requests[k].continuation.size() <= size_t(L) + 1;
    if (fits && j - i > 1) {
      // Context once; its last row predicts each continuation's first token.
      engine.reset();
      const MatrixRF ctx_logits = engine.forward_tail(ctx, int(ctx.size()) - 1);
      if (stats) stats->tokens_forwarded += int64_t(ctx.size());
      const int base = engine.position();
      for (size_t k = i; k < j; ++k) {
        const Tokens& cont = requests[k].continuation;
        MatrixRF rows(Eigen::Index(cont.size()), ctx_logits.cols());
        rows.row(0) = ctx_logits.row(ctx_logits.rows() - 1);
        if (cont.size() > 1) {
          engine.truncate(base);
          const MatrixRF more = engine.forward(std::span<const int32_t>(cont.data(), cont.size() - 1));
          if (stats) stats->tokens_forwarded += int64_t(cont.size() - 1);
          rows.bottomRows(more.rows()) = more;
        }
        out[k] = score_rows(rows, 0, cont);
        if (on_done) on_done();
      }
    } else {
      for (size_t k = i; k < j; ++k) {
        out[k] = score_one(engine, requests[k], stats);
        if (on_done) on_done();
      }
    }
    i = j;
  }
  return out;
}

}  // namespace moelab::evals
