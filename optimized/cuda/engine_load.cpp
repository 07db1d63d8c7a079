// cuda-nf4 construction: the device, the weight layout, and the weights themselves -- quantized from a
// checkpoint (or mapped from a pre-quantized one), or drawn at random on the device for a synthetic model.
#include <omp.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>

#include "core/clock.hpp"
#include "core/lora.hpp"
#include "core/progress.hpp"
#include "optimized/cpu/quantize.hpp"
#include "optimized/cuda/engine_impl.hpp"
#include "optimized/cuda/random_fill.hpp"

namespace moelab::cuda {
namespace {

float* upload_floats(const float* v, size_t count, std::vector<void*>& owned, int64_t& counted) {
  void* p = nullptr;
  MOELAB_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(float)));
  owned.push_back(p);
  counted += int64_t(count * sizeof(float));
  MOELAB_CUDA_CHECK(cudaMemcpy(p, v, count * sizeof(float), cudaMemcpyHostToDevice));
  return static_cast<float*>(p);
}

float* upload_floats(const std::vector<float>& v, std::vector<void*>& owned, int64_t& counted) {
  return upload_floats(v.data(), v.size(), owned, counted);
}

// Where one NF4 matrix of the checkpoint goes: a region of the arena or of an expert block.
struct MatrixHome {
  std::string name;
  int64_t rows = 0, cols = 0;
  uint8_t* codes = nullptr;
  float* absmax = nullptr;
  bool on_device = true;  // false: pinned host memory (offloaded experts)
};

uint64_t mix(uint64_t seed, uint64_t a, uint64_t b) {  // distinct, reproducible seeds per matrix and part
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + a * 0xBF58476D1CE4E5B9ull + b * 0x94D049BB133111EBull + 1;
  z ^= z >> 31;
  return z * 0xD6E8FEB86659FD93ull;
}

}  // namespace

CudaNf4Engine::Impl::~Impl() {
  if (stream) cudaStreamSynchronize(stream);
  experts.reset();
  if (blas) cublasDestroy(blas);
  if (stream) cudaStreamDestroy(stream);
  if (arena) cudaFree(arena);
  for (void* p : owned) cudaFree(p);
}

float* CudaNf4Engine::Impl::alloc(int64_t elems) {
  void* p = nullptr;
  MOELAB_CUDA_CHECK(cudaMalloc(&p, size_t(std::max<int64_t>(elems, 1)) * sizeof(float)));
  owned.push_back(p);
  other_bytes += elems * int64_t(sizeof(float));
  return static_cast<float*>(p);
}

void CudaNf4Engine::Impl::init_device(int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0)
    throw Error(std::string("cuda-nf4: no CUDA device found") +
                (err != cudaSuccess ? std::string(" (") + cudaGetErrorString(err) + ")" : std::string()));
  if (device < 0 || device >= count) throw Error(fmt::format("cuda-nf4: device {} requested, {} present", device, count));
  MOELAB_CUDA_CHECK(cudaSetDevice(device));
  MOELAB_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  MOELAB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  MOELAB_CUBLAS_CHECK(cublasCreate(&blas));
  MOELAB_CUBLAS_CHECK(cublasSetStream(blas, stream));
  // No TF32: in FP32 mode the prefill must agree with the decode GEMV to FP32 rounding. BF16 GEMMs use
  // tensor cores whatever this says.
  MOELAB_CUBLAS_CHECK(cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH));
}

