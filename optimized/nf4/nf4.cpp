#include "optimized/nf4/nf4.hpp"

// Every multiply and add below must round on its own, as the GPU kernels and torch do: a compiler
// allowed to fuse `a * b + c` into one FMA (GCC's default when the target has FMA) would change the
// rebuilt absmax in the last bit. The one place that wants a fused multiply-add says so (std::fma).
#pragma GCC optimize("fp-contract=off")

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.hpp"

namespace moelab::nf4 {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

bool is_known_dtype(const std::string& d) { return d == "float32" || d == "float16" || d == "bfloat16"; }

// Runs fn(begin, end) over [0, count) split into up to `threads` contiguous ranges.
template <typename Fn>
void parallel_ranges(int64_t count, int threads, const Fn& fn) {
  const int64_t parts = std::clamp<int64_t>(threads, 1, std::max<int64_t>(count, 1));
  if (parts == 1) {
    fn(int64_t(0), count);
    return;
  }
  const int64_t chunk = ceil_div(count, parts);
  std::vector<std::thread> pool;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t begin = p * chunk, end = std::min(count, begin + chunk);
    if (begin < end) pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  for (auto& t : pool) t.join();
}

// ---------------------------------------------------------------------------------------------
// torch's CPU float32 sum (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum), element for element.

constexpr int64_t kTorchGrainSize = 32768;  // at::internal::GRAIN_SIZE: below it a reduction is serial
constexpr int kLanes = 8;                    // Vectorized<float> of the AVX2 (and DEFAULT) build

// One vector register of torch's Vectorized<float>: lane-wise float adds.
struct Lanes {
  std::array<float, kLanes> v{};
  Lanes& operator+=(const Lanes& o) {
    for (int i = 0; i < kLanes; ++i) v[i] += o.v[i];
    return *this;
  }
};

int64_t torch_ceil_log2(int64_t x) {  // utils::CeilLog2
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(uint64_t(x - 1));
}

// multi_row_sum: four interleaved rows, each summed in a 4-level cascade whose level size grows with
// the input, so only partial sums of similar size meet.
template <typename Acc, typename Load>
std::array<Acc, 4> multi_row_sum(int64_t size, const Load& load) {
  constexpr int kLevels = 4;
  const int64_t level_power = std::max<int64_t>(4, torch_ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  Acc acc[kLevels][4] = {};
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] += load(i, k);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = Acc{};
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] += load(i, k);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[j][k];
  return {acc[0][0], acc[0][1], acc[0][2], acc[0][3]};
}

// row_sum: the row seen as (-1, 4) for instruction-level parallelism, leftovers into partial 0.
template <typename Acc, typename Load>
Acc row_sum(int64_t size, const Load& load) {
  const int64_t size_ilp = size / 4;
  auto partial = multi_row_sum<Acc>(size_ilp, [&](int64_t i, int k) { return load(i * 4 + k); });
  for (int64_t i = size_ilp * 4; i < size; ++i) partial[0] += load(i);
  for (int k = 1; k < 4; ++k) partial[0] += partial[k];
  return partial[0];
}

