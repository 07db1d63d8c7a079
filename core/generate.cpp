#include "core/generate.hpp"

#include <fmt/format.h>

#include "core/clock.hpp"
#include "core/error.hpp"

namespace moelab {

double GenerationResult::decode_tokens_per_second() const {
  // The first token comes from the prefill; the rest from decode steps.
  const size_t decoded = tokens.size() > 1 ? tokens.size() - 1 : 0;
  return decode_seconds > 0 ? double(decoded) / decode_seconds : 0.0;
}

GenerationResult generate(Engine& engine, const std::vector<int32_t>& prompt, int max_new_tokens,
                          Sampler& sampler, int eos_id, const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) throw Error("generate: empty prompt");
  const int room = engine.max_context() - engine.position() - int(prompt.size());
  if (room < 0)
    throw Error(fmt::format("prompt of {} tokens does not fit the engine's context of {} tokens", prompt.size(),
                            engine.max_context()));
  // The last generated token never needs a forward pass, so `room + 1` tokens can be produced.
  GenerationResult r;
  r.context = engine.max_context();
  const bool capped = max_new_tokens > room + 1;
  if (capped) max_new_tokens = room + 1;
  auto t0 = SteadyClock::now();
  MatrixRF logits = engine.forward_tail(prompt, int(prompt.size()) - 1);  // sampling reads the last row only
  r.prefill_seconds = seconds_since(t0);
  t0 = SteadyClock::now();
  for (int i = 0; i < max_new_tokens; ++i) {
    const auto last = logits.row(logits.rows() - 1);
    const int32_t next = sampler.sample(std::span<const float>(last.data(), size_t(last.size())));
    if (next == eos_id) {
      r.stopped_at_eos = true;
      break;
    }
    r.tokens.push_back(next);
    if (on_token) on_token(next);
    if (i + 1 < max_new_tokens) logits = engine.forward(std::span<const int32_t>(&next, 1));
  }
  r.decode_seconds = seconds_since(t0);
  r.stopped_at_context = capped && !r.stopped_at_eos;
  return r;
}

}  // namespace moelab
