#include "evals/generate_until.hpp"

#include "core/error.hpp"
#include "evals/extract.hpp"

namespace moelab::evals {

Generation generate_until(Engine& engine, const TextCodec& codec, const std::string& context,
                          const GenerateOptions& opts, Sampler& sampler) {
  const int max_ctx = engine.max_context() - opts.max_gen_toks;
  if (max_ctx < 1) throw Error("generation: max_gen_toks leaves no room for the context");
  Tokens ctx = codec.encode(context);
  if (int(ctx.size()) > max_ctx) ctx.erase(ctx.begin(), ctx.end() - max_ctx);
  Generation g;
  g.context_tokens = int(ctx.size());
  engine.reset();
  MatrixRF logits = engine.forward_tail(ctx, int(ctx.size()) - 1);
  for (int i = 0; i < opts.max_gen_toks; ++i) {
    const auto last = logits.row(logits.rows() - 1);
    const int32_t next = sampler.sample(std::span<const float>(last.data(), size_t(last.size())));
    if (next == codec.eos_token) break;
    g.tokens.push_back(next);
    const std::string text = codec.decode(g.tokens);
    if (cut_at_stops(text, opts.until).size() < text.size()) break;
    if (i + 1 < opts.max_gen_toks && engine.position() < engine.max_context())
      logits = engine.forward(std::span<const int32_t>(&next, 1));
    else
      break;
  }
  g.text = cut_at_stops(codec.decode(g.tokens), opts.until);
  return g;
}

}  // namespace moelab::evals
