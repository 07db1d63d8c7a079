// cuda-nf4 engine (host code: allocation, upload, the layer loop; the arithmetic is in the kernels).
// First version, stated plainly: FP32 activations; the chosen experts are copied to the host once per
// layer to group tokens (a small synchronizing copy); one expert GEMM at a time.
#include "optimized/cuda/engine.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <omp.h>

#include <cmath>
#include <exception>
#include <map>

#include "core/progress.hpp"
#include "optimized/cpu/quantize.hpp"
#include "optimized/cuda/check.hpp"
#include "optimized/cuda/expert_grouping.hpp"
#include "optimized/cuda/kernels.hpp"
#include "optimized/cuda/layer_kernels.hpp"
#include "optimized/cuda/prefill_tiles.hpp"
#include "optimized/cuda/weight_arena.hpp"

namespace moelab::cuda {
namespace {

#define MOELAB_CUBLAS_CHECK(call)                                                                   \
  do {                                                                                              \
    const cublasStatus_t st_ = (call);                                                              \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                               \
      throw Error(fmt::format("cuda-nf4: {} failed at {}:{}: cuBLAS status {}", #call, __FILE__, __LINE__, int(st_))); \
  } while (0)

struct DeviceMatrix {
  int64_t rows = 0, cols = 0;
  const uint8_t* codes = nullptr;
  const float* absmax = nullptr;
};

struct Layer {
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
  DeviceMatrix wq, wk, wv, wo, router;
  std::vector<std::array<DeviceMatrix, 3>> experts;  // w1 (gate), w3 (up), w2 (down)
};

// A device buffer that grows to the largest request and is reused across forward calls.
template <class T>
struct Grow {
  T* ptr = nullptr;
  size_t cap = 0;
  T* get(size_t n) {
    if (n > cap) {
      if (ptr) MOELAB_CUDA_CHECK(cudaFree(ptr));
      ptr = nullptr;
      MOELAB_CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)));
      cap = n;
    }
    return ptr;
  }
  ~Grow() { if (ptr) cudaFree(ptr); }
};

float* upload_floats(const std::vector<float>& v, std::vector<void*>& owned) {
  void* p = nullptr;
  MOELAB_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(float)));
  owned.push_back(p);
  MOELAB_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
  return static_cast<float*>(p);
}

}  // namespace

struct CudaNf4Engine::Impl {
  ModelConfig cfg;
  int max_context = 0;
  int pos = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  uint8_t* arena = nullptr;
  int64_t arena_bytes = 0;
  std::vector<void*> owned;  // plain allocations (embedding, norms, caches, scratch)
  float* embedding = nullptr;
  float* lm_head = nullptr;  // == embedding when tied
  float* final_norm = nullptr;
  float* inv_freq = nullptr;
  std::vector<float*> k_cache, v_cache;
  float* scratch = nullptr;  // dequantized weight bands for the prefill GEMMs
  int64_t scratch_elems = 0;
  int64_t other_bytes = 0;
  std::vector<Layer> layers;
  Grow<int32_t> d_tokens, d_chosen, d_token_of_row, d_row_of;
  Grow<float> h, x, q, k, v, att, tmp, rlogits, gates, gx, gu, act, ey, logits;

  ~Impl() {
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
    if (arena) cudaFree(arena);
    for (void* p : owned) cudaFree(p);
  }

  float* alloc(int64_t elems) {
    void* p = nullptr;
    MOELAB_CUDA_CHECK(cudaMalloc(&p, size_t(std::max<int64_t>(elems, 1)) * sizeof(float)));
    owned.push_back(p);
    other_bytes += elems * int64_t(sizeof(float));
    return static_cast<float*>(p);
  }

