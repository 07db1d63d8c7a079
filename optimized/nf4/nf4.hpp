#pragma once
// bitsandbytes NF4 (4-bit NormalFloat) quantization, bit for bit as bitsandbytes' CUDA kernels do it,
// and its serialized form (what transformers 4.x / bitsandbytes write for a Linear4bit weight).
//
// The rules are reimplemented from ../shared/notes/formats.md section 3 and bitsandbytes 0.49.2's
// csrc/kernels.cu (kQuantizeBlockwise, dQuantizeNF4, dQuantize<0>); tests/fixtures/nf4/README.md lists
// where bitsandbytes' own CPU path differs from them and why.
//
//   quantize:   blocks of `blocksize` consecutive elements of the flattened row-major tensor (the last
//               may be partial); absmax = max |x| (float32); inv = 1.0f / absmax; code = the NF4 decision
//               tree applied to x * inv; two codes per byte, first element in the high nibble.
//   double quantization (bitsandbytes `compress_statistics=True`):
//               offset = mean(absmax) (float32, summed in torch's CPU order, see torch_cpu_mean);
//               qabsmax = 8-bit blockwise quantization of (absmax - offset) with the dynamic map in
//               nested blocks of 256, each with its own float32 absmax.
//   dequantize: absmax[b] = code8[qabsmax[b]] * nested_absmax[b / 256] + offset (two float32 roundings),
//               out[i] = nf4[code[i]] * absmax[i / blocksize] (float32).
//
// By concern: code_values.hpp (the code table), quantize.cpp (4-bit codes, double quantization),
// dynamic_map.cpp (the 8-bit map, torch.linspace as torch computes it), torch_sum.cpp (torch's float32
// sum), quantized_tensor.cpp (validate, dequantize), python_float.cpp (floats as json.dumps writes them),
// serialize_write.cpp and serialize_read.cpp (the safetensors form).
#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"
#include "optimized/nf4/code_values.hpp"

namespace moelab::nf4 {

// The 16 NF4 code values, index = 4-bit code, as a std::array: the one table (code_values.hpp).
inline constexpr std::array<float, 16> kCodes = std::to_array(kCodeValues);

// The float constants of the CUDA kernel's decision tree (dQuantizeNF4), ascending: threshold k sits
// between codes k and k+1. The kernel compares with a strict '>', so a value exactly on a threshold
// takes the lower code, and NaN (every comparison false) takes code 0.
inline constexpr std::array<float, 15> kThresholds = {
    -0.8480964004993439f,  -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,   0.2035212516784668f,  0.2920137718319893f,  0.3893125355243683f,
    0.5016634166240692f,   0.6427869200706482f,  0.8614784181118011f,
};

// Every blocksize bitsandbytes' CUDA quantize_4bit accepts.
inline constexpr std::array<int, 8> kBlocksizes = {32, 64, 128, 256, 512, 1024, 2048, 4096};
inline constexpr int kNestedBlocksize = 256;  // what quantize_4bit uses for the statistics
bool is_valid_blocksize(int blocksize);

// The 4-bit code of a value already scaled by 1/absmax (the CUDA decision tree).
uint8_t quantize_value(float x);

// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 sorted float32
// values (127 negative, 0, 127 positive, 1.0), computed as torch does on x86-64 with AVX2/AVX-512
// (torch.linspace then fuses its multiply-add). This is the map on the CUDA path; bitsandbytes' CPU
// path overwrites entry 0 with -1.0 (see the fixture README).
const std::array<float, 256>& dynamic_map();

// The 8-bit code of a value already scaled by 1/absmax, by the CUDA kernel's rule (dQuantize<0>):
// a 7-step binary search, then the nearer of the two neighbours, comparing with the float midpoint
// (a + b) * 0.5f. On an exact midpoint it keeps the search's pivot, which is always the even index
// of the two. NaN gives code 0.
uint8_t quantize_dynamic(float x, const std::array<float, 256>& code);

// mean() of a float32 CPU tensor as torch computes it, bit for bit: torch.sum's cascade summation
// (aten/src/ATen/native/cpu/SumKernel.cpp: 8-float vector accumulators, 4-way interleaving, a 4-level
// cascade) in float32, then divided by n. 8 floats on every x86-64 build: torch registers no AVX-512
// sum kernel, so the AVX2 one runs there too. With `threads` > 1 and n >= 32768 torch splits the input
// into one chunk per thread (two_pass_reduction), which changes the result; bitsandbytes' offset was
// matched with 1. bitsandbytes takes its double-quantization offset from this on the CPU (on CUDA torch
// reduces in another order, so a GPU-made offset can differ in the last bits).
float torch_cpu_mean(std::span<const float> x, int threads = 1);

struct QuantizedTensor {
  std::vector<int64_t> shape;     // logical shape (JSON "shape"); its product is the element count
  std::string dtype = "float32";  // torch dtype name of the quantized tensor: float32, float16 or bfloat16
  int blocksize = 64;
  std::vector<uint8_t> packed;    // (n + 1) / 2 bytes, element 2k in the high nibble of byte k