// What one call of the reduction loop adds to its output for a contiguous run of n floats.
float torch_sum_run(const float* x, int64_t n) {
  if (n < kLanes) return row_sum<float>(n, [&](int64_t i) { return x[i]; });
  // vectorized_inner_sum: whole vectors in the cascade, the tail scalars first, then the lanes in order.
  const int64_t nvec = n / kLanes;
  const Lanes v = row_sum<Lanes>(nvec, [&](int64_t j) {
    Lanes l;
    std::memcpy(l.v.data(), x + j * kLanes, sizeof(l.v));
    return l;
  });
  float acc = 0.0f;
  for (int64_t k = nvec * kLanes; k < n; ++k) acc += x[k];
  for (int t = 0; t < kLanes; ++t) acc += v.v[size_t(t)];
  return acc;
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes' dynamic 8-bit map.

// torch.linspace(start, end, steps, dtype=float32) on CPU: each half counted from its own end, and
// the AVX2/AVX-512 builds of torch fuse `start + step * i` into one FMA (a build without FMA gives
// different last bits for steps >= 9; the fixture test checks this table against bitsandbytes').
std::vector<float> torch_linspace_f32(float start, float end, int64_t steps) {
  std::vector<float> out(static_cast<size_t>(steps));
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int64_t halfway = steps / 2;
  for (int64_t i = 0; i < steps; ++i)
    out[size_t(i)] = i < halfway ? std::fma(step, static_cast<float>(i), start)
                                 : std::fma(-step, static_cast<float>(steps - i - 1), end);
  return out;
}

std::array<float, 256> make_dynamic_map() {
  // signed, 7 exponent bits, 8 bits in all: for exponent e = 0..6 there are 2^e fraction values, the
  // midpoints of linspace(0.1, 1, 2^e + 1), scaled by 10^(e-6), each with both signs; then 0 and 1.
  constexpr int kExponentBits = 7;
  std::vector<float> values;
  for (int e = 0; e < kExponentBits; ++e) {
    const auto bounds = torch_linspace_f32(0.1f, 1.0f, (int64_t(1) << e) + 1);
    // Python evaluates 10 ** (e - 6) as a double (an int 1 for e = 6); torch rounds it to float32.
    const float scale = static_cast<float>(std::pow(10.0, e - (kExponentBits - 1)));
    for (size_t j = 0; j + 1 < bounds.size(); ++j) {
      const float mid = (bounds[j] + bounds[j + 1]) / 2.0f;
      values.push_back(scale * mid);
      values.push_back(-scale * mid);
    }
  }
  values.push_back(0.0f);
  values.push_back(1.0f);
  std::sort(values.begin(), values.end());
  if (values.size() != 256) throw Error("internal: dynamic map does not have 256 entries");
  std::array<float, 256> out;
  std::copy(values.begin(), values.end(), out.begin());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Quantization steps.

// The kernel's tree is a binary search over the sorted thresholds with '>' at every node, so its
// answer is the number of thresholds x is strictly greater than (0 for NaN, which compares false).
// Counting without branches lets the compiler vectorize the block loop.
inline uint8_t code_of(float x) {
  int code = 0;
  for (float t : kThresholds) code += x > t ? 1 : 0;
  return uint8_t(code);
}

// One 4-bit block: absmax, then every element scaled by the reciprocal. `end` is the end of the block
// or of the tensor; blocks start at even indices, so each block owns its bytes.
void quantize_block(const float* x, int64_t begin, int64_t end, uint8_t* packed, float* absmax) {
  float amax = 0.0f;
  for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
  *absmax = amax;
  // The kernel multiplies by 1.0f / absmax. An all-zero block gives inf, 0 * inf = NaN, and NaN
  // takes code 0 (-1.0); it dequantizes to -1.0 * 0 = -0.0.
  const float inv = 1.0f / amax;
  // The kernel loads the element past the end of an odd-length tensor as 0.0f and quantizes it like
  // the rest, so the pad nibble is the code of 0 * inv: 7 (the code of 0.0), or 0 in a zero block.
  const int64_t count = end - begin;
  std::array<uint8_t, kBlocksizes.back() + 1> codes;
  for (int64_t i = 0; i < count; ++i) codes[size_t(i)] = code_of(x[begin + i] * inv);
  if (count % 2 == 1) codes[size_t(count)] = code_of(0.0f * inv);
  for (int64_t k = 0; k < (count + 1) / 2; ++k)
    packed[begin / 2 + k] = uint8_t(codes[size_t(2 * k)] << 4 | codes[size_t(2 * k + 1)]);
}

// Double quantization of q.absmax (bitsandbytes quantize_4bit with compress_statistics=True).
void nest_statistics(QuantizedTensor& q) {
  const std::vector<float>& absmax = q.absmax;
  q.offset = torch_cpu_mean(absmax);
  const auto& code = dynamic_map();
  const int64_t nb = int64_t(absmax.size());
  q.qabsmax.assign(size_t(nb), 0);
  q.nested_absmax.assign(size_t(ceil_div(nb, q.nested_blocksize)), 0.0f);
  std::vector<float> centered(absmax.size());
  for (size_t i = 0; i < absmax.size(); ++i) centered[i] = absmax[i] - q.offset;
  for (int64_t b = 0; b * q.nested_blocksize < nb; ++b) {
    const int64_t begin = b * q.nested_blocksize, end = std::min(nb, begin + q.nested_blocksize);
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(centered[size_t(i)]));
    q.nested_absmax[size_t(b)] = amax;
    const float inv = 1.0f / amax;  // all equal absmax: 0 * inf = NaN -> code 0, rebuilt as the offset
    for (int64_t i = begin; i < end; ++i) q.qabsmax[size_t(i)] = quantize_dynamic(centered[size_t(i)] * inv, code);
  }
  q.nested_code.assign(code.begin(), code.end());
  q.nested = true;
  q.absmax.clear();
}

}  // namespace

