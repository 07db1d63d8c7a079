// Routing traces (analysis/trace.hpp). By concern: trace_h5.{hpp,cpp} (HDF5 helpers, safe attribute and
// row reading, opening files), trace_writer.cpp (TraceWriter), trace_reader.cpp (read_trace,
// repair_trace), trace_inputs.cpp (read_trace_inputs), trace_probe.cpp (RoutingProbe, route_window).
// Here the float16 names trace.hpp declares (the conversion itself is core/dtype's: one converter for
// checkpoints and traces).
#include "analysis/trace.hpp"

#include <fmt/format.h>
#include <sys/stat.h>

#include "core/dtype.hpp"
#include "core/error.hpp"

namespace moelab::analysis {

uint16_t float_to_half(float f) { return f32_to_f16(f); }
float half_to_float(uint16_t h) { return f16_to_f32(h); }

}  // namespace moelab::analysis
