#include "optimized/cuda/expert_store.hpp"

#include <fmt/format.h>

#include "core/error.hpp"
#include "optimized/cuda/check.hpp"

namespace moelab::cuda {

ExpertStore::ExpertStore(WeightArena expert_layout, int layers, int experts, int capacity, cudaStream_t compute)
    : layout_(std::move(expert_layout)),
      layers_(layers),
      experts_(experts),
      capacity_(capacity),
      offloaded_(capacity > 0 && capacity < experts),
      stride_(align_up(layout_.bytes(), kArenaAlign)),
      compute_(compute) {
  if (capacity < 0) throw Error(fmt::format("--gpu-expert-cache {}: must be >= 0", capacity));
  const int64_t blocks = int64_t(layers) * (offloaded_ ? capacity_ : experts_);
  const size_t device_bytes = size_t(blocks * stride_);
  const cudaError_t err = cudaMalloc(&device_, device_bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free allocation error
    throw Error(fmt::format("cuda-nf4: cannot allocate {:.1f} GiB of device memory for the experts ({}){}",
                            double(device_bytes) / double(1ull << 30), cudaGetErrorString(err),
                            offloaded_ ? "" : "; --gpu-expert-cache N keeps only N experts per layer on the GPU"));
  }
  if (!offloaded_) return;
  policy_.emplace(layers, experts, capacity, stride_);
  const size_t host_bytes = size_t(int64_t(layers) * experts * stride_);
  MOELAB_CUDA_CHECK(cudaHostAlloc(&host_, host_bytes, cudaHostAllocDefault));
  MOELAB_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking));
  slot_ready_.resize(size_t(layers) * capacity_);
  layer_free_.resize(size_t(layers));
  for (auto& e : slot_ready_) MOELAB_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  for (auto& e : layer_free_) MOELAB_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
}

ExpertStore::~ExpertStore() {
  if (copy_) cudaStreamSynchronize(copy_);
  for (auto e : slot_ready_) cudaEventDestroy(e);
  for (auto e : layer_free_) cudaEventDestroy(e);
  if (copy_) cudaStreamDestroy(copy_);
  if (host_) cudaFreeHost(host_);
  if (device_) cudaFree(device_);
}

int64_t ExpertStore::device_bytes() const { return int64_t(layers_) * slots_per_layer() * stride_; }
int64_t ExpertStore::pinned_host_bytes() const { return offloaded_ ? int64_t(layers_) * experts_ * stride_ : 0; }

uint8_t* ExpertStore::home(int layer, int expert) {
  const int64_t block = int64_t(layer) * experts_ + expert;
  return (offloaded_ ? host_ : device_) + block * stride_;
}

void ExpertStore::copy_into_slot(int layer, const SlotRequest& r) {
  // Never overwrite a slot the compute stream may still be reading (an earlier step of this layer).
  MOELAB_CUDA_CHECK(cudaStreamWaitEvent(copy_, layer_free_[size_t(layer)], 0));
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(slot_block(layer, r.slot), home(layer, r.expert), size_t(stride_),
                                    cudaMemcpyHostToDevice, copy_));
  MOELAB_CUDA_CHECK(cudaEventRecord(slot_ready_[size_t(layer) * capacity_ + r.slot], copy_));
}

std::vector<const uint8_t*> ExpertStore::acquire(int layer, std::span<const int> experts) {
  std::vector<const uint8_t*> blocks;
  if (!offloaded_) {
    for (int e : experts) blocks.push_back(home(layer, e));
    return blocks;
  }
  for (const SlotRequest& r : policy_->acquire(layer, experts)) {
    if (r.copy) copy_into_slot(layer, r);
    // Waiting on an event whose copy finished long ago (a hit) costs nothing; one never recorded is a no-op.
    MOELAB_CUDA_CHECK(cudaStreamWaitEvent(compute_, slot_ready_[size_t(layer) * capacity_ + r.slot], 0));
    blocks.push_back(slot_block(layer, r.slot));
  }
  return blocks;
}

void ExpertStore::release(int layer) {
  if (!offloaded_) return;
  MOELAB_CUDA_CHECK(cudaEventRecord(layer_free_[size_t(layer)], compute_));
  policy_->end_step(layer);
}

void ExpertStore::prefetch(int layer, std::span<const float> probs, int count) {
  if (!offloaded_) return;
  for (const SlotRequest& r : policy_->prefetch(layer, probs, count)) copy_into_slot(layer, r);
}

std::optional<CacheStats> ExpertStore::stats() const {
  if (!offloaded_) return std::nullopt;
  return policy_->stats();
}

}  // namespace moelab::cuda
