#!/bin/bash
# The cuda-nf4 check for the GPU machine, in one device call of at most 10 minutes each:
#
#   scripts/device_check.sh OUTDIR                        configure, build `moelab` + `moelab_cuda_tests`,
#                                                         the device tests, `moelab diff --a ref --b cuda-nf4`
#                                                         on every fixture model (BF16 and FP32 products) and
#                                                         with each fixture LoRA adapter (FP32)
#   MOELAB_DEVICE_BENCH=1 scripts/device_check.sh OUTDIR  a second call while the machine is warm (build-device/
#                                                         is kept): build `moelab_bench_cuda`, the CUDA benchmarks
#                                                         and `moelab profile --synthetic mixtral-8x7b`
#
# Off the GPU, to test the dependency path (unpack .device-debs, configure against that prefix only):
#   MOELAB_DEVICE_CONFIGURE_ONLY=1   configure with MOELAB_CUDA=ON (needs nvcc), then stop
#   MOELAB_DEVICE_CPU_BUILD=1        configure with MOELAB_CUDA=OFF, build `moelab`, run `moelab --version`
#   (MOELAB_DEVICE_JOBS: build jobs, default all cores; MOELAB_DEVICE_BUILD: build folder, default build-device/)
#
# Logs go to a working folder (build-device-check/, git-ignored); OUTDIR gets summary.md, appended as each
# step ends (a row: exit code, seconds; a failed step's last log lines) so a call cut short still reports,
# and device_check.tgz (the working folder), rewritten after each step: the device tool brings back at most
# 8 files. Every step has a timeout, clipped to a budget for the whole call (MOELAB_DEVICE_BUDGET_S, default
# 540 s, under the tool's 600 s; an hour in the two test modes); a failed step is recorded and the script goes on. Exit 1 when any step failed.
#
# The GPU machine has only its CUDA image (nvcc, cmake, ninja, Python) and reaches no registry: the Debian
# packages fetched by scripts/fetch_device_debs.sh into .device-debs/ (send it with `carry`) are unpacked
# with `dpkg -x` into .device-prefix/, fixed up to live there (below), and the build is pointed at it.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: scripts/device_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
build=${MOELAB_DEVICE_BUILD:-$here/build-device}
work=$here/build-device-check
prefix=$here/.device-prefix
summary=$out/summary.md
start=$(date +%s)
mode=check
[ "${MOELAB_DEVICE_BENCH:-0}" = 1 ] && mode=bench
[ "${MOELAB_DEVICE_CONFIGURE_ONLY:-0}" = 1 ] && mode=configure
[ "${MOELAB_DEVICE_CPU_BUILD:-0}" = 1 ] && mode=cpu-build
case $mode in check|bench) budget=${MOELAB_DEVICE_BUDGET_S:-540} ;; *) budget=${MOELAB_DEVICE_BUDGET_S:-3600} ;; esac
rm -rf "$work"
mkdir -p "$work"
failed=0

pack() {  # the working folder into OUTDIR/device_check.tgz (temp, then renamed)
  tar -czf "$out/device_check.tgz.tmp" -C "$(dirname "$work")" "$(basename "$work")" 2> /dev/null &&
    mv "$out/device_check.tgz.tmp" "$out/device_check.tgz"
}

{
  echo "# cuda-nf4 device check ($mode)"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit: $(git -C "$here" rev-parse --short HEAD 2> /dev/null || echo unknown)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null | head -n 1)"
  # shellcheck disable=SC1091
  echo "- host: $(. /etc/os-release 2> /dev/null && echo "$PRETTY_NAME"), $(nproc) cores, $(c++ --version 2> /dev/null | head -n 1)," \
       "$(nvcc --version 2> /dev/null | tail -n 1), $(cmake --version | head -n 1)"
  echo
} > "$summary"
table_head() { echo "| step | exit | seconds |"; echo "|---|---|---|"; }
table_head >> "$summary"

