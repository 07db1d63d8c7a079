// cuda-nf4 engine: the public methods and the decoder-layer loop (construction is in engine_load.cpp,
// the MoE stage in moe_stage.cpp; the arithmetic is in the kernels).
#include "optimized/cuda/engine.hpp"

#include "optimized/cuda/attention.hpp"
#include "optimized/cuda/engine_impl.hpp"
#include "optimized/cuda/layer_kernels.hpp"
#include "optimized/cuda/prefill_tiles.hpp"

namespace moelab::cuda {

Act CudaNf4Engine::Impl::stage(const float* x, int64_t count, Grow<uint16_t>& buf) {
  if (options.activations == ActType::f32) return {x, ActType::f32};
  uint16_t* out = buf.get(size_t(count));
  convert_activations(x, count, out, ActType::bf16, stream);
  return {out, ActType::bf16};
}

void CudaNf4Engine::Impl::linear(Act x, int n, const DeviceMatrix& w, float* y, int64_t ldy) {
  if (n <= kMaxGemvTokens) {
    const int64_t row_bytes = w.cols * act_bytes(x.type);
    for (int t = 0; t < n; ++t)
      nf4_gemv(w.codes, w.absmax, w.rows, w.cols, static_cast<const uint8_t*>(x.data) + t * row_bytes, x.type,
               y + t * ldy, stream);
    return;
  }
  const float one = 1.0f, zero = 0.0f;
  for (const RowBand& b : plan_row_bands(w.rows, w.cols, scratch_elems)) {
    nf4_dequantize_rows(w.codes, w.absmax, b.row_begin, b.rows, w.cols, scratch, x.type, stream);
    // Column-major view: Y^T[rows_b, n] = band[cols, rows_b]^T * X^T[cols, n].
    if (x.type == ActType::bf16) {
      MOELAB_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(b.rows), n, int(w.cols), &one, scratch,
                                       CUDA_R_16BF, int(w.cols), x.data, CUDA_R_16BF, int(w.cols), &zero,
                                       y + b.row_begin, CUDA_R_32F, int(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
      MOELAB_CUBLAS_CHECK(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(b.rows), n, int(w.cols), &one,
                                      static_cast<const float*>(scratch), int(w.cols),
                                      static_cast<const float*>(x.data), int(w.cols), &zero, y + b.row_begin, int(ldy)));
    }
  }
}

void CudaNf4Engine::Impl::add_lora(const DeviceLora& lora, const float* x, int n, float* y, int64_t ldy) {
  if (!lora.a || n == 0) return;
  float* t = lora_t.get(size_t(n) * size_t(lora.rank));
  const float one = 1.0f, zero = 0.0f;
  // Column-major views of the row-major matrices: T^T[rank, n] = A[in, rank]^T * X^T[in, n], then
  // Y^T[out, n] += scale * B[rank, out]^T * T^T[rank, n]. Two SGEMMs at any n (decode too): the factors
  // are small beside the NF4 weight, and one code path keeps decode and prefill the same arithmetic.
  MOELAB_CUBLAS_CHECK(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, lora.rank, n, int(lora.in), &one, lora.a,
                                  int(lora.in), x, int(lora.in), &zero, t, lora.rank));
  MOELAB_CUBLAS_CHECK(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(lora.out), n, lora.rank, &lora.scale, lora.b,
                                  lora.rank, t, lora.rank, &one, y, int(ldy)));
}

MatrixRF CudaNf4Engine::Impl::to_host(const float* d, int rows, int cols) const {
  MatrixRF m(rows, cols);
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(m.data(), d, size_t(rows) * cols * sizeof(float), cudaMemcpyDeviceToHost, stream));
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream));
  return m;
}

