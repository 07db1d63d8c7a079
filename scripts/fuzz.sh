#!/usr/bin/env bash
# Runs every fuzz harness (tests/fuzz/) for real with libFuzzer, AddressSanitizer and UBSan.
#
#   scripts/fuzz.sh SECONDS [HARNESS...]      (default: all harnesses, one after another)
#
# Installs clang from Debian when it is missing (apt-get; the default setup does not need clang), configures
# build-fuzz/ with clang, -fsanitize=fuzzer-no-link,address,undefined on the libraries and
# -fsanitize=fuzzer on the harnesses (MOELAB_FUZZ=ON), builds only the fuzz targets, then runs each
# harness for SECONDS on its committed corpus (tests/fuzz/corpus/<harness>/, read only): new inputs go to
# a temporary directory, crashes, leaks, timeouts and out-of-memory inputs to build-fuzz/artifacts/.
# Exit 0 when no harness found anything; 1 otherwise (the artifacts are listed). To replay one:
#   build-fuzz/tests/fuzz/fuzz_<harness> build-fuzz/artifacts/<file>
# and, once fixed, commit it into the corpus as repro-<what> so ctest replays it in CI.
# Environment: JOBS (build parallelism, default 1), NICE (default 19), FUZZ_ARGS (extra libFuzzer flags).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: scripts/fuzz.sh SECONDS [safetensors|config|tokenizer|eval_docs|trace ...]" >&2
  exit 2
fi
seconds=$1
shift
harnesses=("$@")
[[ ${#harnesses[@]} -gt 0 ]] || harnesses=(safetensors config tokenizer eval_docs trace)
jobs=${JOBS:-1}
nice=(nice -n "${NICE:-19}")

if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  echo "fuzz.sh: installing clang and its sanitizer/libFuzzer runtimes from Debian (apt-get)"
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-dev libomp-dev
fi

build=build-fuzz
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fsanitize=fuzzer-no-link -fno-omit-frame-pointer -g"
mkdir -p "$build"
"${nice[@]}" cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DMOELAB_CUDA=OFF -DMOELAB_FUZZ=ON >"$build/configure.log" 2>&1 || { cat "$build/configure.log"; exit 1; }
grep -q 'MOELAB_HAVE_LIBFUZZER:INTERNAL=1' "$build/CMakeCache.txt" || { echo "fuzz.sh: clang++ cannot link -fsanitize=fuzzer" >&2; exit 1; }
targets=()
for h in "${harnesses[@]}"; do targets+=(--target "fuzz_$h"); done
"${nice[@]}" cmake --build "$build" -j"$jobs" "${targets[@]}"

artifacts=$build/artifacts
mkdir -p "$artifacts"
work=$(mktemp -d /tmp/moelab-fuzz-corpus.XXXXXX)
trap 'rm -rf "$work"' EXIT
supp=$PWD/scripts/sanitizer-suppressions
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:suppressions=$supp/ubsan.supp}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$supp/lsan.supp:print_suppressions=0}

status=0
summary=()
for h in "${harnesses[@]}"; do
  mkdir -p "$work/$h"
  before=$(find "$artifacts" -name "$h-*" | wc -l)
  echo "=== fuzz_$h: ${seconds}s on tests/fuzz/corpus/$h ($(ls tests/fuzz/corpus/$h | wc -l) inputs)"
  set +e
  # -timeout: an input running longer is a hang (a bug). -rss_limit_mb / -malloc_limit_mb: a giant
  # allocation from a small input is a bug.
  # The HDF5 leak suppression (lsan.supp) names a libhdf5 function: libhdf5 has no frame pointers, so
  # its malloc stacks need the slow unwinder to reach it (costly; only the trace harness needs it).
  asan=$ASAN_OPTIONS
  [[ $h != trace ]] || asan=$asan:fast_unwind_on_malloc=0
  ASAN_OPTIONS=$asan "${nice[@]}" "$build/tests/fuzz/fuzz_$h" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=3072 \
    -malloc_limit_mb=2048 -max_len=262144 -print_final_stats=1 -artifact_prefix="$artifacts/$h-" \
    ${FUZZ_ARGS:-} "$work/$h" "tests/fuzz/corpus/$h" >"$artifacts/../fuzz-$h.log" 2>&1
  rc=$?
  set -e
  after=$(find "$artifacts" -name "$h-*" | wc -l)
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$build/fuzz-$h.log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$build/fuzz-$h.log" | tail -1 || true)
  if [[ $rc -ne 0 || $after -gt $before ]]; then
    status=1
    summary+=("fuzz_$h: FAILED (exit $rc, $((after - before)) new artifacts; log $build/fuzz-$h.log)")
    tail -40 "$build/fuzz-$h.log"
  else
    summary+=("fuzz_$h: ${seconds}s, $runs inputs run, $cov, $(ls "$work/$h" | wc -l) new corpus inputs, 0 crashes")
  fi
done
echo
printf '%s\n' "${summary[@]}"
if [[ $status -ne 0 ]]; then
  echo "artifacts:"
  ls -l "$artifacts"
fi
exit $status
