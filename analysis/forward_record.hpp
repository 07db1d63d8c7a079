#pragma once
// Everything one forward pass exposes, per the shared naming scheme: logits and, per layer, the
// output hidden state, router logits, chosen experts and gates. Recorded from any engine through a
// Probe, written as / read from the forward dump (safetensors) that `moelab forward` and the fixture
// script produce, and compared by the diff.
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/engine.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"

namespace moelab::analysis {

struct LayerRecord {
  MatrixRF hidden;                       // [n, hidden]  layers.<i>.hidden
  std::optional<MatrixRF> router_logits; // [n, experts] layers.<i>.router_logits (MoE only)
  MatrixRI experts;                      // [n, k]       layers.<i>.experts, rank order
  MatrixRF gates;                        // [n, k]       layers.<i>.gates
};

struct ForwardRecord {
  std::vector<int32_t> tokens;
  MatrixRF logits;  // [n, vocab]
  std::vector<LayerRecord> layers;

  // Runs engine->forward(tokens) from an empty cache and records every layer.
  static ForwardRecord run(Engine& engine, std::span<const int32_t> tokens);
  // Reads a forward dump; throws moelab::Error naming the file and the missing or malformed tensor.
  static ForwardRecord from_dump(const std::string& path);
  std::vector<TensorToWrite> to_tensors() const;
};

}  // namespace moelab::analysis
