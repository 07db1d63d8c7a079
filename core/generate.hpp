#pragma once
// Engine-independent generation: prefill the prompt, then decode one token at a time.
#include <cstdint>
#include <functional>
#include <vector>

#include "core/engine.hpp"
#include "core/sampling.hpp"

namespace moelab {

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated ids (not the prompt)
  bool stopped_at_eos = false;
  bool stopped_at_context = false;  // max_new_tokens was cut to what the engine's context holds
  int context = 0;                  // the engine's context, in tokens
  double prefill_seconds = 0, decode_seconds = 0;
  double decode_tokens_per_second() const;
};

// Calls on_token for each generated id as soon as it is chosen. Stops at `eos_id` (not emitted) or
// after max_new_tokens; never runs past the engine's context (a clear error beforehand instead).
GenerationResult generate(Engine& engine, const std::vector<int32_t>& prompt, int max_new_tokens,
                          Sampler& sampler, int eos_id, const std::function<void(int32_t)>& on_token = {});

}  // namespace moelab
