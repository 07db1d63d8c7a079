// libFuzzer harness: config.json text. A config that parses must give consistent, overflow-free sizes
// (parameter counts, tensor lists, memory estimates); a bad one must be a moelab::Error.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/config.hpp"
#include "tests/fuzz/fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moelab::fuzz::expect_only_moelab_errors([&] {
    const moelab::ModelConfig c = moelab::ModelConfig::from_json_text(text, "fuzz/config.json");
    (void)c.arch_name();
    (void)c.total_params();
    (void)c.active_params();
    (void)c.expert_params();
    (void)c.kv_cache_bytes_per_token(2);
    (void)c.lm_head_name();
    (void)c.router_name(0);
    (void)moelab::memory_estimates(c, 4096);
    const int64_t count = c.expected_tensor_count();
    if (count < 0) __builtin_trap();
    // Listing the tensors is linear in their count (up to ~800k for the largest accepted config):
    // only small ones are listed, and the list must have the count said.
    if (count <= 20000) {
      int64_t seen = 0;
      c.for_each_expected_tensor([&](const moelab::TensorSpec&) { ++seen; });
      if (seen != count) __builtin_trap();
      if (static_cast<int64_t>(c.expected_tensors().size()) != count) __builtin_trap();
      (void)c.nf4_weight_names();
    }
  });
  return 0;
}
