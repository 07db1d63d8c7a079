// placeholder: being written
#include "cli/commands.hpp"
namespace moelab::cli {
void register_trace(CLI::App&) {}
}  // namespace moelab::cli