  // Not nested: float32 absmax per block.
  std::vector<float> absmax;

  // Nested (double quantization): absmax is stored as 8-bit codes.
  bool nested = false;
  std::vector<uint8_t> qabsmax;       // per block: code of (absmax - offset)
  std::vector<float> nested_absmax;   // per nested block of nested_blocksize codes
  std::vector<float> nested_code;     // the 256-entry map qabsmax indexes (kept as stored)
  int nested_blocksize = kNestedBlocksize;
  float offset = 0.0f;

  int64_t numel() const;    // product of shape
  int64_t nblocks() const;  // ceil(numel / blocksize)
};

// Quantizes x[0..n) as a 1-D tensor of shape [n] (set `shape` and `dtype` afterwards for a matrix).
// Throws moelab::Error for an empty input, a blocksize bitsandbytes does not allow, or a NaN/inf value
// (the CUDA kernel would quietly turn a block holding one into code 0 / absmax inf). `threads` > 1
// quantizes the 4-bit blocks in parallel; the result does not depend on it.
QuantizedTensor quantize_nf4(const float* x, int64_t n, int blocksize = 64, bool double_quant = true,
                             int threads = 1);

// Float32 absmax per block, rebuilt from the nested statistics when nested.
std::vector<float> block_absmax(const QuantizedTensor& q);
// Float32 values (cast to q.dtype afterwards to get what bitsandbytes returns). The per-element
// definition (one element, one division for its block): the oracle dequantize_into is tested against.
std::vector<float> dequantize(const QuantizedTensor& q);
// The same float32 values bit for bit, written straight into out[0..numel) (no intermediate vector):
// a block at a time (its 16 scaled code values made once, no division per element), the blocks split
// over `threads` OpenMP threads (0: OpenMP's current default, which the trainer sets from --threads).
// The double form stores each float32 value widened (exact), for the float64 oracle path. For the
// trainer, which dequantizes every frozen weight of a layer each time it computes the layer.
void dequantize_into(const QuantizedTensor& q, float* out, int threads = 0);
void dequantize_into(const QuantizedTensor& q, double* out, int threads = 0);
// dequantize_into for the blocks [first_block, last_block) only, on the calling thread: `out` is the whole
// tensor's output (element i of the tensor at out[i]), so a caller can split the blocks over its own pool.
// validate(q) first: this does not check q again per call.
void dequantize_blocks_into(const QuantizedTensor& q, int64_t first_block, int64_t last_block, float* out);
void dequantize_blocks_into(const QuantizedTensor& q, int64_t first_block, int64_t last_block, double* out);
// Checks that the fields are consistent with each other; throws moelab::Error naming `what`.
void validate(const QuantizedTensor& q, const std::string& what = "NF4 tensor");

// ---- Serialized form: the tensors Linear4bit._save_to_state_dict writes under "<weight_name>." ----
//   <w>                                 U8  [(n+1)/2, 1]  packed codes
//   <w>.absmax                          U8  [nblocks] if nested, else F32 [nblocks]
//   <w>.quant_map                       F32 [16]          the NF4 table
//   <w>.nested_absmax                   F32 [ceil(nblocks/256)]   (nested only)
//   <w>.nested_quant_map                F32 [256]                 (nested only)
//   <w>.quant_state.bitsandbytes__nf4   U8  [len]         UTF-8 JSON of the other fields
// weight_name is the full tensor name, e.g. "model.layers.0.self_attn.q_proj.weight".

inline constexpr const char* kQuantStateSuffix = ".quant_state.bitsandbytes__nf4";

// How Python's json.dumps writes a float: repr(float) (shortest round trip), NaN/Infinity spelled
// as json does.
std::string python_json_float(double v);
// The JSON exactly as bitsandbytes writes it (json.dumps, insertion order, ", " and ": ").
std::string quant_state_json(const QuantizedTensor& q);

std::vector<TensorToWrite> to_safetensors(const QuantizedTensor& q, const std::string& weight_name);

// True when `weight_name` has an NF4 quant state next to it.
bool has_nf4_quant_state(const SafetensorsFile& f, const std::string& weight_name);

// Reads and validates a serialized NF4 weight (shapes, dtypes, JSON); throws moelab::Error naming the
// file and tensor. The lookup form serves checkpoints whose shards split one weight's tensors: it
// returns the file holding `name`, or nullptr.
using TensorLookup = std::function<const SafetensorsFile*(const std::string& name)>;
QuantizedTensor read_nf4(const TensorLookup& find, const std::string& weight_name);
QuantizedTensor read_nf4(const SafetensorsFile& f, const std::string& weight_name);

}  // namespace moelab::nf4
