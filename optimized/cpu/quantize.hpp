#pragma once
// Turning checkpoint weights into the CPU kernels' NF4 matrices, with bitsandbytes' rules
// (optimized/nf4): quantize (optionally double-quantize), then rebuild absmax in FP32 once.
#include <string>
#include <vector>

#include "core/checkpoint.hpp"
#include "optimized/cpu/nf4_matrix.hpp"

namespace moelab::cpu {

Nf4Matrix quantize_matrix(const std::vector<float>& values, int64_t rows, int64_t cols, int blocksize,
                          bool double_quant);

// An NF4 weight of a pre-quantized checkpoint (bitsandbytes' serialized form): codes stay in the
// checkpoint's memory map, absmax is rebuilt in FP32. Throws moelab::Error naming file and tensor.
Nf4Matrix map_prequantized(const Checkpoint& ck, const std::string& name, int64_t rows, int64_t cols);

// Writes a copy of the checkpoint whose quantized weights are replaced by their NF4 round trip
// (dequantize(quantize(W))) in F32: the reference engine on it computes what an exact NF4 engine
// computes, so kernel error and quantization error can be told apart.
void write_dequantized_checkpoint(const Checkpoint& ck, const std::string& out_dir, int blocksize, bool double_quant);

}  // namespace moelab::cpu