  // y[n, rows] (row stride ldy) = x[n, cols] * W^T.
  void linear(const float* xin, int n, const DeviceMatrix& w, float* y, int64_t ldy) {
    if (n == 1) {
      nf4_gemv(w.codes, w.absmax, w.rows, w.cols, xin, y, stream);
      return;
    }
    const float one = 1.0f, zero = 0.0f;
    for (const RowBand& b : plan_row_bands(w.rows, w.cols, scratch_elems)) {
      nf4_dequantize_rows(w.codes, w.absmax, b.row_begin, b.rows, w.cols, scratch, stream);
      // Column-major view: Y^T[rows_b, n] = band[cols, rows_b]^T * X^T[cols, n].
      MOELAB_CUBLAS_CHECK(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(b.rows), n, int(w.cols), &one, scratch,
                                      int(w.cols), xin, int(w.cols), &zero, y + b.row_begin, int(ldy)));
    }
  }

  MatrixRF to_host(const float* d, int rows, int cols) const {
    MatrixRF m(rows, cols);
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(m.data(), d, size_t(rows) * cols * sizeof(float), cudaMemcpyDeviceToHost, stream));
    MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream));
    return m;
  }
};

CudaNf4Engine::CudaNf4Engine(const Checkpoint& ck, EngineOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0)
    throw Error(std::string("cuda-nf4: no CUDA device found") +
                (err != cudaSuccess ? std::string(" (") + cudaGetErrorString(err) + ")" : std::string()));
  if (options.device < 0 || options.device >= count)
    throw Error(fmt::format("cuda-nf4: device {} requested, {} present", options.device, count));
  MOELAB_CUDA_CHECK(cudaSetDevice(options.device));
  MOELAB_CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  MOELAB_CUBLAS_CHECK(cublasCreate(&m.blas));
  MOELAB_CUBLAS_CHECK(cublasSetStream(m.blas, m.stream));
  // Plain FP32 SGEMM (no TF32): the prefill must agree with the decode GEMV to FP32 rounding.
  MOELAB_CUBLAS_CHECK(cublasSetMathMode(m.blas, CUBLAS_DEFAULT_MATH));

  m.cfg = ck.config();
  const ModelConfig& cfg = m.cfg;
  m.max_context = options.max_context > 0 ? options.max_context : std::min(cfg.max_position_embeddings, 4096);
  if (m.max_context > cfg.max_position_embeddings)
    throw Error(fmt::format("context {} exceeds the model's max_position_embeddings {} ({})", m.max_context,
                            cfg.max_position_embeddings, cfg.source));

  // Layout first (one arena for every NF4 matrix), then quantize and upload one matrix at a time so the
  // host never holds more than one quantized matrix beyond the checkpoint's own map.
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& spec : cfg.expected_tensors()) shapes[spec.name] = spec.shape;
  const auto names = cfg.nf4_weight_names();
  WeightArena layout;
  for (const auto& name : names) layout.add(name, shapes.at(name)[0], shapes.at(name)[1]);
  MOELAB_CUDA_CHECK(cudaMalloc(&m.arena, size_t(layout.bytes())));
  m.arena_bytes = layout.bytes();
  std::vector<DeviceMatrix> mats(names.size());
  Progress progress(cfg.quantization.nf4 ? "uploading NF4 weights" : "quantizing to NF4 and uploading",
                    int64_t(names.size()), options.show_progress);
  // Quantize a batch of matrices on all host threads (Mixtral has 995), then upload the batch: host
  // memory stays bounded by one batch of quantized matrices.
  const size_t batch = size_t(std::max(1, omp_get_max_threads()));
  for (size_t b0 = 0; b0 < names.size(); b0 += batch) {
    const size_t b1 = std::min(names.size(), b0 + batch);
    std::vector<cpu::Nf4Matrix> qs(b1 - b0);
    std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic)
    for (size_t i = b0; i < b1; ++i) {
      try {
        const Nf4Region& r = layout.region(int(i));
        qs[i - b0] = cfg.quantization.nf4 ? cpu::map_prequantized(ck, names[i], r.rows, r.cols)
                                          : cpu::quantize_matrix(ck.read_f32(names[i]), r.rows, r.cols, 64, true);
      } catch (...) {
#pragma omp critical
        if (!failure) failure = std::current_exception();
      }
    }
    if (failure) std::rethrow_exception(failure);
    for (size_t i = b0; i < b1; ++i) {
      const Nf4Region& r = layout.region(int(i));
      const cpu::Nf4Matrix& q = qs[i - b0];
      if (q.blocksize != kNf4Block)
        throw Error(fmt::format("cuda-nf4: {} has NF4 blocksize {}; the kernels are written for 64", names[i],
                                q.blocksize));
      MOELAB_CUDA_CHECK(cudaMemcpy(m.arena + r.codes_offset, q.packed, size_t(r.codes_bytes), cudaMemcpyHostToDevice));
      MOELAB_CUDA_CHECK(cudaMemcpy(m.arena + r.absmax_offset, q.absmax.data(), q.absmax.size() * sizeof(float),
                                   cudaMemcpyHostToDevice));
      mats[i] = {r.rows, r.cols, m.arena + r.codes_offset, reinterpret_cast<const float*>(m.arena + r.absmax_offset)};
      progress.advance();
    }
  }
  progress.finish();

  m.embedding = upload_floats(ck.read_f32("model.embed_tokens.weight"), m.owned);
  m.lm_head = cfg.tie_word_embeddings ? m.embedding : upload_floats(ck.read_f32("lm_head.weight"), m.owned);
  m.final_norm = upload_floats(ck.read_f32("model.norm.weight"), m.owned);
  std::vector<float> inv_freq;  // as the cpu engine and transformers: FP32 powers of rope_theta
  for (int i = 0; i < cfg.head_dim / 2; ++i)
    inv_freq.push_back(1.0f / std::pow(float(cfg.rope_theta), float(2 * i) / float(cfg.head_dim)));
  m.inv_freq = upload_floats(inv_freq, m.owned);

  size_t next = 0;  // nf4_weight_names order per layer: q, k, v, o, router (MoE), experts' w1, w3, w2
  for (int l = 0; l < cfg.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    Layer layer;
    layer.attn_norm = upload_floats(ck.read_f32(p + "input_layernorm.weight"), m.owned);
    layer.ffn_norm = upload_floats(ck.read_f32(p + "post_attention_layernorm.weight"), m.owned);
    layer.wq = mats[next++];
    layer.wk = mats[next++];
    layer.wv = mats[next++];
    layer.wo = mats[next++];
    if (cfg.is_moe()) layer.router = mats[next++];
    for (int e = 0; e < cfg.num_experts; ++e) {
      layer.experts.push_back({mats[next], mats[next + 1], mats[next + 2]});
      next += 3;
    }
    m.layers.push_back(std::move(layer));
    const int64_t kv = int64_t(m.max_context) * cfg.num_kv_heads * cfg.head_dim;
    m.k_cache.push_back(m.alloc(kv));
    m.v_cache.push_back(m.alloc(kv));
  }
  if (next != mats.size()) throw Error("cuda-nf4: internal: NF4 weight list does not match the layer structure");
  // Scratch for one band of a dequantized weight: 64 rows of the widest matrix at least, 64 MiB at most.
  int64_t widest = 0;
  for (const auto& r : layout.regions()) widest = std::max(widest, r.cols);
  m.scratch_elems = std::max<int64_t>(64 * widest, int64_t(16) << 20);
  m.scratch = m.alloc(m.scratch_elems);
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
int64_t CudaNf4Engine::device_bytes() const { return impl_->arena_bytes + impl_->other_bytes; }

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
  const int H = cfg.hidden_size, I = cfg.intermediate_size, E = cfg.num_experts, K = cfg.top_k;
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
  float* rl = m.rlogits.get(size_t(n) * E);
  float* gates = m.gates.get(size_t(n) * K);
  int32_t* chosen = m.d_chosen.get(size_t(n) * K);
  float* gx = m.gx.get(size_t(n) * H);
  float* gu = m.gu.get(size_t(n) * 2 * I);
  float* act = m.act.get(size_t(n) * I);
  float* ey = m.ey.get(size_t(n) * K * H);
  int32_t* d_token_of_row = m.d_token_of_row.get(size_t(n) * K);
  int32_t* d_row_of = m.d_row_of.get(size_t(n) * K);

  embed(m.embedding, d_tok, n, H, h, s);
  std::vector<int32_t> host_chosen(size_t(n) * K, 0);
  std::vector<float> ones(size_t(n) * K, 1.0f);
  for (int l = 0; l < cfg.num_layers; ++l) {
    const Layer& w = m.layers[size_t(l)];
    rms_norm(h, w.attn_norm, n, H, float(cfg.rms_norm_eps), x, s);
    m.linear(x, n, w.wq, q, qd);
    m.linear(x, n, w.wk, k, kvd);
    m.linear(x, n, w.wv, v, kvd);
    rope(q, n, cfg.num_heads, cfg.head_dim, m.pos, m.inv_freq, s);
    rope(k, n, cfg.num_kv_heads, cfg.head_dim, m.pos, m.inv_freq, s);
    const size_t row_bytes = size_t(kvd) * sizeof(float);
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(m.k_cache[size_t(l)] + int64_t(m.pos) * kvd, k, n * row_bytes,
                                      cudaMemcpyDeviceToDevice, s));
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(m.v_cache[size_t(l)] + int64_t(m.pos) * kvd, v, n * row_bytes,
                                      cudaMemcpyDeviceToDevice, s));
    attention(q, m.k_cache[size_t(l)], m.v_cache[size_t(l)], n, m.pos, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
              cfg.sliding_window, att, s);
    m.linear(att, n, w.wo, tmp, H);
    add_inplace(h, tmp, int64_t(n) * H, s);

    rms_norm(h, w.ffn_norm, n, H, float(cfg.rms_norm_eps), x, s);
    if (cfg.is_moe()) {
      m.linear(x, n, w.router, rl, E);
      router_topk(rl, n, E, K, chosen, gates, s);
      MOELAB_CUDA_CHECK(cudaMemcpyAsync(host_chosen.data(), chosen, host_chosen.size() * sizeof(int32_t),
                                        cudaMemcpyDeviceToHost, s));
      MOELAB_CUDA_CHECK(cudaStreamSynchronize(s));  // grouping needs the choices on the host
    } else {
      MOELAB_CUDA_CHECK(cudaMemcpyAsync(gates, ones.data(), ones.size() * sizeof(float), cudaMemcpyHostToDevice, s));
    }
    const ExpertGroups g = group_by_expert(host_chosen, K, E);
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(d_token_of_row, g.token.data(), g.token.size() * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, s));
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(d_row_of, g.row_of.data(), g.row_of.size() * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, s));
    for (int e = 0; e < E; ++e) {
      const int c = g.count(e);
      if (c == 0) continue;
      const auto& ex = w.experts[size_t(e)];
      gather_rows(x, d_token_of_row + g.offsets[size_t(e)], c, H, gx, s);
      m.linear(gx, c, ex[0], gu, 2 * int64_t(I));      // gate projection into the first half of each row
      m.linear(gx, c, ex[1], gu + I, 2 * int64_t(I));  // up projection into the second half
      swiglu(gu, c, I, act, s);
      m.linear(act, c, ex[2], ey + int64_t(g.offsets[size_t(e)]) * H, H);
    }
    moe_combine(ey, d_row_of, gates, n, K, H, h, s);
    // `g`'s host vectors are sources of async copies and die with this iteration: wait for the stream.
    MOELAB_CUDA_CHECK(cudaStreamSynchronize(s));
    if (probe) {
      LayerObservation obs;
      obs.layer = l;
      const MatrixRF hidden = m.to_host(h, n, H);
      MatrixRF router_logits, gate_m;
      MatrixRI experts(n, K);
      std::copy(host_chosen.begin(), host_chosen.end(), experts.data());
      if (cfg.is_moe()) router_logits = m.to_host(rl, n, E);
      gate_m = m.to_host(gates, n, K);
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
  MOELAB_CUBLAS_CHECK(cublasSgemm(m.blas, CUBLAS_OP_T, CUBLAS_OP_N, cfg.vocab_size, n, H, &one, m.lm_head, H, x, H,
                                  &zero, logits, cfg.vocab_size));
  MatrixRF out = m.to_host(logits, n, cfg.vocab_size);
  if (probe) probe->on_logits(out, 0.0);
  return out;
}

}  // namespace moelab::cuda