step() {  # step NAME TIMEOUT_S CMD...: CMD under a timeout (clipped to the budget), log in WORK/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$(( budget - ($(date +%s) - start) - 10 )) t0 rc
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  if [ "$limit" -lt 5 ]; then  # one row, no log tail: the steps after it say the same
    echo "not run: the call's budget (${budget} s) is spent" > "$work/$name.log"
    printf '%s\t%s\t%s\n' "$name" "not-run" 0 >> "$work/steps.tsv"
    echo "| $name | not run (budget spent) | 0 |" >> "$summary"
    echo "[device_check] $name: not run (budget spent)"
    failed=1
    return 124
  elif declare -F "$1" > /dev/null; then  # a function of this script (no timeout: it runs no program that waits)
    "$@" > "$work/$name.log" 2>&1
    rc=$?
  else
    timeout -k 5 "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
  fi
  local secs=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$work/steps.tsv"
  echo "| $name | $rc$([ "$rc" = 124 ] && echo ' (timeout)') | $secs |" >> "$summary"
  echo "[device_check] $name: rc=$rc ($secs s)"
  if [ "$rc" != 0 ]; then
    failed=1
    { echo; echo "<details><summary>$name: last lines of $name.log</summary>"; echo; echo '```'
      tail -n 25 "$work/$name.log" | cut -c 1-300; echo '```'; echo "</details>"; echo; table_head; } >> "$summary"
  fi
  pack
  return "$rc"
}

# ---- 1. Dependencies: the fetched .debs, unpacked once into the prefix and made to work from there. ----
arch=$(gcc -print-multiarch 2> /dev/null || true)
arch=${arch:-x86_64-linux-gnu}  # (gcc may succeed and print nothing)
# Never unpacked, whatever .device-debs holds: the C library, its headers and the compiler's runtime
# belong to the image (bookworm's libstdc++ ahead of the image's on LD_LIBRARY_PATH: "GLIBCXX_3.4.32 not
# found"; bookworm's glibc headers ahead of the image's: a mismatched libc). fetch_device_debs.sh leaves
# them out too.
base_pkgs=" libc6 libc6-dev libc-dev-bin linux-libc-dev libcrypt1 libcrypt-dev libstdc++6 libgcc-s1 zlib1g
  rpcsvc-proto libnsl2 libnsl-dev libtirpc3 libtirpc-dev libtirpc-common libgomp1 libatomic1 libzstd1 "
base_pkgs=" $(echo "$base_pkgs" | tr -s " \n" "  ") "

# shellcheck disable=SC2317  # called from unpack_prefix
system_lib() {  # system_lib SONAME: where the image's loader finds it (not the prefix), else nothing
  ldconfig -p 2> /dev/null | awk -v s="$1" -v p="$prefix/" \
    '$1 == s && /x86-64/ && index($NF, p) != 1 {print $NF; exit}'
}