// ---------------------------------------------------------------------------------------------

bool is_valid_blocksize(int blocksize) {
  return std::find(kBlocksizes.begin(), kBlocksizes.end(), blocksize) != kBlocksizes.end();
}

uint8_t quantize_value(float x) { return code_of(x); }

const std::array<float, 256>& dynamic_map() {
  static const std::array<float, 256> map = make_dynamic_map();
  return map;
}

uint8_t quantize_dynamic(float x, const std::array<float, 256>& code) {
  // Binary search: after 7 halvings the pivot p (always even) satisfies code[p-1] < x <= code[p+1].
  int p = 127;
  for (int step = 64; step > 0; step /= 2) p += x > code[size_t(p)] ? step : -step;
  // Nearest of the two candidates on x's side of code[p], by the float midpoint; on the midpoint
  // itself the pivot wins.
  if (x > code[size_t(p)]) {
    const float mid = (code[size_t(p)] + code[size_t(p) + 1]) * 0.5f;
    return uint8_t(x > mid ? p + 1 : p);
  }
  if (p == 0) return 0;
  const float mid = (code[size_t(p) - 1] + code[size_t(p)]) * 0.5f;
  return uint8_t(x < mid ? p - 1 : p);
}

float torch_cpu_mean(std::span<const float> x, int threads) {
  const int64_t n = int64_t(x.size());
  if (n == 0) return std::nanf("");  // torch: mean of an empty tensor is nan
  float sum = 0.0f;                   // the output starts at 0 and each loop call adds into it
  if (n < kTorchGrainSize || threads <= 1) {
    sum += torch_sum_run(x.data(), n);
  } else {
    // two_pass_reduction: at::parallel_for splits [0, n) into equal chunks over the threads it uses,
    // each adds its chunk into its own slot, and the slots are then summed by the same loop.
    const int64_t used = std::min<int64_t>(threads, ceil_div(n, kTorchGrainSize));
    const int64_t chunk = ceil_div(n, used);
    std::vector<float> slots(size_t(threads), 0.0f);
    for (int64_t t = 0; t < used && t * chunk < n; ++t)
      slots[size_t(t)] += torch_sum_run(x.data() + t * chunk, std::min(chunk, n - t * chunk));
    sum += torch_sum_run(slots.data(), threads);
  }
  return sum / static_cast<float>(n);
}

int64_t QuantizedTensor::numel() const { return product(shape); }
int64_t QuantizedTensor::nblocks() const { return blocksize > 0 ? ceil_div(numel(), blocksize) : 0; }

QuantizedTensor quantize_nf4(const float* x, int64_t n, int blocksize, bool double_quant, int threads) {
  if (!is_valid_blocksize(blocksize))
    throw Error(fmt::format("NF4: blocksize {} is not one bitsandbytes allows (32, 64, ..., 4096)", blocksize));
  if (n <= 0) throw Error("NF4: cannot quantize an empty tensor");
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) throw Error(fmt::format("NF4: element {} is {}, cannot be quantized", i, x[i]));

  QuantizedTensor q;
  q.shape = {n};
  q.blocksize = blocksize;
  q.packed.assign(size_t((n + 1) / 2), 0);
  q.absmax.assign(size_t(ceil_div(n, blocksize)), 0.0f);
  parallel_ranges(q.nblocks(), threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b)
      quantize_block(x, b * blocksize, std::min(n, (b + 1) * blocksize), q.packed.data(), &q.absmax[size_t(b)]);
  });
  if (double_quant) nest_statistics(q);
  return q;
}

