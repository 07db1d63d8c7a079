#!/bin/bash
# The one cuda-nf4 check for the GPU machine: configure and build the CUDA targets, run the device
# tests, `moelab diff --a ref --b cuda-nf4` on every fixture model (BF16 and FP32 products) and with each
# fixture LoRA adapter (FP32 products), the CUDA benchmarks (NF4 GEMV vs copy bandwidth and cuBLAS FP16,
# attention, the full-shape MoE layer, synthetic Mixtral-8x7B decode with the expert cache at all/6/4/2
# experts per layer) and `moelab profile --synthetic mixtral-8x7b` end to end.
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
  for act in bf16 fp32; do
    step "diff_${name}_$act" 30 "$build/moelab" diff --model "$m" --a ref --b cuda-nf4 --activations "$act" \
      --prompt "Mixture of experts" --json "$out/diff_${name}_$act.json"
  done
done

# 4b. The same with a LoRA adapter on both sides (cuda-nf4's unmerged LoRA path, FP32 products): the
# fixture adapters and their models. The device tests (step 3, CudaLora.*) assert the bounds; this is the
# CLI path end to end, its table in the log.
for a in "$here"/tests/fixtures/lora/*/; do
  name=$(basename "$a")
  case $name in mixtral-4e-gqa-f32*) m=mixtral-4e-gqa-f32 ;; *) m=mixtral-top1-swa ;; esac
  step "diff_lora_${name}" 30 "$build/moelab" diff --model "$here/tests/fixtures/models/$m" --a ref --b cuda-nf4 \
    --activations fp32 --adapter "$a" --prompt "Mixture of experts" --json "$out/diff_lora_${name}.json"
done

# 5. Benchmarks (each repetition short; Google Benchmark's JSON kept). The synthetic decode builds a
# 25 GB model per cache setting: it gets most of the time.
step bench 300 "$build/moelab_bench_cuda" --benchmark_min_time=0.2 --benchmark_out="$out/bench.json" \
  --benchmark_out_format=json

# 6. End to end through the CLI: the synthetic full-size model, all experts resident and 4 per layer.
step profile_synthetic 90 "$build/moelab" profile --synthetic mixtral-8x7b --engine cuda-nf4 --totals-only \
  --n-prompt 128 --n-gen 32 --repetitions 2 --context 1024 --json "$out/profile_synthetic.json"
step profile_synthetic_cache4 120 "$build/moelab" profile --synthetic mixtral-8x7b --engine cuda-nf4 --totals-only \
  --n-prompt 128 --n-gen 32 --repetitions 2 --context 1024 --gpu-expert-cache 4 --gpu-expert-prefetch \
  --json "$out/profile_synthetic_cache4.json"

# 7. Summary.
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
  for f in "$out"/profile_synthetic*.json; do
    [ -f "$f" ] && python3 - "$f" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
p = d["phases"]
line = f"- {sys.argv[1].split('/')[-1]}: prefill {p['prefill']['tokens'] / p['prefill']['wall_seconds']:.0f} tok/s"
if "decode" in p:
    line += f", decode {p['decode']['tokens'] / p['decode']['wall_seconds']:.1f} tok/s"
if "expert_cache" in d:
    c = d["expert_cache"]
    line += f", expert cache hit rate {100 * c['hit_rate']:.1f}%, {c['bytes_copied'] / 2**30:.1f} GiB copied"
print(line)
PY
  done
  echo
  echo "Device tests: $(grep -Eo '\[  (PASSED|FAILED|SKIPPED) *\] [0-9]+ tests?' "$out/device_tests.log" 2>/dev/null | tr '\n' ' ')"
  echo
  if [ -f "$out/bench.json" ]; then
    echo "| benchmark | time | GB/s | counters |"
    echo "|---|---|---|---|"
    python3 - "$out/bench.json" <<'PY' || true
import json, sys
skip = {"name", "run_name", "run_type", "repetitions", "repetition_index", "threads", "iterations", "real_time",
        "cpu_time", "time_unit", "bytes_per_second", "family_index", "per_family_instance_index", "items_per_second",
        "aggregate_name", "aggregate_unit", "error_occurred", "error_message"}
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    gbs = b.get("bytes_per_second", 0) / 1e9
    extra = ", ".join(f"{k} {v:.4g}" for k, v in b.items() if k not in skip and isinstance(v, (int, float)))
    print(f"| {b['name']} | {b.get('real_time', 0):.1f} {b.get('time_unit', '')} | {gbs:.0f} | {extra} |")
PY
  fi
} > "$summary"
echo "[device_check] summary: $summary"
cat "$summary"
