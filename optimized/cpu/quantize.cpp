#include "optimized/cpu/quantize.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <set>

#include "core/error.hpp"
#include "core/safetensors_writer.hpp"
#include "optimized/nf4/nf4.hpp"

namespace moelab::cpu {
namespace {

// Keeps bitsandbytes' compact absmax beside the FP32 one when the nested blocks have the 256 the int8
// kernels index by shift (bitsandbytes always writes 256; another size keeps only the FP32 form).
void keep_compact_absmax(const nf4::QuantizedTensor& q, Nf4Matrix& m) {
  if (!q.nested || q.nested_blocksize != 256 || q.nested_code.size() != 256) return;
  m.absmax_code = q.qabsmax;
  m.nested_absmax = q.nested_absmax;
  m.nested_code = q.nested_code;
  m.offset = q.offset;
}

}  // namespace

Nf4Matrix quantize_matrix(const std::vector<float>& values, int64_t rows, int64_t cols, int blocksize,
                          bool double_quant) {
  const auto q = nf4::quantize_nf4(values.data(), rows * cols, blocksize, double_quant);
  Nf4Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.blocksize = blocksize;
  m.own(q.packed);
  m.absmax = nf4::block_absmax(q);  // double quantization undone once, here, for the FP32 kernels
  keep_compact_absmax(q, m);
  return m;
}

Nf4Matrix map_prequantized(const Checkpoint& ck, const std::string& name, int64_t rows, int64_t cols) {
  const auto q = nf4::read_nf4([&](const std::string& n) { return ck.contains(n) ? &ck.file_of(n) : nullptr; }, name);
  if (q.numel() != rows * cols)
    throw Error(fmt::format("{}: NF4 weight '{}' holds {} values, config.json implies [{}, {}]", ck.file_of(name).path(),
                            name, q.numel(), rows, cols));
  // The same count in another shape ([in, out]) would be read as the wrong matrix without a word.
  if (q.shape != std::vector<int64_t>{rows, cols})
    throw Error(fmt::format("{}: NF4 weight '{}' has quant_state shape [{}], config.json implies [{}, {}]",
                            ck.file_of(name).path(), name, fmt::join(q.shape, ", "), rows, cols));
  Nf4Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.blocksize = q.blocksize;
  m.packed = reinterpret_cast<const uint8_t*>(ck.file_of(name).bytes(name).data());  // mapped, not copied
  m.absmax = nf4::block_absmax(q);
  keep_compact_absmax(q, m);
  return m;
}

void write_dequantized_checkpoint(const Checkpoint& ck, const std::string& out_dir, int blocksize, bool double_quant) {
  namespace fs = std::filesystem;
  fs::create_directories(out_dir);
  const auto names = ck.config().nf4_weight_names();
  const std::set<std::string> quantized(names.begin(), names.end());
  std::vector<TensorToWrite> tensors;
  for (const auto& spec : ck.config().expected_tensors()) {
    std::vector<float> values = ck.read_f32(spec.name);
    if (quantized.count(spec.name))
      values = nf4::dequantize(nf4::quantize_nf4(values.data(), int64_t(values.size()), blocksize, double_quant));
    tensors.push_back(make_f32_tensor(spec.name, spec.shape, values.data()));
  }
  write_safetensors((fs::path(out_dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  fs::copy_file(fs::path(ck.dir()) / "config.json", fs::path(out_dir) / "config.json",
                fs::copy_options::overwrite_existing);
  if (fs::exists(ck.tokenizer_path()))
    fs::copy_file(ck.tokenizer_path(), fs::path(out_dir) / "tokenizer.model", fs::copy_options::overwrite_existing);
}

}  // namespace moelab::cpu