void validate(const QuantizedTensor& q, const std::string& what) {
  auto bad = [&](const std::string& problem) { return Error(fmt::format("{}: {}", what, problem)); };
  if (!is_valid_blocksize(q.blocksize)) throw bad(fmt::format("blocksize {} is not allowed", q.blocksize));
  if (!is_known_dtype(q.dtype)) throw bad(fmt::format("dtype '{}' is not float32, float16 or bfloat16", q.dtype));
  if (q.shape.empty()) throw bad("shape is empty");
  for (auto d : q.shape)
    if (d <= 0) throw bad(fmt::format("shape {} has a dimension <= 0", shape_str(q.shape)));
  const int64_t n = q.numel(), nb = q.nblocks();
  if (int64_t(q.packed.size()) != (n + 1) / 2)
    throw bad(fmt::format("{} packed bytes for {} elements (expected {})", q.packed.size(), n, (n + 1) / 2));
  if (!q.nested) {
    if (int64_t(q.absmax.size()) != nb) throw bad(fmt::format("{} absmax values for {} blocks", q.absmax.size(), nb));
    return;
  }
  if (!is_valid_blocksize(q.nested_blocksize))
    throw bad(fmt::format("nested blocksize {} is not allowed", q.nested_blocksize));
  if (int64_t(q.qabsmax.size()) != nb) throw bad(fmt::format("{} absmax codes for {} blocks", q.qabsmax.size(), nb));
  if (int64_t(q.nested_absmax.size()) != ceil_div(nb, q.nested_blocksize))
    throw bad(fmt::format("{} nested absmax values for {} blocks (nested blocksize {})", q.nested_absmax.size(), nb,
                          q.nested_blocksize));
  if (q.nested_code.size() != 256) throw bad(fmt::format("nested code map has {} entries, not 256", q.nested_code.size()));
}

std::vector<float> block_absmax(const QuantizedTensor& q) {
  validate(q);
  if (!q.nested) return q.absmax;
  std::vector<float> out(q.qabsmax.size());
  for (size_t b = 0; b < out.size(); ++b) {
    // dequantize_blockwise, then `absmax += offset`: two separate float32 roundings.
    const float scaled = q.nested_code[q.qabsmax[b]] * q.nested_absmax[b / size_t(q.nested_blocksize)];
    out[b] = scaled + q.offset;
  }
  return out;
}

std::vector<float> dequantize(const QuantizedTensor& q) {
  const std::vector<float> absmax = block_absmax(q);
  const int64_t n = q.numel();
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = q.packed[size_t(i / 2)];
    const uint8_t code = (i % 2 == 0) ? byte >> 4 : byte & 0x0F;
    out[size_t(i)] = kCodes[code] * absmax[size_t(i / q.blocksize)];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Serialized form.

std::string python_json_float(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (v == 0.0) return std::signbit(v) ? "-0.0" : "0.0";
  // Shortest round-trip digits (what repr uses), taken from the scientific form d.ddde±X.
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);
  const size_t epos = sci.find('e');
  std::string mantissa = sci.substr(0, epos);
  const int exp10 = std::stoi(sci.substr(epos + 1));
  std::string sign;
  if (mantissa[0] == '-') {
    sign = "-";
    mantissa.erase(0, 1);
  }
  std::string digits = mantissa;
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());

  // repr switches to exponent notation when the decimal exponent is below -4 or at least 16.
  if (exp10 < -4 || exp10 >= 16) {
    std::string out = sign + digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    return out + fmt::format("e{}{:02d}", exp10 < 0 ? '-' : '+', std::abs(exp10));
  }
  if (exp10 < 0) return sign + "0." + std::string(size_t(-exp10 - 1), '0') + digits;
  const size_t int_digits = size_t(exp10) + 1;
  if (digits.size() <= int_digits) return sign + digits + std::string(int_digits - digits.size(), '0') + ".0";
  return sign + digits.substr(0, int_digits) + "." + digits.substr(int_digits);
}

std::string quant_state_json(const QuantizedTensor& q) {
  validate(q);
  std::string s = fmt::format(R"({{"quant_type": "nf4", "blocksize": {}, "dtype": "{}", "shape": [{}])", q.blocksize,
                              q.dtype, fmt::join(q.shape, ", "));
  if (q.nested)
    s += fmt::format(R"(, "nested_blocksize": {}, "nested_dtype": "float32", "nested_offset": {})", q.nested_blocksize,
                     python_json_float(double(q.offset)));
  return s + "}";
}

namespace {

TensorToWrite u8_tensor(std::string name, std::vector<int64_t> shape, const void* bytes, size_t size) {
  TensorToWrite t{std::move(name), DType::U8, std::move(shape), std::vector<std::byte>(size)};
  if (size) std::memcpy(t.data.data(), bytes, size);
  return t;
}

}  // namespace

