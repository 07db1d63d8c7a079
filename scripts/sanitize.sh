#!/usr/bin/env bash
# Sanitizer runs of the test suite.
#
#   scripts/sanitize.sh [CTEST_REGEX]          AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)
#   scripts/sanitize.sh --tsan [CTEST_REGEX]   ThreadSanitizer (build-tsan/), default regex:
#                                              'CpuEngine|Q8|ThreadPool|OpTable' (the cpu-nf4 tests)
#
# ASan+UBSan: the default compiler, RelWithDebInfo, -fsanitize=address,undefined -fno-omit-frame-pointer,
# UB fatal (-fno-sanitize-recover), leak detection on, MOELAB_CUDA=OFF; builds moelab_tests, moelab_train_tests, moelab_bench (a README recipe runs it), the CLI
# it runs and the fuzz corpus replays, then runs ctest (every test, or those matching CTEST_REGEX; the
# CLI tests run the sanitized binary too). TSan: clang with LLVM's libomp and its Archer tool, so OpenMP
# (used only at load) is understood rather than suppressed; see scripts/sanitizer-suppressions/tsan.supp.
# Suppressions (scripts/sanitizer-suppressions/) hold third-party code only, each with its reason.
# Environment: JOBS (build parallelism, default 1), NICE (default 19), CTEST_ARGS (extra ctest flags).
# Exit status: ctest's (0: clean).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=asan
if [[ ${1:-} == --tsan ]]; then
  mode=tsan
  shift
fi
regex=${1:-}
jobs=${JOBS:-1}
nice=(nice -n "${NICE:-19}")
supp=$PWD/scripts/sanitizer-suppressions

if [[ $mode == asan ]]; then
  build=build-asan
  flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
  mkdir -p "$build"
  "${nice[@]}" cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOELAB_CUDA=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >"$build/configure.log" 2>&1 ||
    { cat "$build/configure.log"; exit 1; }
  targets=(--target moelab_tests --target moelab_train_tests --target moelab --target moelab_bench)
  for h in safetensors config tokenizer eval_docs trace; do targets+=(--target "fuzz_replay_$h"); done
  "${nice[@]}" cmake --build "$build" -j"$jobs" "${targets[@]}"
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:fast_unwind_on_malloc=0}
  # (fast_unwind_on_malloc=0: libhdf5 has no frame pointers; lsan.supp names a libhdf5 function)
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:suppressions=$supp/ubsan.supp}
  export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$supp/lsan.supp:print_suppressions=0}
else
  build=build-tsan
  regex=${regex:-'CpuEngine|Q8|ThreadPool|OpTable'}
  # clang, its TSan runtime and LLVM's OpenMP with Archer: installed here when missing, as fuzz.sh does
  # (the default setup never needs clang).
  if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/libarcher.so >/dev/null 2>&1; then
    echo "sanitize.sh --tsan: installing clang and libomp-dev (LLVM's OpenMP and Archer) from Debian (apt-get)"
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-dev libomp-dev
  fi
  flags="-fsanitize=thread -fno-omit-frame-pointer"
  mkdir -p "$build"
  "${nice[@]}" cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOELAB_CUDA=OFF \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread" >"$build/configure.log" 2>&1 ||
    { cat "$build/configure.log"; exit 1; }
  "${nice[@]}" cmake --build "$build" -j"$jobs" --target moelab_tests --target moelab_train_tests --target moelab
  tsan_supp=$build/tsan.supp
  cp "$supp/tsan.supp" "$tsan_supp"
  archer=$(ls /usr/lib/llvm-*/lib/libarcher.so 2>/dev/null | head -1 || true)
  if [[ -n $archer ]]; then
    export OMP_TOOL_LIBRARIES=$archer
    export ARCHER_OPTIONS=${ARCHER_OPTIONS:-verbose=1}
    echo "sanitize.sh --tsan: OpenMP through Archer ($archer)"
  else
    echo "sanitize.sh --tsan: WARNING: no libarcher.so (libomp-dev); OpenMP reports suppressed as false positives" >&2
    printf '%s\n' 'called_from_lib:libomp.so.5' 'race:libomp.so.5' 'called_from_lib:libgomp.so.1' 'race:libgomp.so.1' >>"$tsan_supp"
  fi
  # ignore_noninstrumented_modules=1: what Archer's start-up warning asks for. libomp itself is not built with TSan, so
  # its internal allocator and locks (memory only libomp touches: ___kmp_free's memset, its mutexes) raced
  # in 14 of 327 tests without it, timing-dependent; moelab's own (instrumented) accesses are still checked,
  # and Archer supplies OpenMP's synchronization for them.
  export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:ignore_noninstrumented_modules=1:suppressions=$PWD/$tsan_supp}
fi

ctest_args=(--test-dir "$build" --output-on-failure -j"$jobs" ${CTEST_ARGS:-})
[[ -z $regex ]] || ctest_args+=(-R "$regex")
echo "sanitize.sh ($mode): ctest ${ctest_args[*]}"
"${nice[@]}" ctest "${ctest_args[@]}"
