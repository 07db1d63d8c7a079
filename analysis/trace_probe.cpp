// Recording one window's routing from any engine through a Probe (analysis/trace.hpp).
#include <fmt/format.h>

#include "analysis/prefetch_guess.hpp"
#include "analysis/timing.hpp"
#include "analysis/trace.hpp"
#include "core/error.hpp"

namespace moelab::analysis {

RoutingProbe::RoutingProbe(const ModelConfig& config, bool with_router_logits, const PrefetchGuesser* guesser)
    : layers_(config.num_layers), top_k_(config.top_k), experts_(config.num_experts), with_logits_(with_router_logits),
      guesser_(guesser) {
  if (guesser && (guesser->num_layers() != layers_ || guesser->top_k() != top_k_))
    throw Error("routing probe: the prefetch guesser is of another model");
}

void RoutingProbe::start(int n) {
  n_ = n;
  seen_.assign(size_t(layers_), false);
  out_ = {};
  out_.experts.assign(size_t(n) * size_t(layers_) * size_t(top_k_), 0);
  out_.gates.assign(out_.experts.size(), 0.0f);
  if (with_logits_) out_.router_logits.assign(size_t(n) * size_t(layers_) * size_t(experts_), 0.0f);
  if (guesser_) out_.prefetch_guess.assign(out_.experts.size(), uint8_t(255));  // 255: no guess (layer 0)
}

void RoutingProbe::on_layer(const LayerObservation& obs) {
  const int l = obs.layer;
  if (l < 0 || l >= layers_ || !obs.experts || !obs.gates || obs.experts->rows() != n_ || obs.experts->cols() != top_k_)
    throw Error(fmt::format("routing probe: layer {} reported an unexpected shape", l));
  if (with_logits_ && !obs.router_logits)
    throw Error("router logits requested, but the engine reports none (a dense model has no router)");
  // Rows are tokens, then layers, then rank: [n, L, k] and [n, L, E].
  for (int t = 0; t < n_; ++t) {
    for (int j = 0; j < top_k_; ++j) {
      const size_t at = (size_t(t) * size_t(layers_) + size_t(l)) * size_t(top_k_) + size_t(j);
      const int32_t e = (*obs.experts)(t, j);
      if (e < 0 || e >= experts_) throw Error(fmt::format("routing probe: layer {} chose expert {} of {}", l, e, experts_));
      out_.experts[at] = uint8_t(e);
      out_.gates[at] = (*obs.gates)(t, j);
    }
    if (with_logits_)
      for (int e = 0; e < experts_; ++e)
        out_.router_logits[(size_t(t) * size_t(layers_) + size_t(l)) * size_t(experts_) + size_t(e)] = (*obs.router_logits)(t, e);
  }
  if (guesser_ && l + 1 < layers_) {  // this layer's output is what the next layer's guess is made from
    if (!obs.hidden || obs.hidden->rows() != n_)
      throw Error(fmt::format("routing probe: layer {} reported no hidden state to guess the next layer from", l));
    guesser_->guess(l + 1, *obs.hidden, out_.prefetch_guess.data() + size_t(l + 1) * size_t(top_k_),
                    size_t(layers_) * size_t(top_k_));
  }
  seen_[size_t(l)] = true;
}

WindowRouting RoutingProbe::take() {
  for (int l = 0; l < layers_; ++l)
    if (!seen_[size_t(l)]) throw Error(fmt::format("routing probe: the engine did not report layer {}", l));
  return std::move(out_);
}

WindowRouting route_window(Engine& engine, std::span<const int32_t> tokens, bool with_router_logits, Probe* also,
                           const PrefetchGuesser* guesser) {
  RoutingProbe routing(engine.config(), with_router_logits, guesser);
  ProbeFanout both({&routing, also});
  routing.start(int(tokens.size()));
  engine.reset();
  engine.forward(tokens, &both);
  return routing.take();
}

}  // namespace moelab::analysis
