#pragma once
// Whether this CPU can run the OpenBLAS kernel set the trainer's float products would run on.
//
// OpenBLAS's environment variable OPENBLAS_CORETYPE forces a kernel set, and OpenBLAS 0.3.21 (Debian's)
// takes any name it knows without asking whether the CPU has the set's instructions: with
// OPENBLAS_CORETYPE=SkylakeX on an AVX2-only CPU, openblas_get_corename() says "SkylakeX" and the first
// sgemm dies of an illegal instruction (SIGILL). Products' constructor (products.hpp) asks here first and
// throws moelab::Error naming the variable, the set and the missing flags instead. A name OpenBLAS does not
// know (a typo, or 0.3.21's "Cooperlake", which its lookup loop stops short of) is not taken: OpenBLAS falls
// back to choosing for this CPU, and openblas_get_corename() reports that choice.
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace moelab::train {

// The kernel sets of the table below, as openblas_get_corename() spells them.
std::vector<std::string> blas_kernel_sets();

// The CPU flags (GCC's __builtin_cpu_supports names; /proc/cpuinfo's, but "pni" for sse3) the kernels of set
// `core` use; nullptr for a name the table does not know. Case-insensitive, as OpenBLAS reads
// OPENBLAS_CORETYPE.
const std::vector<std::string>* blas_kernel_flags(std::string_view core);

// Whether this CPU (and its OS: AVX and AVX-512 need the OS to save their registers) runs instructions of
// `flag`; false for a flag this function does not know.
bool cpu_has_flag(const std::string& flag);

// Those of `flags` that `has` says are missing, in order.
std::vector<std::string> missing_flags(const std::vector<std::string>& flags,
                                       const std::function<bool(const std::string&)>& has = cpu_has_flag);

// The one-line reason OpenBLAS's kernel set `core` cannot run where `has` holds ("" when it can, or when the
// table does not know `core`); `forced` is OPENBLAS_CORETYPE's value (nullptr when unset), named in the reason.
std::string blas_kernels_refusal(std::string_view core, const char* forced,
                                 const std::function<bool(const std::string&)>& has = cpu_has_flag);

// Throws moelab::Error with blas_kernels_refusal's reason for the set OpenBLAS took (openblas_get_corename(),
// which runs no kernel) on this CPU. Call before any BLAS product.
void require_runnable_blas_kernels();

}  // namespace moelab::train
