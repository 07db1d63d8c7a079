#pragma once
// Where cuda-nf4 keeps the experts' NF4 weights, and the expert offloading of `--gpu-expert-cache N`.
//
// Every expert is one block of `expert_bytes` (its w1, w3 and w2 in the layout `expert_layout` gives).
// Resident mode (capacity 0 or >= experts): all blocks on the device, nothing moves. Offloaded mode:
// all blocks in pinned host memory and N device slots per layer; before a layer's expert stage the
// engine acquires the experts its router chose, the ExpertCachePolicy picks slots, and each miss is a
// cudaMemcpyAsync on a side stream (the copy stream) whose completion the compute stream waits for
// with an event -- the host never blocks on a copy. A slot is overwritten only after the compute
// stream has finished the previous step that read it (a per-layer event recorded at release). The
// engine can also prefetch a layer's likely experts while an earlier layer computes.
#include <cuda_runtime.h>

#include <optional>
#include <span>
#include <vector>

#include "optimized/cuda/expert_cache_policy.hpp"
#include "optimized/cuda/weight_arena.hpp"

namespace moelab::cuda {

class ExpertStore {
 public:
  // expert_layout: one expert's three NF4 matrices (w1, w3, w2). capacity: slots per layer (0 or
  // >= experts: resident). Allocates the device blocks (and the pinned host store when offloaded).
  ExpertStore(WeightArena expert_layout, int layers, int experts, int capacity, cudaStream_t compute);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  bool offloaded() const { return offloaded_; }
  const WeightArena& layout() const { return layout_; }
  int64_t expert_bytes() const { return stride_; }
  int slots_per_layer() const { return offloaded_ ? capacity_ : experts_; }
  int64_t device_bytes() const;
  int64_t pinned_host_bytes() const;

  // Where expert (layer, e)'s block is written at load time: device memory when resident, pinned host
  // memory when offloaded (see home_is_device()).
  uint8_t* home(int layer, int expert);
  bool home_is_device() const { return !offloaded_; }

  // Makes `experts` (distinct, at most slots_per_layer()) usable by the compute stream and returns
  // their device blocks in the same order. Offloaded: issues the misses' copies on the copy stream and
  // makes the compute stream wait for every slot's last copy.
  std::vector<const uint8_t*> acquire(int layer, std::span<const int> experts);
  // The compute stream's work on this layer's acquired experts is queued: later copies into the layer's
  // slots wait for it. Ends the step's pins.
  void release(int layer);
  // Offloaded only (a no-op otherwise): copies the `count` most probable experts of `probs` into the
  // layer's slots ahead of its step.
  void prefetch(int layer, std::span<const float> probs, int count);

  std::optional<CacheStats> stats() const;  // empty when resident

 private:
  uint8_t* slot_block(int layer, int slot) const { return device_ + (int64_t(layer) * capacity_ + slot) * stride_; }
  void copy_into_slot(int layer, const SlotRequest& r);

  WeightArena layout_;
  int layers_, experts_, capacity_;
  bool offloaded_;
  int64_t stride_;  // one expert block, rounded up to the arena alignment
  cudaStream_t compute_ = nullptr, copy_ = nullptr;
  uint8_t* device_ = nullptr;  // resident: [layers * experts] blocks; offloaded: [layers * capacity] slots
  uint8_t* host_ = nullptr;    // offloaded: pinned [layers * experts] blocks
  std::vector<cudaEvent_t> slot_ready_;  // offloaded: last copy into each slot done
  std::vector<cudaEvent_t> layer_free_;  // offloaded: compute work on the layer's slots done
  std::optional<ExpertCachePolicy> policy_;
};

}  // namespace moelab::cuda