std::vector<TensorToWrite> to_safetensors(const QuantizedTensor& q, const std::string& weight_name) {
  validate(q, weight_name);
  const std::string& w = weight_name;
  const int64_t nb = q.nblocks();
  std::vector<TensorToWrite> out;
  out.push_back(u8_tensor(w, {int64_t(q.packed.size()), 1}, q.packed.data(), q.packed.size()));
  if (q.nested) {
    out.push_back(u8_tensor(w + ".absmax", {nb}, q.qabsmax.data(), q.qabsmax.size()));
    out.push_back(make_f32_tensor(w + ".nested_absmax", {int64_t(q.nested_absmax.size())}, q.nested_absmax.data()));
    out.push_back(make_f32_tensor(w + ".nested_quant_map", {256}, q.nested_code.data()));
  } else {
    out.push_back(make_f32_tensor(w + ".absmax", {nb}, q.absmax.data()));
  }
  out.push_back(make_f32_tensor(w + ".quant_map", {16}, kCodes.data()));
  const std::string json = quant_state_json(q);
  out.push_back(u8_tensor(w + kQuantStateSuffix, {int64_t(json.size())}, json.data(), json.size()));
  return out;
}

bool has_nf4_quant_state(const SafetensorsFile& f, const std::string& weight_name) {
  return f.contains(weight_name + kQuantStateSuffix);
}

namespace {

// The fields of the quant-state JSON that matter here, checked.
struct QuantStateJson {
  int blocksize = 0;
  std::string dtype;
  std::vector<int64_t> shape;
  bool nested = false;
  int nested_blocksize = 0;
  float offset = 0.0f;
};

QuantStateJson parse_quant_state(const SafetensorsFile& f, const TensorInfo& t) {
  auto bad = [&](const std::string& problem) {
    return Error(fmt::format("{}: tensor '{}': quant state JSON {}", f.path(), t.name, problem));
  };
  const auto bytes = f.bytes(t);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(reinterpret_cast<const char*>(bytes.data()),
                              reinterpret_cast<const char*>(bytes.data()) + bytes.size());
  } catch (const nlohmann::json::exception& e) {
    throw bad(fmt::format("is not valid JSON ({})", e.what()));
  }
  if (!j.is_object()) throw bad("is not an object");
  auto field = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key)) throw bad(fmt::format("has no \"{}\"", key));
    return j.at(key);
  };
  auto integer = [&](const char* key) {
    const auto& v = field(key);
    if (!v.is_number_integer()) throw bad(fmt::format("\"{}\" is not an integer", key));
    return v.get<int64_t>();
  };
  auto string = [&](const char* key) {
    const auto& v = field(key);
    if (!v.is_string()) throw bad(fmt::format("\"{}\" is not a string", key));
    return v.get<std::string>();
  };

  QuantStateJson s;
  if (const auto qt = string("quant_type"); qt != "nf4")
    throw bad(fmt::format("has quant_type \"{}\" (only nf4 is supported)", qt));
  const int64_t bs = integer("blocksize");
  if (bs > kBlocksizes.back() || !is_valid_blocksize(int(bs)))
    throw bad(fmt::format("has blocksize {} (allowed: 32, 64, ..., 4096)", bs));
  s.blocksize = int(bs);
  s.dtype = string("dtype");
  if (!is_known_dtype(s.dtype)) throw bad(fmt::format("has dtype \"{}\" (float32, float16 or bfloat16 expected)", s.dtype));
  const auto& shape = field("shape");
  if (!shape.is_array() || shape.empty()) throw bad("\"shape\" is not a non-empty list");
  int64_t numel = 1;
  for (const auto& d : shape) {
    if (!d.is_number_integer() || d.get<int64_t>() <= 0) throw bad("\"shape\" has an entry that is not a positive integer");
    if (d.get<int64_t>() > (int64_t(1) << 50) / numel) throw bad("\"shape\" has more elements than any real tensor");
    numel *= d.get<int64_t>();
    s.shape.push_back(d.get<int64_t>());
  }
  s.nested = j.contains("nested_blocksize") || j.contains("nested_offset") || j.contains("nested_dtype");
  if (s.nested) {
    const int64_t nbs = integer("nested_blocksize");
    if (nbs > kBlocksizes.back() || !is_valid_blocksize(int(nbs))) throw bad(fmt::format("has nested_blocksize {}", nbs));
    s.nested_blocksize = int(nbs);
    if (const auto nd = string("nested_dtype"); nd != "float32")
      throw bad(fmt::format("has nested_dtype \"{}\" (float32 expected)", nd));
    const auto& off = field("nested_offset");
    if (!off.is_number()) throw bad("\"nested_offset\" is not a number");
    s.offset = static_cast<float>(off.get<double>());  // bitsandbytes: torch.tensor(float(...)), float32
  }
  return s;
}

