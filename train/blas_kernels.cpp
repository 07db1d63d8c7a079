#include "train/blas_kernels.hpp"

#include <cblas.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdlib>
#include <map>
#include <strings.h>

#include "core/error.hpp"

namespace moelab::train {

namespace {

struct CaseInsensitiveLess {
  bool operator()(const std::string& a, const std::string& b) const { return ::strcasecmp(a.c_str(), b.c_str()) < 0; }
};

// Every kernel set the x86-64 DYNAMIC_ARCH build of OpenBLAS 0.3.21 can report (driver/others/dynamic.c's
// corename[]; Katmai, Coppermine, Northwood, Banias and Athlon are run as Prescott on 64 bits) and the CPU
// flags its kernels use. Where the flags come from, in OpenBLAS 0.3.21's sources: the kernel files each set
// takes (kernel/x86_64/KERNEL.<SET>) and the -march its C kernels are built with (kernel/Makefile).
//  - The SSE sets' assembly kernels use SSE3 at most (haddpd, movddup, addsubps): sse3. (Only OPTERON's use
//    SSE2 alone, but dynamic.c maps the names Opteron and Opteron_SSE3 to the two Opteron sets crosswise:
//    both names are listed with sse3, the stricter.)
//  - Sandybridge: AVX (sgemm_kernel_16x4_sandy.S).
//  - Haswell and Zen: AVX2 + FMA (the same kernels; C kernels built with -mavx2).
//  - Bulldozer: AVX + FMA4 (sgemm_kernel_16x2_bulldozer.S: the four-operand vfmaddps). Piledriver,
//    Steamroller and Excavator: the same FMA4 sgemm (sgemm_kernel_16x2_piledriver.S) and an FMA3 dgemm
//    (dgemm_kernel_8x2_piledriver.S: vfmadd231pd). No CPU made since has FMA4: on this project's AVX2 EPYC
//    all four die of SIGILL on the first sgemm (checked).
//  - SkylakeX: built with -march=skylake-avx512: AVX-512 F, CD, BW, DQ and VL.
//  - Cooperlake: -march=cooperlake, those and AVX-512 BF16 (0.3.21 cannot be forced to it, but picks it
//    itself on such a CPU; later versions can be forced).
// A name outside the table is not refused: it is either one OpenBLAS does not know (it then chooses for
// this CPU itself, and reports that choice, which is in the table) or one of a newer OpenBLAS than this
// table was written from, which this code cannot judge; refusing it would stop a set that may well run.
// Extend the table when Debian's OpenBLAS gains sets (0.3.22 adds SapphireRapids).
const std::map<std::string, std::vector<std::string>, CaseInsensitiveLess>& table() {
  static const std::map<std::string, std::vector<std::string>, CaseInsensitiveLess> t = [] {
    const std::vector<std::string> sse3 = {"sse3"}, avx2_fma = {"avx2", "fma"};
    const std::vector<std::string> avx512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"};
    std::vector<std::string> avx512_bf16 = avx512;
    avx512_bf16.push_back("avx512bf16");
    return std::map<std::string, std::vector<std::string>, CaseInsensitiveLess>{
        {"Prescott", sse3},    {"Atom", sse3},        {"Core2", sse3},       {"Penryn", sse3},
        {"Dunnington", sse3},  {"Nehalem", sse3},     {"Opteron", sse3},     {"Opteron_SSE3", sse3},
        {"Barcelona", sse3},   {"Nano", sse3},        {"Bobcat", sse3},      {"Sandybridge", {"avx"}},
        {"Haswell", avx2_fma}, {"Zen", avx2_fma},     {"Bulldozer", {"avx", "fma4"}},
        {"Piledriver", {"avx", "fma", "fma4"}},       {"Steamroller", {"avx", "fma", "fma4"}},
        {"Excavator", {"avx", "fma", "fma4"}},        {"SkylakeX", avx512},  {"Cooperlake", avx512_bf16},
    };
  }();
  return t;
}

}  // namespace

std::vector<std::string> blas_kernel_sets() {
  std::vector<std::string> names;
  for (const auto& [name, flags] : table()) names.push_back(name);
  return names;
}

const std::vector<std::string>* blas_kernel_flags(std::string_view core) {
  const auto it = table().find(std::string(core));
  return it == table().end() ? nullptr : &it->second;
}

bool cpu_has_flag(const std::string& flag) {
  // __builtin_cpu_supports takes a string literal only. GCC's checks include the OS's (XGETBV) for AVX and
  // AVX-512 registers.
  if (flag == "sse3") return __builtin_cpu_supports("sse3");
  if (flag == "avx") return __builtin_cpu_supports("avx");
  if (flag == "avx2") return __builtin_cpu_supports("avx2");
  if (flag == "fma") return __builtin_cpu_supports("fma");
  if (flag == "fma4") return __builtin_cpu_supports("fma4");
  if (flag == "avx512f") return __builtin_cpu_supports("avx512f");
  if (flag == "avx512cd") return __builtin_cpu_supports("avx512cd");
  if (flag == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (flag == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (flag == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (flag == "avx512bf16") return __builtin_cpu_supports("avx512bf16");
  return false;
}

std::vector<std::string> missing_flags(const std::vector<std::string>& flags,
                                       const std::function<bool(const std::string&)>& has) {
  std::vector<std::string> missing;
  for (const auto& f : flags)
    if (!has(f)) missing.push_back(f);
  return missing;
}

std::string blas_kernels_refusal(std::string_view core, const char* forced,
                                 const std::function<bool(const std::string&)>& has) {
  const auto* flags = blas_kernel_flags(core);
  if (!flags) return "";
  const auto missing = missing_flags(*flags, has);
  if (missing.empty()) return "";
  const std::string lacking = fmt::format("{}", fmt::join(missing, " "));
  if (forced && *forced)
    return fmt::format(
        "OPENBLAS_CORETYPE={} forces OpenBLAS's {} kernels, which use instructions this CPU lacks ({}): unset "
        "OPENBLAS_CORETYPE to let OpenBLAS choose the kernels for this CPU",
        forced, core, lacking);
  return fmt::format(
      "OpenBLAS chose its {} kernels, which use instructions this CPU lacks ({}): set OPENBLAS_CORETYPE to a "
      "kernel set this CPU runs (Prescott needs SSE3 only)",
      core, lacking);
}

void require_runnable_blas_kernels() {
  const std::string why = blas_kernels_refusal(openblas_get_corename(), std::getenv("OPENBLAS_CORETYPE"));
  if (!why.empty()) throw Error(why);
}

}  // namespace moelab::train
