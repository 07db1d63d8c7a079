// The serialized form, written: the tensors and quant-state JSON Linear4bit._save_to_state_dict writes.
#include <fmt/format.h>

#include <cstring>

#include "optimized/nf4/nf4.hpp"

namespace moelab::nf4 {

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

}  // namespace moelab::nf4