# shellcheck disable=SC2317  # called through step
unpack_prefix() {
  local tmp=$prefix.tmp d pkg f l t soname sys n_sys=0 n_rel=0 n_drop=0
  rm -rf "$tmp" "$prefix"
  mkdir -p "$tmp"
  for d in "$here"/.device-debs/*.deb; do
    if command -v dpkg-deb > /dev/null; then
      pkg=$(dpkg-deb -f "$d" Package)
    else
      pkg=$(basename "$d"); pkg=${pkg%%_*}
    fi
    case "$base_pkgs" in *" $pkg "*) echo "skipped (the image's own): $pkg"; continue ;; esac
    case "$pkg" in gcc-*-base|libgcc-*|libstdc++*) echo "skipped (the image's own): $pkg"; continue ;; esac
    if command -v dpkg-deb > /dev/null; then
      dpkg-deb -x "$d" "$tmp" || { echo "dpkg-deb -x failed: $d"; return 1; }
    else  # a .deb is an ar archive holding data.tar.*
      (cd "$tmp" && ar p "$d" "$(ar t "$d" | grep '^data\.tar')" | tar -x -a -f - 2> /dev/null ||
        ar p "$d" "$(ar t "$d" | grep '^data\.tar')" | tar -x -J -f - ||
        ar p "$d" "$(ar t "$d" | grep '^data\.tar')" | tar -x --zstd -f -) || { echo "unpack failed: $d"; return 1; }
    fi
    echo "unpacked: $pkg"
  done
  # h5cc and friends print bookworm's /usr/include/hdf5/serial, which the image lacks: without them
  # FindHDF5 searches CMAKE_PREFIX_PATH (the prefix) itself.
  rm -f "$tmp"/usr/bin/h5cc* "$tmp"/usr/bin/h5c++* "$tmp"/usr/bin/h5fc* "$tmp"/usr/bin/h5pcc* "$tmp"/usr/bin/h5pfc*
  rm -rf "$tmp/usr/share/doc"
  # Absolute link targets name bookworm's /usr (zlib1g-dev's libz.so -> /lib/.../libz.so.1.2.13): the
  # prefix's copy where it has one.
  while IFS= read -r -d '' l; do
    t=$(readlink "$l")
    if [ "${t#/}" != "$t" ] && [ -e "$tmp$t" ]; then ln -sfn "$tmp$t" "$l"; n_rel=$((n_rel + 1)); fi
  done < <(find "$tmp" -type l -print0)
  # Runtime libraries the image already has (same soname): the file becomes a link to the image's copy
  # (usually newer; a soname promises the same ABI), so the prefix on LD_LIBRARY_PATH shadows none of the
  # image's own programs (cmake, cc1plus, python3) and the -dev links and CMake files that name the file
  # (fmt-targets.cmake names libfmt.so.9.1.0) still find one. Only the multiarch folders: OpenBLAS's and
  # HDF5's subfolders are the prefix's by design.
  for f in "$tmp"/usr/lib/"$arch"/lib*.so.* "$tmp"/lib/"$arch"/lib*.so.*; do
    if [ ! -f "$f" ] || [ -L "$f" ]; then continue; fi
    soname=$(objdump -p "$f" 2> /dev/null | awk '$1 == "SONAME" {print $2}')
    sys=
    [ -n "$soname" ] && sys=$(system_lib "$soname")
    [ -n "$sys" ] || continue
    ln -sfn "$sys" "$f"
    n_sys=$((n_sys + 1))
  done
  echo "libraries the image has too (same soname), linked to the image's: $n_sys"
  # A link that still resolves nowhere (its library is the image's, in another version): the image's library
  # of that soname (libz.so.1.2.13, else libz.so.1.2, else libz.so.1); else it is dropped.
  while IFS= read -r -d '' l; do
    [ -e "$l" ] && continue
    t=$(readlink "$l")
    soname=$(basename "$t")
    sys=
    while [ -z "$sys" ]; do
      sys=$(system_lib "$soname")
      case "$soname" in *.so.*.*) soname=${soname%.*} ;; *) break ;; esac
    done
    if [ -n "$sys" ]; then
      ln -sfn "$sys" "$l"; n_rel=$((n_rel + 1))
    else
      echo "dropped a link that resolves nowhere: ${l#"$tmp"/} -> $t"; rm -f "$l"; n_drop=$((n_drop + 1))
    fi
  done < <(find "$tmp" -type l -print0)
  echo "links re-pointed: $n_rel, dropped: $n_drop"
  # pkg-config files name /usr: make them name the prefix (no PKG_CONFIG_SYSROOT_DIR, whose -I paths
  # pkgconf may drop as system folders).
  find "$tmp" -name '*.pc' -print0 | xargs -0 -r sed -i -E "s#^([A-Za-z_]+)=/usr#\1=$prefix/usr#; s#(-[IL])/usr/#\1$prefix/usr/#g"
  # No glibc or libstdc++ headers or libraries, whatever came in.
  rm -f "$tmp"/usr/lib/"$arch"/libstdc++* "$tmp"/usr/lib/"$arch"/libgcc_s* "$tmp"/lib/"$arch"/libgcc_s*
  if [ -e "$tmp/usr/include/stdio.h" ]; then echo "the prefix holds glibc's headers: refusing"; return 1; fi
  touch "$tmp/.unpacked"
  mv "$tmp" "$prefix"
  # The links above that name $tmp now name $prefix.
  while IFS= read -r -d '' l; do
    t=$(readlink "$l")
    case "$t" in "$tmp"/*) ln -sfn "$prefix${t#"$tmp"}" "$l" ;; esac
  done < <(find "$prefix" -type l -print0)
  du -sh "$prefix"
}

cmake_extra=()
if ls "$here"/.device-debs/*.deb > /dev/null 2>&1; then
  if [ ! -f "$prefix/.unpacked" ]; then
    step unpack 120 unpack_prefix || true
  fi
  if [ -f "$prefix/.unpacked" ]; then
    blas=$prefix/usr/lib/$arch/openblas-pthread
    export PKG_CONFIG_PATH=$prefix/usr/lib/$arch/pkgconfig:$prefix/usr/share/pkgconfig
    # The prefix's libraries for the linker's indirect needs and at run time (gtest_discover_tests runs the
    # test binary at build time). The image's base libraries are not in the prefix (above), so nothing of
    # the image's is shadowed.
    export LD_LIBRARY_PATH=$prefix/usr/lib/$arch:$prefix/lib/$arch:$blas:$prefix/usr/lib/$arch/hdf5/serial${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export PATH=$PATH:$prefix/usr/bin
    pkgcfg=$(command -v pkg-config || echo "$prefix/usr/bin/pkgconf")
    # OpenBLAS: CMakeLists.txt looks only in Debian's openblas-pthread folders; set, these cache variables
    # skip that search. HDF5: Debian's serial folder, whose include/ and lib/ links FindHDF5 follows
    # (its h5cc wrapper, which names bookworm's /usr, was removed above).
    cmake_extra+=("-DCMAKE_PREFIX_PATH=$prefix/usr" "-DCMAKE_INCLUDE_PATH=$prefix/usr/include"
                  "-DCMAKE_LIBRARY_PATH=$prefix/usr/lib/$arch" "-DPKG_CONFIG_EXECUTABLE=$pkgcfg"
                  "-DOPENBLAS_LIBRARY=$blas/libopenblas.so"
                  "-DOPENBLAS_INCLUDE_DIR=$prefix/usr/include/$arch/openblas-pthread"
                  "-DHDF5_ROOT=$prefix/usr/lib/$arch/hdf5/serial" "-DHDF5_NO_FIND_PACKAGE_CONFIG_FILE=ON")
    # The multiarch include folder (openssl/opensslconf.h, which httplib.h reaches) is a default search
    # folder of the compiler under /usr, not under the prefix; pkg-config drops it as a system folder.
    # Searched after everything else, and it holds no glibc headers (above).
    for lang in C CXX CUDA; do
      cmake_extra+=("-DCMAKE_${lang}_STANDARD_INCLUDE_DIRECTORIES=$prefix/usr/include/$arch")
    done
  fi
fi

# ---- 2. Configure and build only what this call runs (the device's own compute capability: sm_90 on an
# H200, one nvcc pass per file). ----
gen=()
command -v ninja > /dev/null && gen=(-G Ninja)
arch_cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d .)
cuda=ON
[ "$mode" = cpu-build ] && cuda=OFF
step configure 120 cmake "${gen[@]}" -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOELAB_CUDA=$cuda \
  -DCMAKE_CUDA_ARCHITECTURES="${arch_cc:-90}" "${cmake_extra[@]}"
configured=$?
# Where each dependency was found (the prefix, or the image), for the record.
grep -E '^((OPENBLAS|HDF5|ZLIB|BZIP2)_[^:]*|[A-Za-z0-9_]+_DIR|PKG_CONFIG_EXECUTABLE|CMAKE_CUDA_COMPILER|CMAKE_CXX_COMPILER):(PATH|FILEPATH|UNINITIALIZED)=|^(SENTENCEPIECE|HTTPLIB)_(INCLUDEDIR|LIBDIR):' \
  "$build/CMakeCache.txt" 2> /dev/null | grep -v NOTFOUND > "$work/found.txt"

finish() {
  echo >> "$summary"
  echo "- total time: $(( $(date +%s) - start )) s; logs in device_check.tgz" >> "$summary"
  pack
  echo "[device_check] summary: $summary"
  cat "$summary"
  exit "$failed"
}

if [ "$mode" = configure ] || [ "$configured" != 0 ]; then
  finish
fi
jobs=${MOELAB_DEVICE_JOBS:-$(nproc)}

if [ "$mode" = cpu-build ]; then
  step build 1500 cmake --build "$build" -j "$jobs" --target moelab || finish
  step moelab_version 30 "$build/moelab" --version
  finish
fi

if [ "$mode" = check ]; then
  step build 300 cmake --build "$build" -j "$jobs" --target moelab moelab_cuda_tests || finish

  # ---- 3. Device tests (kernels vs host, engine vs reference on every fixture). ----
  step device_tests 240 "$build/tests/moelab_cuda_tests" --gtest_output="xml:$work/device_tests.xml"
  {
    echo
    echo "Device tests: $(grep -Eo '\[  (PASSED|FAILED|SKIPPED) *\] [0-9]+ tests?' "$work/device_tests.log" 2> /dev/null | tr '\n' ' ')"
    if grep -q '^\[  FAILED  \]' "$work/device_tests.log" 2> /dev/null; then
      echo
      echo "Failed tests and their messages:"
      echo
      echo '```'
      grep '^\[  FAILED  \] [A-Za-z_]' "$work/device_tests.log" | sed 's/ ([0-9]* ms)$//' | sort -u | head -n 60
      echo
      # Each failure's message: from gtest's "file:line: Failure" to the next "[ ... ]" line.
      awk '/: Failure$/ {on = 1} /^\[ / {on = 0} on' "$work/device_tests.log" | cut -c 1-300 | head -n 200
      echo '```'
    fi
    echo
    table_head
  } >> "$summary"

  # ---- 4. The layer diff on every fixture model, BF16 and FP32 products. ----
  for m in "$here"/tests/fixtures/models/*/; do
    name=$(basename "$m")
    for act in bf16 fp32; do
      step "diff_${name}_$act" 30 "$build/moelab" diff --model "$m" --a ref --b cuda-nf4 --activations "$act" \
        --prompt "Mixture of experts" --json "$work/diff_${name}_$act.json"
    done
  done
  # 4b. With a LoRA adapter on both sides (cuda-nf4's unmerged LoRA path, FP32 products). The device tests
  # (CudaLora.*) assert the bounds; this is the CLI path end to end, its table in the log.
  for a in "$here"/tests/fixtures/lora/*/; do
    name=$(basename "$a")
    case $name in mixtral-4e-gqa-f32*) m=mixtral-4e-gqa-f32 ;; *) m=mixtral-top1-swa ;; esac
    step "diff_lora_${name}" 30 "$build/moelab" diff --model "$here/tests/fixtures/models/$m" --a ref --b cuda-nf4 \
      --activations fp32 --adapter "$a" --prompt "Mixture of experts" --json "$work/diff_lora_${name}.json"
  done
  finish
fi

# ---- mode bench: benchmarks and the end-to-end profile (a second call; build-device/ is kept). ----
step build 300 cmake --build "$build" -j "$jobs" --target moelab moelab_bench_cuda || finish
# The end-to-end profiles (prefill and decode tokens/s of the full-size synthetic model) come first, so a
# slow build cannot crowd them out; the kernel benchmarks (each repetition short, Google Benchmark JSON kept)
# take what is left of the budget.
step profile_synthetic 90 "$build/moelab" profile --synthetic mixtral-8x7b --engine cuda-nf4 --totals-only \
  --n-prompt 128 --n-gen 32 --repetitions 2 --context 1024 --json "$work/profile_synthetic.json"
step profile_synthetic_cache4 120 "$build/moelab" profile --synthetic mixtral-8x7b --engine cuda-nf4 --totals-only \
  --n-prompt 128 --n-gen 32 --repetitions 2 --context 1024 --gpu-expert-cache 4 --gpu-expert-prefetch \
  --json "$work/profile_synthetic_cache4.json"
step bench 300 "$build/moelab_bench_cuda" --benchmark_min_time=0.2 --benchmark_out="$work/bench.json" \
  --benchmark_out_format=json
{
  echo
  for f in "$work"/profile_synthetic*.json; do
    [ -f "$f" ] || continue
    python3 - "$f" <<'PY' || true
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
  if [ -f "$work/bench.json" ]; then
    echo "| benchmark | time | GB/s | counters |"
    echo "|---|---|---|---|"
    python3 - "$work/bench.json" <<'PY' || true
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
} >> "$summary"
finish
