// libFuzzer harness: a safetensors file (header validation on open, then every tensor's bytes, its FP32
// conversion for float dtypes and the finite-value scan). Bad files must be a moelab::Error.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/safetensors.hpp"
#include "tests/fuzz/fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = moelab::fuzz::write_temp("input.safetensors", data, size);
  moelab::fuzz::expect_only_moelab_errors([&] {
    moelab::SafetensorsFile f(path);
    (void)f.metadata();
    std::vector<float> buf;
    for (const auto& entry : f.tensors()) {  // (clang 14 lambdas cannot capture structured bindings)
      const std::string& name = entry.first;
      const moelab::TensorInfo& t = entry.second;
      const auto bytes = f.bytes(t);
      if (bytes.size() != t.nbytes()) __builtin_trap();
      (void)moelab::shape_str(t.shape);
      (void)moelab::printable(name);
      const int64_t n = t.numel();
      // Float dtypes convert; others throw moelab::Error. Bounded: at most 4096 elements per tensor.
      const int64_t count = n < 4096 ? n : 4096;
      buf.assign(static_cast<size_t>(count > 0 ? count : 0), 0.f);
      moelab::fuzz::expect_only_moelab_errors([&] { f.read_f32(t, 0, count, buf.data(), true); });
      moelab::fuzz::expect_only_moelab_errors([&] { (void)f.check_finite(t); });
    }
  });
  return 0;
}