void CudaNf4Engine::Impl::load_weights(const Checkpoint* ck, uint64_t seed) {
  const auto t0 = std::chrono::steady_clock::now();
  const int L = cfg.num_layers, E = cfg.num_experts, H = cfg.hidden_size, I = cfg.intermediate_size;
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& spec : cfg.expected_tensors()) shapes[spec.name] = spec.shape;

  // Layout: attention projections and routers in the arena; one expert block's w1, w3, w2.
  WeightArena arena_layout;
  std::map<std::string, int> arena_index;
  for (int l = 0; l < L; ++l) {
    const std::string p = fmt::format("model.layers.{}.self_attn.", l);
    for (const char* m : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      const std::string name = p + m + ".weight";
      arena_index[name] = arena_layout.add(name, shapes.at(name)[0], shapes.at(name)[1]);
    }
    if (cfg.is_moe()) arena_index[cfg.router_name(l)] = arena_layout.add(cfg.router_name(l), E, H);
  }
  WeightArena expert_layout;
  expert_layout.add("w1", I, H);
  expert_layout.add("w3", I, H);
  expert_layout.add("w2", H, I);
  MOELAB_CUDA_CHECK(cudaMalloc(&arena, size_t(arena_layout.bytes())));
  arena_bytes = arena_layout.bytes();
  experts = std::make_unique<ExpertStore>(expert_layout, L, E, options.gpu_expert_cache, stream);

  std::map<std::string, std::array<int, 3>> expert_index;  // name -> layer, expert, matrix (w1, w3, w2)
  for (int l = 0; l < L; ++l)
    for (int e = 0; e < E; ++e) {
      expert_index[cfg.w1_name(l, e)] = {l, e, 0};
      expert_index[cfg.w3_name(l, e)] = {l, e, 1};
      expert_index[cfg.w2_name(l, e)] = {l, e, 2};
    }
  std::vector<MatrixHome> homes;
  for (const auto& name : cfg.nf4_weight_names()) {
    MatrixHome hm{.name = name};
    if (auto it = arena_index.find(name); it != arena_index.end()) {
      const Nf4Region& r = arena_layout.region(it->second);
      hm.rows = r.rows, hm.cols = r.cols;
      hm.codes = arena + r.codes_offset;
      hm.absmax = reinterpret_cast<float*>(arena + r.absmax_offset);
    } else {
      const auto found = expert_index.find(name);
      if (found == expert_index.end()) throw Error(fmt::format("cuda-nf4: internal: no home for NF4 weight {}", name));
      const auto [layer, expert, which] = found->second;
      const Nf4Region& r = expert_layout.region(which);
      uint8_t* block = experts->home(layer, expert);
      hm.rows = r.rows, hm.cols = r.cols;
      hm.codes = block + r.codes_offset;
      hm.absmax = reinterpret_cast<float*>(block + r.absmax_offset);
      hm.on_device = experts->home_is_device();
    }
    homes.push_back(hm);
  }

  const bool synthetic = ck == nullptr;
  Progress progress(synthetic ? "drawing synthetic NF4 weights"
                              : (cfg.quantization.nf4 ? "uploading NF4 weights" : "quantizing to NF4 and uploading"),
                    int64_t(homes.size()), options.show_progress);
  if (synthetic) {
    // NF4 levels have mean square ~0.27, so an element's std is ~0.52 absmax: absmax ~ 1.9 / sqrt(cols)
    // gives each product about unit gain and keeps the 32-layer residual stream finite and O(sqrt(L)).
    int64_t largest = 0;
    for (const auto& hm : homes) largest = std::max(largest, hm.rows * hm.cols);
    uint8_t* tmp_codes = nullptr;
    float* tmp_absmax = nullptr;
    if (!experts->home_is_device()) {
      MOELAB_CUDA_CHECK(cudaMalloc(&tmp_codes, size_t(largest / 2)));
      MOELAB_CUDA_CHECK(cudaMalloc(&tmp_absmax, size_t((largest + kNf4Block - 1) / kNf4Block) * sizeof(float)));
    }
    for (size_t i = 0; i < homes.size(); ++i) {
      const MatrixHome& hm = homes[i];
      const int64_t n = hm.rows * hm.cols;
      uint8_t* codes = hm.on_device ? hm.codes : tmp_codes;
      float* absmax = hm.on_device ? hm.absmax : tmp_absmax;
      const float unit = 1.0f / std::sqrt(float(hm.cols));
      fill_random_bytes(codes, n / 2, mix(seed, i, 0), stream);
      const int64_t blocks = (n + kNf4Block - 1) / kNf4Block;
      fill_random_uniform(absmax, blocks, 1.5f * unit, 2.3f * unit, mix(seed, i, 1), stream);
      if (!hm.on_device) {
        MOELAB_CUDA_CHECK(cudaMemcpyAsync(hm.codes, codes, size_t(n / 2), cudaMemcpyDeviceToHost, stream));
        MOELAB_CUDA_CHECK(cudaMemcpyAsync(hm.absmax, absmax, size_t(blocks) * sizeof(float), cudaMemcpyDeviceToHost,
                                          stream));
        MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream));  // the temporaries are reused by the next matrix
      }
      progress.advance();
    }
    MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (tmp_codes) cudaFree(tmp_codes);
    if (tmp_absmax) cudaFree(tmp_absmax);
  } else {
    // Quantize a batch of matrices on all host threads (Mixtral has 995), then copy the batch: host
    // memory stays bounded by one batch of quantized matrices.
    const size_t batch = size_t(std::max(1, omp_get_max_threads()));
    for (size_t b0 = 0; b0 < homes.size(); b0 += batch) {
      const size_t b1 = std::min(homes.size(), b0 + batch);
      std::vector<cpu::Nf4Matrix> qs(b1 - b0);
      std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic)
      for (size_t i = b0; i < b1; ++i) {
        try {
          const MatrixHome& hm = homes[i];
          qs[i - b0] = cfg.quantization.nf4 ? cpu::map_prequantized(*ck, hm.name, hm.rows, hm.cols)
                                            : cpu::quantize_matrix(ck->read_f32(hm.name), hm.rows, hm.cols, 64, true);
        } catch (...) {
#pragma omp critical
          if (!failure) failure = std::current_exception();
        }
      }
      if (failure) std::rethrow_exception(failure);
      for (size_t i = b0; i < b1; ++i) {
        const MatrixHome& hm = homes[i];
        const cpu::Nf4Matrix& q = qs[i - b0];
        if (q.blocksize != kNf4Block)
          throw Error(fmt::format("cuda-nf4: {} has NF4 blocksize {}; the kernels are written for 64", hm.name,
                                  q.blocksize));
        const size_t codes_bytes = size_t((hm.rows * hm.cols + 1) / 2), absmax_bytes = q.absmax.size() * sizeof(float);
        if (hm.on_device) {
          MOELAB_CUDA_CHECK(cudaMemcpy(hm.codes, q.packed, codes_bytes, cudaMemcpyHostToDevice));
          MOELAB_CUDA_CHECK(cudaMemcpy(hm.absmax, q.absmax.data(), absmax_bytes, cudaMemcpyHostToDevice));
        } else {
          std::memcpy(hm.codes, q.packed, codes_bytes);
          std::memcpy(hm.absmax, q.absmax.data(), absmax_bytes);
        }
        progress.advance();
      }
    }
  }
  progress.finish();

  // Embedding, lm_head and norms stay FP32 (as transformers + bitsandbytes keep them unquantized).
  const int64_t V = cfg.vocab_size;
  if (synthetic) {
    embedding = alloc(V * H);
    fill_random_normal(embedding, V * H, 1.0f, mix(seed, 1u << 30, 0), stream);
    lm_head = cfg.tie_word_embeddings ? embedding : alloc(V * H);
    if (!cfg.tie_word_embeddings) fill_random_normal(lm_head, V * H, 1.0f / std::sqrt(float(H)), mix(seed, 1u << 30, 1), stream);
    final_norm = alloc(H);
    fill_constant(final_norm, H, 1.0f, stream);
  } else {
    embedding = upload_floats(ck->read_f32("model.embed_tokens.weight"), owned, other_bytes);
    lm_head = cfg.tie_word_embeddings ? embedding : upload_floats(ck->read_f32("lm_head.weight"), owned, other_bytes);
    final_norm = upload_floats(ck->read_f32("model.norm.weight"), owned, other_bytes);
  }
  std::vector<float> freqs;  // as the cpu engine and transformers: FP32 powers of rope_theta
  for (int i = 0; i < cfg.head_dim / 2; ++i)
    freqs.push_back(1.0f / std::pow(float(cfg.rope_theta), float(2 * i) / float(cfg.head_dim)));
  inv_freq = upload_floats(freqs, owned, other_bytes);

  for (int l = 0; l < L; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    Layer layer;
    if (synthetic) {
      layer.attn_norm = alloc(H);
      layer.ffn_norm = alloc(H);
      fill_constant(layer.attn_norm, H, 1.0f, stream);
      fill_constant(layer.ffn_norm, H, 1.0f, stream);
    } else {
      layer.attn_norm = upload_floats(ck->read_f32(p + "input_layernorm.weight"), owned, other_bytes);
      layer.ffn_norm = upload_floats(ck->read_f32(p + "post_attention_layernorm.weight"), owned, other_bytes);
    }
    auto at = [&](const std::string& name) { return matrix_at(arena, arena_layout.region(arena_index.at(name))); };
    layer.wq = at(p + "self_attn.q_proj.weight");
    layer.wk = at(p + "self_attn.k_proj.weight");
    layer.wv = at(p + "self_attn.v_proj.weight");
    layer.wo = at(p + "self_attn.o_proj.weight");
    if (cfg.is_moe()) layer.router = at(cfg.router_name(l));
    layers.push_back(layer);
    const int64_t kv = int64_t(max_context) * cfg.num_kv_heads * cfg.head_dim;
    k_cache.push_back(alloc(kv));
    v_cache.push_back(alloc(kv));
  }
  // Scratch for one band of a dequantized weight: 64 rows of the widest matrix, and at least 16M values.
  int64_t widest = std::max<int64_t>(H, I);
  scratch_elems = std::max<int64_t>(64 * widest, int64_t(16) << 20);
  scratch = alloc(scratch_elems);
  // The uploads above ran on the legacy default stream (cudaMemcpy from pageable memory may return before
  // its DMA ends), which the engine's non-blocking stream does not wait for: finish everything here.
  MOELAB_CUDA_CHECK(cudaDeviceSynchronize());
  load_seconds = seconds_since(t0);
}