CudaNf4Engine::CudaNf4Engine(const ModelConfig& config, const Checkpoint* ck, EngineOptions options, uint64_t seed)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = config;
  m.options = options;
  m.max_context = options.max_context > 0 ? options.max_context : std::min(config.max_position_embeddings, 4096);
  if (m.max_context > config.max_position_embeddings)
    throw Error(fmt::format("context {} exceeds the model's max_position_embeddings {} ({})", m.max_context,
                            config.max_position_embeddings, config.source));
  if (options.gpu_expert_cache < 0)
    throw Error(fmt::format("--gpu-expert-cache {}: must be 0 (all experts on the GPU) or a count of experts per layer",
                            options.gpu_expert_cache));
  if (options.gpu_expert_cache > 0 && options.gpu_expert_cache < config.top_k)
    throw Error(fmt::format("--gpu-expert-cache {}: fewer slots than the {} experts each token uses ({})",
                            options.gpu_expert_cache, config.top_k, config.source));
  if (options.adapter && !ck) throw Error("cuda-nf4: a LoRA adapter needs a checkpoint's weights; a synthetic model has none");
  m.init_device(options.device);
  m.load_weights(ck, seed);
  if (options.adapter) m.load_adapter(*options.adapter);
}

CudaNf4Engine::CudaNf4Engine(const Checkpoint& ck, EngineOptions options) : CudaNf4Engine(ck.config(), &ck, options, 0) {}

std::unique_ptr<CudaNf4Engine> CudaNf4Engine::synthetic(const ModelConfig& config, EngineOptions options, uint64_t seed) {
  return std::unique_ptr<CudaNf4Engine>(new CudaNf4Engine(config, nullptr, options, seed));
}

CudaNf4Engine::~CudaNf4Engine() = default;

const ModelConfig& CudaNf4Engine::config() const { return impl_->cfg; }
int CudaNf4Engine::position() const { return impl_->pos; }
int CudaNf4Engine::max_context() const { return impl_->max_context; }
void CudaNf4Engine::reset() { impl_->pos = 0; }
void CudaNf4Engine::truncate(int position) {
  if (position < 0 || position > impl_->pos)
    throw Error(fmt::format("truncate({}) outside the {} cached tokens", position, impl_->pos));
  impl_->pos = position;  // rows past it are overwritten by the next forward
}
int64_t CudaNf4Engine::device_bytes() const {
  return impl_->arena_bytes + impl_->experts->device_bytes() + impl_->other_bytes;
}
int64_t CudaNf4Engine::pinned_host_bytes() const { return impl_->experts->pinned_host_bytes(); }
double CudaNf4Engine::load_seconds() const { return impl_->load_seconds; }
std::optional<CacheStats> CudaNf4Engine::expert_cache_stats() const { return impl_->experts->stats(); }
void CudaNf4Engine::synchronize() { MOELAB_CUDA_CHECK(cudaStreamSynchronize(impl_->stream)); }

void CudaNf4Engine::moe_layer(int layer, const float* x, int n, float* out) {
  if (layer < 0 || layer >= impl_->cfg.num_layers) throw Error(fmt::format("moe_layer: no layer {}", layer));
  std::vector<int32_t> chosen(size_t(n) * impl_->cfg.top_k, 0);
  impl_->moe_stage(layer, x, n, out, chosen);
}

