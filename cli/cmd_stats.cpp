// placeholder: being written
#include "cli/commands.hpp"
namespace moelab::cli {
void register_stats(CLI::App&) {}
}  // namespace moelab::cli
