#include "analysis/forward_record.hpp"

#include <fmt/format.h>

#include <cstring>

#include "core/error.hpp"

namespace moelab::analysis {
namespace {

class Recorder : public Probe {
 public:
  explicit Recorder(ForwardRecord& r) : r_(r) {}
  void on_layer(const LayerObservation& o) override {
    if (size_t(o.layer) >= r_.layers.size()) r_.layers.resize(size_t(o.layer) + 1);
    auto& l = r_.layers[size_t(o.layer)];
    l.hidden = *o.hidden;
    if (o.router_logits) l.router_logits = *o.router_logits;
    l.experts = *o.experts;
    l.gates = *o.gates;
  }

 private:
  ForwardRecord& r_;
};

MatrixRF read_f32_matrix(const SafetensorsFile& f, const std::string& name, int64_t rows) {
  const auto& t = f.info(name);
  if (t.shape.size() != 2 || t.shape[0] != rows)
    throw Error(fmt::format("{}: tensor '{}' has shape {}, expected [{}, ...]", f.path(), name, shape_str(t.shape), rows));
  MatrixRF m(t.shape[0], t.shape[1]);
  f.read_f32(t, 0, t.numel(), m.data());
  return m;
}

std::vector<int32_t> read_i32(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.info(name);
  if (t.dtype != DType::I32) throw Error(fmt::format("{}: tensor '{}' is {}, expected I32", f.path(), name, dtype_name(t.dtype)));
  std::vector<int32_t> v(size_t(t.numel()));
  std::memcpy(v.data(), f.bytes(t).data(), v.size() * sizeof(int32_t));
  return v;
}

}  // namespace

ForwardRecord ForwardRecord::run(Engine& engine, std::span<const int32_t> tokens) {
  ForwardRecord r;
  r.tokens.assign(tokens.begin(), tokens.end());
  Recorder probe(r);
  engine.reset();
  r.logits = engine.forward(tokens, &probe);
  return r;
}

ForwardRecord ForwardRecord::from_dump(const std::string& path) {
  const SafetensorsFile f(path);
  ForwardRecord r;
  if (!f.contains("tokens")) throw Error(fmt::format("{}: not a forward dump (no 'tokens' tensor)", path));
  r.tokens = read_i32(f, "tokens");
  const int64_t n = int64_t(r.tokens.size());
  if (!f.contains("logits")) throw Error(fmt::format("{}: not a forward dump (no 'logits' tensor)", path));
  r.logits = read_f32_matrix(f, "logits", n);
  for (int l = 0;; ++l) {
    const auto p = fmt::format("layers.{}.", l);
    if (!f.contains(p + "hidden")) break;
    LayerRecord rec;
    rec.hidden = read_f32_matrix(f, p + "hidden", n);
    if (f.contains(p + "router_logits")) rec.router_logits = read_f32_matrix(f, p + "router_logits", n);
    if (!f.contains(p + "experts") || !f.contains(p + "gates"))
      throw Error(fmt::format("{}: layer {} has no experts/gates tensors", path, l));
    const auto experts = read_i32(f, p + "experts");
    rec.gates = read_f32_matrix(f, p + "gates", n);
    if (int64_t(experts.size()) != rec.gates.size())
      throw Error(fmt::format("{}: '{}experts' and '{}gates' differ in size", path, p, p));
    rec.experts = Eigen::Map<const MatrixRI>(experts.data(), rec.gates.rows(), rec.gates.cols());
    r.layers.push_back(std::move(rec));
  }
  return r;
}

std::vector<TensorToWrite> ForwardRecord::to_tensors() const {
  std::vector<TensorToWrite> t;
  auto add = [&](const std::string& name, const MatrixRF& m) {
    t.push_back(make_f32_tensor(name, {m.rows(), m.cols()}, m.data()));
  };
  t.push_back(make_i32_tensor("tokens", {int64_t(tokens.size())}, tokens.data()));
  add("logits", logits);
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto p = fmt::format("layers.{}.", l);
    const auto& rec = layers[l];
    add(p + "hidden", rec.hidden);
    if (rec.router_logits) add(p + "router_logits", *rec.router_logits);
    t.push_back(make_i32_tensor(p + "experts", {rec.experts.rows(), rec.experts.cols()}, rec.experts.data()));
    add(p + "gates", rec.gates);
  }
  return t;
}

}  // namespace moelab::analysis