MatrixRF CudaNf4Engine::forward(std::span<const int32_t> tokens, Probe* probe) {
  Impl& m = *impl_;
  const ModelConfig& cfg = m.cfg;
  const int n = int(tokens.size());
  if (n == 0) throw Error("forward: no tokens");
  if (m.pos + n > m.max_context)
    throw Error(fmt::format("context overflow: {} cached + {} new tokens exceed the context of {} tokens "
                            "this engine was built for (see --context)", m.pos, n, m.max_context));
  for (int32_t t : tokens)
    if (t < 0 || t >= cfg.vocab_size)
      throw Error(fmt::format("token id {} outside the vocabulary of {} ({})", t, cfg.vocab_size, cfg.source));
  const int H = cfg.hidden_size, E = cfg.num_experts, K = cfg.top_k;
  const int qd = cfg.num_heads * cfg.head_dim, kvd = cfg.num_kv_heads * cfg.head_dim;
  cudaStream_t s = m.stream;

  int32_t* d_tok = m.d_tokens.get(size_t(n));
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(d_tok, tokens.data(), size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  float* h = m.h.get(size_t(n) * H);
  float* x = m.x.get(size_t(n) * H);
  float* q = m.q.get(size_t(n) * qd);
  float* k = m.k.get(size_t(n) * kvd);
  float* v = m.v.get(size_t(n) * kvd);
  float* att = m.att.get(size_t(n) * qd);
  float* tmp = m.tmp.get(size_t(n) * H);
  const int64_t attn_work_floats =
      attention_workspace_floats(n, m.pos, cfg.sliding_window, cfg.num_heads, cfg.head_dim, m.sm_count);
  float* attn_work = m.attn_work.get(size_t(std::max<int64_t>(attn_work_floats, 1)));

  embed(m.embedding, d_tok, n, H, h, s);
  std::vector<int32_t> host_chosen(size_t(n) * K, 0);
  for (int l = 0; l < cfg.num_layers; ++l) {
    const Layer& w = m.layers[size_t(l)];
    rms_norm(h, w.attn_norm, n, H, float(cfg.rms_norm_eps), x, s);
    const Act xa = m.stage(x, int64_t(n) * H, m.stage_x);
    m.linear(xa, n, w.wq, q, qd);
    m.linear(xa, n, w.wk, k, kvd);
    m.linear(xa, n, w.wv, v, kvd);
    m.add_lora(w.wq_lora, x, n, q, qd);  // on the FP32 x, as cpu-nf4 applies them
    m.add_lora(w.wk_lora, x, n, k, kvd);
    m.add_lora(w.wv_lora, x, n, v, kvd);
    rope(q, n, cfg.num_heads, cfg.head_dim, m.pos, m.inv_freq, s);
    rope(k, n, cfg.num_kv_heads, cfg.head_dim, m.pos, m.inv_freq, s);
    const size_t row_bytes = size_t(kvd) * sizeof(float);
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(m.k_cache[size_t(l)] + int64_t(m.pos) * kvd, k, n * row_bytes,
                                      cudaMemcpyDeviceToDevice, s));
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(m.v_cache[size_t(l)] + int64_t(m.pos) * kvd, v, n * row_bytes,
                                      cudaMemcpyDeviceToDevice, s));
    attention(q, m.k_cache[size_t(l)], m.v_cache[size_t(l)], n, m.pos, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
              cfg.sliding_window, att, attn_work, attn_work_floats, m.sm_count, s);
    m.linear(m.stage(att, int64_t(n) * qd, m.stage_att), n, w.wo, tmp, H);
    m.add_lora(w.wo_lora, att, n, tmp, H);
    add_inplace(h, tmp, int64_t(n) * H, s);

    rms_norm(h, w.ffn_norm, n, H, float(cfg.rms_norm_eps), x, s);
    m.moe_stage(l, x, n, h, host_chosen);
    if (probe) {
      LayerObservation obs;
      obs.layer = l;
      const MatrixRF hidden = m.to_host(h, n, H);
      MatrixRF router_logits;
      MatrixRI experts(n, K);
      std::copy(host_chosen.begin(), host_chosen.end(), experts.data());
      if (cfg.is_moe()) router_logits = m.to_host(m.rlogits.ptr, n, E);
      const MatrixRF gate_m = m.to_host(m.gates.ptr, n, K);
      obs.hidden = &hidden;
      obs.router_logits = cfg.is_moe() ? &router_logits : nullptr;
      obs.experts = &experts;
      obs.gates = &gate_m;
      probe->on_layer(obs);
    }
  }
  m.pos += n;
  rms_norm(h, m.final_norm, n, H, float(cfg.rms_norm_eps), x, s);
  float* logits = m.logits.get(size_t(n) * cfg.vocab_size);
  const float one = 1.0f, zero = 0.0f;
  // lm_head stays FP32 (cuBLAS SGEMM): ~7% of the bytes a Mixtral decode step reads; BF16 would halve that.
  MOELAB_CUBLAS_CHECK(cublasSgemm(m.blas, CUBLAS_OP_T, CUBLAS_OP_N, cfg.vocab_size, n, H, &one, m.lm_head, H, x, H,
                                  &zero, logits, cfg.vocab_size));
  MatrixRF out = m.to_host(logits, n, cfg.vocab_size);
  if (probe) probe->on_logits(out, 0.0);
  return out;
}

}  // namespace moelab::cuda
