// The MoE stage of a cuda-nf4 layer: router, fused softmax + top-k, tokens grouped by expert on the
// host (one small synchronizing copy of the choices per layer: the one host sync of a layer), the
// experts' SwiGLU MLPs over their tokens in rounds of as many experts as the layer has GPU slots, and
// the gated combine.
#include <algorithm>
#include <cmath>

#include "optimized/cuda/engine_impl.hpp"
#include "optimized/cuda/expert_grouping.hpp"
#include "optimized/cuda/layer_kernels.hpp"
#include "optimized/cuda/random_fill.hpp"

namespace moelab::cuda {
namespace {

// The mean over tokens of softmax(router logits): which experts the next layer is likely to want.
std::vector<float> mean_router_probs(const std::vector<float>& logits, int n, int experts) {
  std::vector<float> mean(size_t(experts), 0.0f);
  for (int t = 0; t < n; ++t) {
    const float* l = logits.data() + size_t(t) * experts;
    const float mx = *std::max_element(l, l + experts);
    std::vector<double> p(static_cast<size_t>(experts));
    double sum = 0;
    for (int e = 0; e < experts; ++e) sum += (p[size_t(e)] = std::exp(double(l[e] - mx)));
    for (int e = 0; e < experts; ++e) mean[size_t(e)] += float(p[size_t(e)] / sum / n);
  }
  return mean;
}

}  // namespace

void CudaNf4Engine::Impl::moe_stage(int l, const float* x, int n, float* h, std::vector<int32_t>& host_chosen) {
  const int H = cfg.hidden_size, I = cfg.intermediate_size, E = cfg.num_experts, K = cfg.top_k;
  cudaStream_t s = stream;
  float* rl = rlogits.get(size_t(n) * E);
  float* g = gates.get(size_t(n) * K);
  int32_t* chosen = d_chosen.get(size_t(n) * K);
  const Act xa = this->stage(x, int64_t(n) * H, stage_x);

  // Prefetch: the next layer's router applied to this layer's input predicts its choices well (the
  // residual stream changes little per layer), early enough for the copies to overlap this layer.
  const bool prefetch = options.prefetch_experts && experts->offloaded() && cfg.is_moe() && l + 1 < cfg.num_layers;
  std::vector<float> next_logits(prefetch ? size_t(n) * E : 0);
  host_chosen.assign(size_t(n) * K, 0);
  if (cfg.is_moe()) {
    linear(xa, n, layers[size_t(l)].router, rl, E);
    add_lora(layers[size_t(l)].router_lora, x, n, rl, E);
    router_topk(rl, n, E, K, chosen, g, s);
    if (prefetch) {
      float* rn = rlogits_next.get(size_t(n) * E);
      linear(xa, n, layers[size_t(l) + 1].router, rn, E);
      add_lora(layers[size_t(l) + 1].router_lora, x, n, rn, E);  // the router the next layer will run
      MOELAB_CUDA_CHECK(cudaMemcpyAsync(next_logits.data(), rn, next_logits.size() * sizeof(float),
                                        cudaMemcpyDeviceToHost, s));
    }
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(host_chosen.data(), chosen, host_chosen.size() * sizeof(int32_t),
                                      cudaMemcpyDeviceToHost, s));
    MOELAB_CUDA_CHECK(cudaStreamSynchronize(s));  // grouping needs the choices on the host
  } else {
    fill_constant(g, int64_t(n) * K, 1.0f, s);  // a dense MLP: one "expert", gate 1
  }

  // The grouping's index maps go up from this layer's slice of pinned memory: an asynchronous copy that
  // nothing overwrites before the stream has run it (the slice is reused only in the next forward call,
  // after this one's final synchronization).
  // MoE layers synchronized above; a dense one must wait here before its slice is rewritten by a second
  // moe_layer() call on the same layer (forward() reuses a slice only after its final synchronization).
  if (!cfg.is_moe()) MOELAB_CUDA_CHECK(cudaStreamSynchronize(s));
  const ExpertGroups groups = group_by_expert(host_chosen, K, E);
  const size_t rows = size_t(n) * K;
  int32_t* pinned = group_index.get(size_t(cfg.num_layers) * 2 * rows, s) + size_t(l) * 2 * rows;
  std::copy(groups.token.begin(), groups.token.end(), pinned);
  std::copy(groups.row_of.begin(), groups.row_of.end(), pinned + rows);
  int32_t* token_of_row = d_token_of_row.get(rows);
  int32_t* row_of = d_row_of.get(rows);
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(token_of_row, pinned, rows * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(row_of, pinned + rows, rows * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  float* ey_all = ey.get(size_t(n) * K * H);
  float* gxb = gx.get(size_t(n) * H);
  float* gub = gu.get(size_t(n) * 2 * I);
  float* actb = act.get(size_t(n) * I);

  std::vector<int> used;
  for (int e = 0; e < E; ++e)
    if (groups.count(e) > 0) used.push_back(e);
  const size_t per_round = size_t(experts->slots_per_layer());
  const WeightArena& layout = experts->layout();
  const std::vector<std::array<DeviceLora, 3>>& lora = layers[size_t(l)].expert_lora;  // empty: no adapter
  for (size_t r0 = 0; r0 < used.size(); r0 += per_round) {
    const std::span<const int> round(used.data() + r0, std::min(per_round, used.size() - r0));
    const std::vector<const uint8_t*> blocks = experts->acquire(l, round);
    // The next layer's prefetch goes on the copy stream after this layer's first misses, never before.
    if (prefetch && r0 == 0) experts->prefetch(l + 1, mean_router_probs(next_logits, n, E), K);
    for (size_t i = 0; i < round.size(); ++i) {
      const int e = round[i], c = groups.count(e);
      const DeviceMatrix w1 = matrix_at(blocks[i], layout.region(0)), w3 = matrix_at(blocks[i], layout.region(1)),
                         w2 = matrix_at(blocks[i], layout.region(2));
      gather_rows(x, token_of_row + groups.offsets[size_t(e)], c, H, gxb, s);
      const Act ga = this->stage(gxb, int64_t(c) * H, stage_gx);
      float* ye = ey_all + int64_t(groups.offsets[size_t(e)]) * H;
      linear(ga, c, w1, gub, 2 * int64_t(I));      // gate projection into the first half of each row
      linear(ga, c, w3, gub + I, 2 * int64_t(I));  // up projection into the second half
      if (!lora.empty()) {  // the expert's own tokens only (gxb: its c gathered rows, FP32)
        add_lora(lora[size_t(e)][0], gxb, c, gub, 2 * int64_t(I));
        add_lora(lora[size_t(e)][1], gxb, c, gub + I, 2 * int64_t(I));
      }
      swiglu(gub, c, I, actb, s);
      linear(this->stage(actb, int64_t(c) * I, stage_act), c, w2, ye, H);
      if (!lora.empty()) add_lora(lora[size_t(e)][2], actb, c, ye, H);
    }
    experts->release(l);
  }
  moe_combine(ey_all, row_of, g, n, K, H, h, s);
}

}  // namespace moelab::cuda
