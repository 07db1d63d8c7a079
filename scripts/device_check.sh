#!/bin/bash
# The one cuda-nf4 check for the GPU machine: configure and build the CUDA targets, run the device
# tests, `moelab diff --a ref --b cuda-nf4` on every fixture model, and the CUDA microbenchmarks.
# Writes logs and summary.md to OUTDIR. Designed to finish well under 8 minutes on an H200.
#
#   scripts/device_check.sh OUTDIR
#
# The GPU machine has only its CUDA image (nvcc, cmake, ninja, Python): the Debian packages fetched by
# scripts/fetch_device_debs.sh into .device-debs/ are unpacked with `dpkg -x` into .device-prefix/ and
# the build is pointed there, when the image lacks them. Every step has a timeout; a failed step is
# recorded and the script goes on, so one run reports as much as it can.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: scripts/device_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
build=${MOELAB_DEVICE_BUILD:-$here/build-device}
prefix=$here/.device-prefix
summary=$out/summary.md
start=$(date +%s)
: > "$out/steps.tsv"

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a timeout, log in OUTDIR/NAME.log, status recorded
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$out/steps.tsv"
  echo "[device_check] $name: rc=$rc ($(( $(date +%s) - t0 )) s)"
  return $rc
}

# 1. Dependencies: unpack the fetched .debs (once) when present.
cmake_extra=()
if ls "$here"/.device-debs/*.deb > /dev/null 2>&1; then
  if [ ! -f "$prefix/.unpacked" ]; then
    mkdir -p "$prefix"
    for d in "$here"/.device-debs/*.deb; do dpkg -x "$d" "$prefix" || echo "dpkg -x failed: $d"; done
    touch "$prefix/.unpacked"
  fi
  arch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  export PKG_CONFIG_SYSROOT_DIR=$prefix
  export PKG_CONFIG_PATH=$prefix/usr/lib/$arch/pkgconfig:$prefix/usr/share/pkgconfig
  export LD_LIBRARY_PATH=$prefix/usr/lib/$arch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PATH=$PATH:$prefix/usr/bin
  cmake_extra+=("-DCMAKE_PREFIX_PATH=$prefix/usr" "-DCMAKE_INCLUDE_PATH=$prefix/usr/include"
                "-DCMAKE_LIBRARY_PATH=$prefix/usr/lib/$arch" "-DPKG_CONFIG_EXECUTABLE=$(command -v pkg-config || echo $prefix/usr/bin/pkgconf)")
fi

# 2. Configure and build only what the check runs (sm_90 only on an H200: half the nvcc time).
gen=()
command -v ninja > /dev/null && gen=(-G Ninja)
arch_cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d .)
step configure 120 cmake "${gen[@]}" -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOELAB_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${arch_cc:-90}" "${cmake_extra[@]}"
if [ "${MOELAB_DEVICE_CONFIGURE_ONLY:-0}" = 1 ]; then  # for testing the unpack + configure path off the GPU
  exit "$(awk -F'\t' '$1 == "configure" {print $2}' "$out/steps.tsv")"
fi
step build 300 cmake --build "$build" -j "$(nproc)" --target moelab moelab_cuda_tests moelab_bench_cuda

# 3. Device tests (kernels vs host, engine vs reference on every fixture).
step device_tests 90 "$build/tests/moelab_cuda_tests" --gtest_output="xml:$out/device_tests.xml"

# 4. The layer diff on every fixture model.
for m in "$here"/tests/fixtures/models/*/; do
  name=$(basename "$m")
  step "diff_$name" 30 "$build/moelab" diff --model "$m" --a ref --b cuda-nf4 --text "Mixture of experts" \
    --json "$out/diff_$name.json"
done

# 5. Benchmarks (each repetition short; Google Benchmark's JSON kept).
step bench 120 "$build/moelab_bench_cuda" --benchmark_min_time=0.2 --benchmark_out="$out/bench.json" \
  --benchmark_out_format=json

# 6. Summary.
{
  echo "# cuda-nf4 device check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit: $(git -C "$here" rev-parse --short HEAD 2>/dev/null)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  echo "- total time: $(( $(date +%s) - start )) s"
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$out/steps.tsv"
  echo
  echo "Device tests: $(grep -Eo '\[  (PASSED|FAILED|SKIPPED) *\] [0-9]+ tests?' "$out/device_tests.log" 2>/dev/null | tr '\n' ' ')"
  echo
  if [ -f "$out/bench.json" ]; then
    echo "| benchmark | time (us) | GB/s |"
    echo "|---|---|---|"
    python3 - "$out/bench.json" <<'PY' || true
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    gbs = b.get("bytes_per_second", 0) / 1e9
    print(f"| {b['name']} | {b.get('real_time', 0):.1f} | {gbs:.0f} |")
PY
  fi
} > "$summary"
echo "[device_check] summary: $summary"
cat "$summary"