// The adapter's factors go up once, FP32 as read (row-major, as the products read them). Every module the
// adapter holds must land on a weight of this engine: one left over would be a silent ignore.
void CudaNf4Engine::Impl::load_adapter(const LoraAdapter& adapter) {
  const auto t0 = SteadyClock::now();  // counted in load_seconds with the weights
  size_t placed = 0;
  const auto upload = [&](const std::string& weight, const DeviceMatrix& base) {
    DeviceLora d;
    const LoraFactors* f = adapter.find(weight);
    if (!f) return d;
    if (f->a.cols() != base.cols || f->b.rows() != base.rows || f->a.rows() != f->rank || f->b.cols() != f->rank)
      throw Error(fmt::format("cuda-nf4: {}: LoRA factors A [{}, {}], B [{}, {}] do not fit the weight [{}, {}] ({})", weight,
                              f->a.rows(), f->a.cols(), f->b.rows(), f->b.cols(), base.rows, base.cols, adapter.dir()));
    d.rank = f->rank;
    d.in = base.cols;
    d.out = base.rows;
    d.scale = float(f->scale);  // as cpu-nf4 scales its FP32 product
    d.a = upload_floats(f->a.data(), size_t(f->a.size()), owned, other_bytes);
    d.b = upload_floats(f->b.data(), size_t(f->b.size()), owned, other_bytes);
    ++placed;
    return d;
  };
  const int H = cfg.hidden_size, I = cfg.intermediate_size;
  const DeviceMatrix w13{I, H, nullptr, nullptr}, w2{H, I, nullptr, nullptr};  // expert shapes (data in the store)
  for (int l = 0; l < cfg.num_layers; ++l) {
    Layer& layer = layers[size_t(l)];
    const std::string p = fmt::format("model.layers.{}.self_attn.", l);
    layer.wq_lora = upload(p + "q_proj.weight", layer.wq);
    layer.wk_lora = upload(p + "k_proj.weight", layer.wk);
    layer.wv_lora = upload(p + "v_proj.weight", layer.wv);
    layer.wo_lora = upload(p + "o_proj.weight", layer.wo);
    if (cfg.is_moe()) layer.router_lora = upload(cfg.router_name(l), layer.router);
    layer.expert_lora.resize(size_t(cfg.num_experts));
    for (int e = 0; e < cfg.num_experts; ++e)
      layer.expert_lora[size_t(e)] = {upload(cfg.w1_name(l, e), w13), upload(cfg.w3_name(l, e), w13),
                                      upload(cfg.w2_name(l, e), w2)};
  }
  if (placed != adapter.modules().size())
    throw Error(fmt::format("cuda-nf4: internal: {} of the adapter's {} modules have a weight in this engine ({})", placed,
                            adapter.modules().size(), adapter.dir()));
  MOELAB_CUDA_CHECK(cudaDeviceSynchronize());  // the uploads ran on the legacy default stream (see load_weights)
  load_seconds += seconds_since(t0);
}

}  // namespace moelab::cuda
