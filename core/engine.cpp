#include "core/engine.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace moelab {

void Engine::check_tail(size_t n, int first) {
  if (first < 0 || size_t(first) >= n)
    throw Error(fmt::format("forward_tail: first logits row {} outside the {} tokens of the call", first, n));
}

}  // namespace moelab
