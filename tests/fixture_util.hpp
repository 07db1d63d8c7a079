#pragma once
// Helpers for tests that read the committed fixtures (tests/fixtures, made by scripts/make_fixtures.py).
#include <Eigen/Core>
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/engine.hpp"
#include "core/safetensors.hpp"

namespace moelab::test {

inline std::string fixture(const std::string& rel) { return std::string(MOELAB_FIXTURES) + "/" + rel; }
inline std::string model_dir(const std::string& name) { return fixture("models/" + name); }

using MatrixRD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

inline MatrixRF read_matrix_f32(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.info(name);
  const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
  MatrixRF m(rows, t.numel() / rows);
  f.read_f32(t, 0, t.numel(), m.data());
  return m;
}

inline MatrixRD read_matrix_f64(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.info(name);
  if (t.dtype != DType::F64) throw std::runtime_error(name + " is not F64");
  const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
  MatrixRD m(rows, t.numel() / rows);
  std::memcpy(m.data(), f.bytes(t).data(), size_t(t.nbytes()));
  return m;
}

inline std::vector<int32_t> read_i32(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.info(name);
  std::vector<int32_t> v(size_t(t.numel()));
  std::memcpy(v.data(), f.bytes(t).data(), size_t(t.nbytes()));
  return v;
}

// ||a - b|| / ||b||, the relative L2 error of a against the reference b.
template <typename A, typename B>
double rel_l2(const A& a, const B& b) {
  const auto bd = b.template cast<double>();
  return (a.template cast<double>() - bd).norm() / bd.norm();
}

// The fixture models every engine test runs on (tests/fixtures/models; mixtral-4e-bnb-nf4 has its own
// tests), and a gtest name for each (identifier characters only).
#define MOELAB_FIXTURE_MODELS \
  ::testing::Values("mixtral-4e-gqa-f32", "mixtral-8e-bf16-sharded", "mixtral-top1-swa", "mistral-dense")

inline std::string fixture_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = info.param;
  for (auto& ch : n)
    if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
}

}  // namespace moelab::test
