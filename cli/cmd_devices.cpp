// moelab devices: which accelerators this build can use.
#include <fmt/format.h>

#include "cli/commands.hpp"
#ifdef MOELAB_HAVE_CUDA
#include "optimized/cuda/device_info.hpp"
#endif

namespace moelab::cli {

void register_devices(CLI::App& app) {
  auto* cmd = app.add_subcommand("devices", "List the CUDA devices this build can use");
  cmd->callback([] {
#ifdef MOELAB_HAVE_CUDA
    const auto devices = cuda::list_devices();
    if (devices.error.empty() && devices.devices.empty()) fmt::print("built with CUDA; no CUDA device found\n");
    if (!devices.error.empty()) fmt::print("built with CUDA; {}\n", devices.error);
    for (const auto& d : devices.devices)
      fmt::print("cuda:{}  {}  sm_{}{}  {:.1f} GiB  {} SMs\n", d.index, d.name, d.major, d.minor,
                 double(d.memory_bytes) / double(1ll << 30), d.multiprocessors);
#else
    fmt::print("built without CUDA (configure with -DMOELAB_CUDA=ON where nvcc is installed)\n");
#endif
  });
}

}  // namespace moelab::cli
