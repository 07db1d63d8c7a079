// moelab devices: which accelerators this build can use.
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "core/safetensors_writer.hpp"
#ifdef MOELAB_HAVE_CUDA
#include "optimized/cuda/device_info.hpp"
#endif

namespace moelab::cli {

void register_devices(CLI::App& app) {
  auto* cmd = app.add_subcommand("devices", "List the CUDA devices this build can use");
  static std::string json_out;
  add_json_option(*cmd, json_out);
  cmd->callback([] {
    nlohmann::json j{{"built_with_cuda", false}, {"devices", nlohmann::json::array()}};
#ifdef MOELAB_HAVE_CUDA
    j["built_with_cuda"] = true;
    const auto devices = cuda::list_devices();
    if (!devices.error.empty()) j["error"] = devices.error;
    for (const auto& d : devices.devices)
      j["devices"].push_back({{"index", d.index}, {"name", d.name}, {"compute_capability", fmt::format("{}.{}", d.major, d.minor)},
                              {"memory_bytes", d.memory_bytes}, {"multiprocessors", d.multiprocessors}});
    if (devices.error.empty() && devices.devices.empty()) fmt::print("built with CUDA; no CUDA device found\n");
    if (!devices.error.empty()) fmt::print("built with CUDA; {}\n", devices.error);
    for (const auto& d : devices.devices)
      fmt::print("cuda:{}  {}  sm_{}{}  {:.1f} GiB  {} SMs\n", d.index, d.name, d.major, d.minor,
                 double(d.memory_bytes) / double(1ll << 30), d.multiprocessors);
#else
    fmt::print("built without CUDA (configure with -DMOELAB_CUDA=ON where nvcc is installed)\n");
#endif
    if (!json_out.empty()) write_file_atomic(json_out, j.dump(2) + "\n");
  });
}

}  // namespace moelab::cli