class Nf4Reader {
 public:
  Nf4Reader(const TensorLookup& find, const std::string& weight_name) : find_(find), w_(weight_name) {}

  // The file and header entry of `name`; absent means the checkpoint is incomplete.
  std::pair<const SafetensorsFile*, const TensorInfo*> get(const std::string& name) const {
    const SafetensorsFile* f = find_(name);
    if (!f || !f->contains(name)) {
      const SafetensorsFile* wf = find_(w_);
      throw Error(fmt::format("{}: NF4 weight '{}' has no tensor '{}'", wf ? wf->path() : std::string("checkpoint"),
                              w_, name));
    }
    return {f, &f->info(name)};
  }

  // Checks dtype and shape, returns the raw bytes.
  std::span<const std::byte> expect(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
    const auto [f, t] = get(name);
    if (t->dtype != dtype || t->shape != shape)
      throw Error(fmt::format("{}: tensor '{}': expected {} {}, found {} {}", f->path(), name, dtype_name(dtype),
                              shape_str(shape), dtype_name(t->dtype), shape_str(t->shape)));
    return f->bytes(*t);
  }

  template <typename T>
  std::vector<T> read(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
    const auto bytes = expect(name, dtype, shape);
    std::vector<T> out(bytes.size() / sizeof(T));
    if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
  }

  QuantizedTensor read_all() const {
    const auto [sf, st] = get(w_ + kQuantStateSuffix);
    if (st->dtype != DType::U8 || st->shape.size() != 1)
      throw Error(fmt::format("{}: tensor '{}': expected U8 [len], found {} {}", sf->path(), st->name,
                              dtype_name(st->dtype), shape_str(st->shape)));
    const QuantStateJson s = parse_quant_state(*sf, *st);

    QuantizedTensor q;
    q.shape = s.shape;
    q.dtype = s.dtype;
    q.blocksize = s.blocksize;
    const int64_t n = q.numel(), nb = q.nblocks();
    q.packed = read<uint8_t>(w_, DType::U8, {(n + 1) / 2, 1});
    check_quant_map();
    if (s.nested) {
      q.nested = true;
      q.nested_blocksize = s.nested_blocksize;
      q.offset = s.offset;
      q.qabsmax = read<uint8_t>(w_ + ".absmax", DType::U8, {nb});
      q.nested_absmax = read<float>(w_ + ".nested_absmax", DType::F32, {ceil_div(nb, s.nested_blocksize)});
      q.nested_code = read<float>(w_ + ".nested_quant_map", DType::F32, {256});
    } else {
      q.absmax = read<float>(w_ + ".absmax", DType::F32, {nb});
    }
    validate(q, w_);
    return q;
  }

 private:
  // bitsandbytes ignores quant_map when it dequantizes NF4 (the kernels have the table built in), so
  // a different table means the file is not what it claims to be.
  void check_quant_map() const {
    const std::string name = w_ + ".quant_map";
    const auto map = read<float>(name, DType::F32, {16});
    for (size_t k = 0; k < 16; ++k)
      if (std::memcmp(&map[k], &kCodes[k], sizeof(float)) != 0)
        throw Error(fmt::format("{}: tensor '{}': entry {} is {} where the NF4 table has {}", get(name).first->path(),
                                name, k, map[k], kCodes[k]));
  }

  const TensorLookup& find_;
  std::string w_;
};

}  // namespace

QuantizedTensor read_nf4(const TensorLookup& find, const std::string& weight_name) {
  return Nf4Reader(find, weight_name).read_all();
}

QuantizedTensor read_nf4(const SafetensorsFile& f, const std::string& weight_name) {
  const TensorLookup find = [&f](const std::string& name) { return f.contains(name) ? &f : nullptr; };
  return read_nf4(find, weight_name);
}

}  // namespace moelab::nf4
