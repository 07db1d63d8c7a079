// The cache simulator's policies by name, with the descriptions --help and docs/cachesim.md show.
#include <fmt/format.h>

#include "analysis/cachesim_types.hpp"
#include "core/error.hpp"

namespace moelab::analysis::cachesim {

std::vector<Policy> all_policies() {
  return {Policy::Lru,          Policy::Lfu,           Policy::LfuAged, Policy::Fifo, Policy::Static,
          Policy::PrefetchPrev, Policy::NextLayerGate, Policy::Belady};
}

std::string policy_name(Policy p) {
  switch (p) {
    case Policy::Lru: return "lru";
    case Policy::Lfu: return "lfu";
    case Policy::LfuAged: return "lfu-aged";
    case Policy::Fifo: return "fifo";
    case Policy::Static: return "static";
    case Policy::Belady: return "belady";
    case Policy::PrefetchPrev: return "prefetch-prev";
    case Policy::NextLayerGate: return "next-layer-gate";
  }
  return "?";
}

Policy parse_policy(const std::string& name) {
  for (Policy p : all_policies())
    if (policy_name(p) == name) return p;
  std::string known;
  for (Policy p : all_policies()) known += (known.empty() ? "" : ", ") + policy_name(p);
  throw Error(fmt::format("--policy: unknown policy '{}' (known: {}, or all)", name, known));
}

std::string policy_description(Policy p) {
  switch (p) {
    case Policy::Lru:
      return "the cuda-nf4 engine's own policy object (--gpu-expert-cache): evicts the least recently used expert "
             "not pinned by the current round";
    case Policy::Lfu:
      return "evicts the expert used in the fewest steps so far (counts kept for every expert, resident or not; "
             "ties: least recently used)";
    case Policy::LfuAged:
      return "lfu whose counts are all halved (rounded down) every --lfu-aging steps, so old popularity fades";
    case Policy::Fifo: return "evicts the expert loaded earliest (a hit does not refresh it)";
    case Policy::Static:
      return "keeps, per layer, the C experts chosen most in the calibration part (--calibrate; experts it never "
             "chose are not kept); any other is copied into a staging buffer for its step and never cached";
    case Policy::PrefetchPrev:
      return "lru plus a prefetch, before each layer's step, of the experts that layer needed at the previous step "
             "(the previous token's experts; at most C, lowest ids first); its guesses' precision and recall are "
             "reported";
    case Policy::NextLayerGate:
      return "lru plus a prefetch, before each layer's step, of the experts the trace's next-layer gate guessed for "
             "it (layer l's router on layer l-1's output: `moelab trace --record-prefetch-guess`; at most C, lowest "
             "ids first; layer 0 has no guess); its guesses' precision and recall are reported";
    case Policy::Belady:
      return "Belady's MIN, the offline optimum: after each step keeps the C experts (of those held and those just "
             "used) whose next use comes soonest; no policy copies fewer experts, and none that copies only on demand hits "
             "more often";
  }
  return "";
}

bool is_prefetch_policy(Policy p) { return p == Policy::PrefetchPrev || p == Policy::NextLayerGate; }
bool needs_prefetch_guess(Policy p) { return p == Policy::NextLayerGate; }
bool is_bypass_policy(Policy p) { return p == Policy::Static || p == Policy::Belady; }

}  // namespace moelab::analysis::cachesim
