#!/usr/bin/env bash
# moelab cpu-nf4 against llama.cpp on the CPU, side by side, on a Mixtral-8x7B-shaped checkpoint
# (dev tier: needs PyPI, ~40 GB of disk for 4 layers (~5 GB venv), and a quiet machine for figures worth keeping).
#
#   scripts/bench_vs_llamacpp.sh [--layers N] [--threads T] [--rounds R] [--reps K] [--out DIR]
#                                [--skip-build] [--keep] [--nice N] [--jobs J] [--moelab-arg ARG]...
#                                [--llama-arg ARG]... [--lm-head-bytes B] [--nf4-absmax-bytes B]
#
# Steps (each one's output is cached under .bench-cache/ (git-ignored) and skipped when present):
#   1. llama.cpp: `llama-bench` and `llama-quantize` only (CPU, GGML_NATIVE=ON, Release), built from the
#      llama.cpp vendored in the llama-cpp-python 0.3.36 sdist from PyPI (`pip download`).
#   2. A Mixtral-8x7B-shaped checkpoint with N layers: the real geometry, random BF16 weights
#      (normal * 0.02, norms 1), HF MixtralForCausalLM names, the real Mixtral tokenizer
#      (scripts/bench_make_checkpoint.py, ~2.9 GB per layer + 0.5 GB). `moelab inspect` must accept it.
#   3. llama.cpp's own converter (convert_hf_to_gguf.py, in a separate venv .bench-cache/venv with
#      torch 2.11.0 from PyPI, ~4 GB with its CUDA dependencies, and the vendored gguf-py) to a BF16 GGUF,
#      then `llama-quantize` to Q4_0, IQ4_NL and Q4_K_M.
#   4. `moelab quantize` to NF4 (double quantization, the tool's defaults).
#   5. R interleaved rounds: in each, the read-bandwidth probe (moelab_bench ReadBandwidth, with
#      OMP_NUM_THREADS=T), then llama.cpp Q4_0, moelab cpu-nf4, llama.cpp IQ4_NL, Q4_K_M, moelab cpu-nf4
#      (A B C D B), a closing probe after the last round; `cat /proc/loadavg` before every run.
#      llama.cpp: `llama-bench -m X -p 128,512 -n 32 -t T -r K -o json`;
#      moelab:    `moelab profile --engine cpu-nf4 --n-prompt 128 --n-gen 32 --threads T --repetitions K
#                  --totals-only` and `--n-prompt 512 --n-gen 0` (decode after a 128-token prompt, where
#                  llama-bench's tg32 starts from an empty context: a small difference in attention only).
#      Peak RSS: GNU time's maximum resident set size of the measured run (file pages of the mmap'd
#      weights included). Load: wall time of a separate run that loads the model and computes one token
#      (llama-bench -p 0 -n 1 -r 1 --no-warmup; moelab profile --n-prompt 1 --n-gen 0 --repetitions 1 --warmup 0),
#      page cache warm.
#   6. One markdown table (printed, and in OUT/results.md with OUT/results.json and the raw files under
#      OUT/raw/): decode and prefill tok/s, weight bytes read per decoded token (from the stored tensors:
#      every non-expert tensor, top-2/8 of the expert tensors, one embedding row; llama.cpp's GGUF tensors
#      as stored; moelab's NF4 codes as stored, its absmax and lm_head as the engine holds them: see
#      --nf4-absmax-bytes, --lm-head-bytes), GB/s at the decode rate and its fraction of the probe, peak
#      RSS, load time, ratios moelab / llama.cpp. Table code: scripts/bench_vs_llamacpp_report.py.
#
# Options:
#   --layers N        decoder layers of the shaped checkpoint (default 4)
#   --formats LIST    llama.cpp formats, comma-separated, first one first in each round (default
#                     Q4_0,IQ4_NL,Q4_K_M; IQ4_NL quantizes slowly: ~9 minutes a layer here)
#   --threads T       threads for both engines and the probe (default: nproc)
#   --rounds R        interleaved rounds (default 2)
#   --reps K          repetitions inside each run (llama-bench -r, moelab profile --repetitions; default 3)
#   --out DIR         results folder (default .bench-cache/results-<UTC time>)
#   --skip-build      build nothing: use build/moelab, build/moelab_bench and the cached llama.cpp as they are
#                     (without it, moelab and moelab_bench are rebuilt under flock $MOELAB_BUILD_LOCK,
#                     default /tmp/moelab-build.lock, in $MOELAB_BUILD_DIR, default build/)
#   --keep            keep the BF16 intermediates (checkpoint and GGUF, ~12 + 12 GB at 4 layers); by default
#                     they are deleted after the quantized models exist (re-runs need only those)
#   --nice N          run the builds, the checkpoint writer, the conversion and the quantizations under
#                     `nice -n N` (not the measured runs; default: no nice)
#   --jobs J          parallel jobs for the moelab and llama.cpp builds (default: nproc)
#   --lm-head-bytes B bytes per weight of moelab's lm_head and embedding in memory, for the bytes-per-token
#                     row (default auto: from cpu-nf4's "loaded in" line, q8 -> 1 + 4/hidden, bf16 -> 2,
#                     fp32 -> 4, and 4 when the line names no lm_head format)
#   --nf4-absmax-bytes B  bytes per NF4 block scale in memory, same row (default auto: 1 with int8
#                     activations, whose kernels decode the double-quantized absmax on the fly, 4.127 bits
#                     per weight; 4 otherwise (absmax expanded to FP32, 4.5 bits per weight))
#   --moelab-arg ARG  one more argument for every `moelab profile` run (repeatable; e.g. --moelab-arg
#                     --kernels --moelab-arg avx2)
#   --llama-arg ARG   one more argument for every `llama-bench` run (repeatable; e.g. --llama-arg --repack
#                     --llama-arg 0)
#   -h, --help        this text
#
# Environment: PYTHON (a python with numpy for the checkpoint writer and pip for the download; default
# .venv/bin/python), MOELAB_BENCH_CACHE (default .bench-cache), MOELAB_BUILD_DIR, MOELAB_BUILD_LOCK.
# Needs: cmake, a C/C++ compiler, GNU time (/usr/bin/time, Debian package `time`), network access to PyPI
# for the first run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MOELAB_BENCH_CACHE:-$ROOT/.bench-cache}"
BUILD_DIR="${MOELAB_BUILD_DIR:-$ROOT/build}"
BUILD_LOCK="${MOELAB_BUILD_LOCK:-/tmp/moelab-build.lock}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
LLAMA_CPP_PY_VERSION="0.3.36"
TORCH_VERSION="2.11.0"
TRANSFORMERS_VERSION="4.57.6"
TOKENIZER="$ROOT/tests/fixtures/tokenizers/mixtral-8x7b-v0.1.model"
GNU_TIME=/usr/bin/time
LLAMA_FORMATS=(Q4_0 IQ4_NL Q4_K_M)

LAYERS=4
THREADS="$(nproc)"
ROUNDS=2
REPS=3
OUT=""
SKIP_BUILD=0
KEEP=0
NICE=""
JOBS="$(nproc)"
LM_HEAD_BYTES=auto
ABSMAX_BYTES=auto
MOELAB_EXTRA=()
LLAMA_EXTRA=()
ORIG_ARGS=("$@")

usage() { sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { printf 'bench_vs_llamacpp: error: %s\n' "$*" >&2; exit 1; }
log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
need_value() { [[ $# -ge 2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) need_value "$@"; LAYERS="$2"; shift 2 ;;
    --formats) need_value "$@"; IFS=, read -r -a LLAMA_FORMATS <<< "$2"; shift 2 ;;
    --threads) need_value "$@"; THREADS="$2"; shift 2 ;;
    --rounds) need_value "$@"; ROUNDS="$2"; shift 2 ;;
    --reps) need_value "$@"; REPS="$2"; shift 2 ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --keep) KEEP=1; shift ;;
    --nice) need_value "$@"; NICE="$2"; shift 2 ;;
    --jobs) need_value "$@"; JOBS="$2"; shift 2 ;;
    --lm-head-bytes) need_value "$@"; LM_HEAD_BYTES="$2"; shift 2 ;;
    --nf4-absmax-bytes) need_value "$@"; ABSMAX_BYTES="$2"; shift 2 ;;
    --moelab-arg) need_value "$@"; MOELAB_EXTRA+=("$2"); shift 2 ;;
    --llama-arg) need_value "$@"; LLAMA_EXTRA+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for f in "${LLAMA_FORMATS[@]}"; do
  case "$f" in Q4_0|IQ4_NL|Q4_K_M) ;; *) die "--formats takes Q4_0, IQ4_NL, Q4_K_M (comma-separated), got '$f'" ;; esac
done
for v in LAYERS THREADS ROUNDS REPS JOBS; do
  if ! is_uint "${!v}" || [[ "${!v}" -lt 1 ]]; then die "--${v,,} must be a positive integer, got '${!v}'"; fi
done
[[ -z "$NICE" ]] || [[ "$NICE" =~ ^-?[0-9]+$ ]] || die "--nice must be an integer, got '$NICE'"
[[ "$LM_HEAD_BYTES" == auto || "$LM_HEAD_BYTES" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--lm-head-bytes must be a number, got '$LM_HEAD_BYTES'"
[[ "$ABSMAX_BYTES" == auto || "$ABSMAX_BYTES" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--nf4-absmax-bytes must be a number, got '$ABSMAX_BYTES'"
[[ -n "$OUT" ]] || OUT="$CACHE/results-$(date -u +%Y%m%dT%H%M%SZ)"

# Heavy steps (not the measured runs) under nice when asked.
NICE_PREFIX=()
[[ -z "$NICE" ]] || NICE_PREFIX=(nice -n "$NICE")
heavy() { "${NICE_PREFIX[@]}" "$@"; }

[[ -x "$GNU_TIME" ]] || die "$GNU_TIME (GNU time) is missing: apt-get install time"
command -v cmake >/dev/null || die "cmake is missing"
[[ -f "$TOKENIZER" ]] || die "tokenizer fixture missing: $TOKENIZER"

MOELAB="$BUILD_DIR/moelab"
MOELAB_BENCH="$BUILD_DIR/moelab_bench"
SDIST_DIR="$CACHE/src"
LLAMA_SRC="$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PY_VERSION/vendor/llama.cpp"
LLAMA_BUILD="$CACHE/llama-build"
LLAMA_BENCH="$LLAMA_BUILD/bin/llama-bench"
LLAMA_QUANTIZE="$LLAMA_BUILD/bin/llama-quantize"
VENV="$CACHE/venv"
CKPT="$CACHE/mixtral-shaped-L$LAYERS"
NF4="$CACHE/mixtral-shaped-L$LAYERS-nf4"
GGUF_DIR="$CACHE/gguf-L$LAYERS"
GGUF_BF16="$GGUF_DIR/mixtral-shaped-L$LAYERS-BF16.gguf"
RAW="$OUT/raw"
mkdir -p "$CACHE" "$RAW"
OUT="$(cd "$OUT" && pwd)"
RAW="$OUT/raw"

STEP_TIMES="$RAW/steps.tsv"
: > "$STEP_TIMES"
STEP_NAME=""
STEP_T0=0
step() { STEP_NAME="$1"; STEP_T0=$SECONDS; log "== $1"; }
step_done() {
  local dt=$((SECONDS - STEP_T0))
  printf '%s\t%s\t%s\n' "$STEP_NAME" "$dt" "${1:-ran}" >> "$STEP_TIMES"
  log "   $STEP_NAME: ${1:-done} (${dt} s)"
}

log "results: $OUT; cache: $CACHE; layers $LAYERS, threads $THREADS, rounds $ROUNDS, reps $REPS"

# ---- 0. moelab ------------------------------------------------------------------------------------
step "moelab build"
if [[ "$SKIP_BUILD" -eq 1 ]]; then
  step_done "skipped (--skip-build)"
else
  lock=()
  if command -v flock >/dev/null; then lock=(flock "$BUILD_LOCK"); fi
  mkdir -p "$CACHE/logs"
  log "   ${lock[*]} cmake --build $BUILD_DIR -j $JOBS --target moelab moelab_bench (log: $CACHE/logs/moelab-build.log)"
  heavy "${lock[@]}" cmake --build "$BUILD_DIR" -j "$JOBS" --target moelab moelab_bench > "$CACHE/logs/moelab-build.log" 2>&1 \
    || { tail -30 "$CACHE/logs/moelab-build.log" >&2; die "moelab build failed"; }
  step_done
fi
[[ -x "$MOELAB" && -x "$MOELAB_BENCH" ]] || die "$MOELAB or $MOELAB_BENCH missing (build them, or drop --skip-build)"

# ---- 1. llama.cpp -----------------------------------------------------------------------------------
step "llama.cpp build"
if [[ -x "$LLAMA_BENCH" && -x "$LLAMA_QUANTIZE" && -f "$LLAMA_BUILD/.complete" ]]; then
  step_done "cached ($LLAMA_BUILD)"
else
  [[ "$SKIP_BUILD" -eq 0 ]] || die "--skip-build, but no cached llama.cpp build in $LLAMA_BUILD"
  if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    sdist="$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz"
    if [[ ! -f "$sdist" ]]; then
      log "   pip download llama-cpp-python==$LLAMA_CPP_PY_VERSION (sdist)"
      # --no-binary only for llama-cpp-python: its build dependencies (for the metadata step) may be wheels.
      "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -d "$SDIST_DIR"
    fi
    [[ -f "$sdist" ]] || die "pip did not leave $sdist"
    tar -xzf "$sdist" -C "$SDIST_DIR"
    [[ -f "$LLAMA_SRC/CMakeLists.txt" ]] || die "no vendor/llama.cpp in $sdist"
  fi
  log "   configure (logs: $CACHE/logs/)"
  mkdir -p "$CACHE/logs"
  heavy cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DGGML_OPENMP=ON -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TOOLS=ON \
    > "$CACHE/logs/llama-configure.log" 2>&1 || { tail -30 "$CACHE/logs/llama-configure.log" >&2; die "llama.cpp configure failed"; }
  log "   build llama-bench llama-quantize (-j $JOBS)"
  heavy cmake --build "$LLAMA_BUILD" -j "$JOBS" --target llama-bench llama-quantize \
    > "$CACHE/logs/llama-build.log" 2>&1 || { tail -30 "$CACHE/logs/llama-build.log" >&2; die "llama.cpp build failed"; }
  [[ -x "$LLAMA_BENCH" && -x "$LLAMA_QUANTIZE" ]] || die "llama.cpp build left no $LLAMA_BENCH / $LLAMA_QUANTIZE"
  printf 'llama-cpp-python %s\n' "$LLAMA_CPP_PY_VERSION" > "$LLAMA_BUILD/.complete"
  step_done
fi

# ---- 2. checkpoint ----------------------------------------------------------------------------------
# The BF16 checkpoint is needed only while a quantized form is missing.
need_ckpt=0
[[ -f "$NF4/.complete" ]] || need_ckpt=1
for f in "${LLAMA_FORMATS[@]}"; do [[ -f "$GGUF_DIR/mixtral-shaped-L$LAYERS-$f.gguf" ]] || need_ckpt=1; done
step "checkpoint ($LAYERS layers)"
if [[ "$need_ckpt" -eq 0 ]]; then
  step_done "not needed (every quantized model is cached)"
elif [[ -f "$CKPT/.complete" ]]; then
  step_done "cached ($CKPT)"
else
  rm -rf "$CKPT.partial"
  heavy "$PYTHON" "$ROOT/scripts/bench_make_checkpoint.py" --out "$CKPT.partial" --layers "$LAYERS" \
    --tokenizer "$TOKENIZER"
  rm -rf "$CKPT"
  mv "$CKPT.partial" "$CKPT"
  "$MOELAB" inspect --model "$CKPT" > "$RAW/inspect-bf16.txt" || { cat "$RAW/inspect-bf16.txt" >&2; die "moelab inspect rejects $CKPT"; }
  printf 'layers %s\n' "$LAYERS" > "$CKPT/.complete"
  step_done
fi

# ---- 3. llama.cpp conversion and quantization -------------------------------------------------------
step "converter venv"
if [[ -f "$VENV/.complete" ]]; then
  step_done "cached ($VENV)"
else
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # torch from PyPI brings its CUDA libraries (~3 GB; it will not import without them); the converter
  # only uses it on the CPU. Pins: vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt.
  heavy "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" "numpy~=2.2.6" \
    "sentencepiece>=0.1.98,<0.3.0" "transformers==$TRANSFORMERS_VERSION" "protobuf>=4.21.0,<5.0.0" \
    "$LLAMA_SRC/gguf-py"
  "$VENV/bin/python" -c 'import torch, gguf, sentencepiece, transformers' || die "converter venv does not import"
  printf 'torch %s\n' "$TORCH_VERSION" > "$VENV/.complete"
  step_done
fi

step "convert to BF16 GGUF"
need_bf16=0
for f in "${LLAMA_FORMATS[@]}"; do [[ -f "$GGUF_DIR/mixtral-shaped-L$LAYERS-$f.gguf" ]] || need_bf16=1; done
if [[ "$need_bf16" -eq 0 ]]; then
  step_done "not needed (every GGUF is cached)"
elif [[ -f "$GGUF_BF16" ]]; then
  step_done "cached ($GGUF_BF16)"
else
  mkdir -p "$GGUF_DIR"
  heavy env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" "$LLAMA_SRC/convert_hf_to_gguf.py" "$CKPT" \
    --outtype bf16 --outfile "$GGUF_BF16.partial" > "$RAW/convert.log" 2>&1 \
    || { tail -30 "$RAW/convert.log" >&2; die "convert_hf_to_gguf.py failed (log: $RAW/convert.log)"; }
  mv "$GGUF_BF16.partial" "$GGUF_BF16"
  step_done
fi

for f in "${LLAMA_FORMATS[@]}"; do
  target="$GGUF_DIR/mixtral-shaped-L$LAYERS-$f.gguf"
  step "llama-quantize $f"
  if [[ -f "$target" ]]; then
    step_done "cached"
    continue
  fi
  heavy "$LLAMA_QUANTIZE" "$GGUF_BF16" "$target.partial" "$f" "$THREADS" > "$RAW/quantize-$f.log" 2>&1 \
    || { tail -30 "$RAW/quantize-$f.log" >&2; die "llama-quantize $f failed"; }
  mv "$target.partial" "$target"
  step_done
done

# ---- 4. moelab quantize -----------------------------------------------------------------------------
step "moelab quantize"
if [[ -f "$NF4/.complete" ]]; then
  step_done "cached ($NF4)"
else
  rm -rf "$NF4.partial"
  "$GNU_TIME" -v -o "$RAW/moelab-quantize.time" "${NICE_PREFIX[@]}" "$MOELAB" quantize --model "$CKPT" --output "$NF4.partial" \
    > "$RAW/moelab-quantize.log" 2>&1 || { tail -30 "$RAW/moelab-quantize.log" >&2; die "moelab quantize failed"; }
  rm -rf "$NF4"
  mv "$NF4.partial" "$NF4"
  "$MOELAB" inspect --model "$NF4" > "$RAW/inspect-nf4.txt" || { cat "$RAW/inspect-nf4.txt" >&2; die "moelab inspect rejects $NF4"; }
  printf 'layers %s\n' "$LAYERS" > "$NF4/.complete"
  step_done
fi

if [[ "$KEEP" -eq 0 ]]; then
  log "removing the BF16 intermediates (--keep keeps them): $CKPT $GGUF_BF16"
  rm -rf "$CKPT" "$GGUF_BF16"
fi

# ---- 5. interleaved rounds --------------------------------------------------------------------------
LOADAVG="$RAW/loadavg.tsv"
: > "$LOADAVG"
note_load() { printf '%s\t%s\t%s\n' "$(date -u +%H:%M:%S)" "$1" "$(cat /proc/loadavg)" >> "$LOADAVG"; }

probe() {  # $1: label
  note_load "probe $1"
  log "   bandwidth probe ($1)"
  # Prefix match: google-benchmark names it ReadBandwidth/real_time (UseRealTime).
  OMP_NUM_THREADS="$THREADS" "$MOELAB_BENCH" --benchmark_filter='^ReadBandwidth' --benchmark_format=json \
    > "$RAW/probe-$1.json" 2> "$RAW/probe-$1.err" || { cat "$RAW/probe-$1.err" >&2; die "bandwidth probe failed"; }
  grep -q '"bytes_per_second"' "$RAW/probe-$1.json" \
    || { cat "$RAW/probe-$1.err" >&2; die "bandwidth probe: no ReadBandwidth result in $RAW/probe-$1.json"; }
}

run_llama() {  # $1: format, $2: round
  local model="$GGUF_DIR/mixtral-shaped-L$LAYERS-$1.gguf" tag="llama-$1-r$2"
  note_load "$tag load"
  log "   $tag: load"
  "$GNU_TIME" -v -o "$RAW/$tag-load.time" "$LLAMA_BENCH" -m "$model" -p 0 -n 1 -r 1 --no-warmup -t "$THREADS" \
    "${LLAMA_EXTRA[@]}" -o json > "$RAW/$tag-load.json" 2> "$RAW/$tag-load.err" || { tail -20 "$RAW/$tag-load.err" >&2; die "$tag load run failed"; }
  note_load "$tag"
  log "   $tag: llama-bench -p 128,512 -n 32 -t $THREADS -r $REPS"
  "$GNU_TIME" -v -o "$RAW/$tag.time" "$LLAMA_BENCH" -m "$model" -p 128,512 -n 32 -t "$THREADS" -r "$REPS" \
    "${LLAMA_EXTRA[@]}" -o json > "$RAW/$tag.json" 2> "$RAW/$tag.err" || { tail -20 "$RAW/$tag.err" >&2; die "$tag failed"; }
}

run_moelab() {  # $1: round, $2: index within the round
  local tag="moelab-nf4-r$1-$2"
  local common=(profile --model "$NF4" --engine cpu-nf4 --threads "$THREADS" --totals-only "${MOELAB_EXTRA[@]}")
  note_load "$tag load"
  log "   $tag: load"
  "$GNU_TIME" -v -o "$RAW/$tag-load.time" "$MOELAB" "${common[@]}" --n-prompt 1 --n-gen 0 --repetitions 1 --warmup 0 \
    > "$RAW/$tag-load.txt" 2>&1 || { tail -20 "$RAW/$tag-load.txt" >&2; die "$tag load run failed"; }
  note_load "$tag p128"
  log "   $tag: profile --n-prompt 128 --n-gen 32 --repetitions $REPS"
  "$GNU_TIME" -v -o "$RAW/$tag-p128.time" "$MOELAB" "${common[@]}" --n-prompt 128 --n-gen 32 --repetitions "$REPS" \
    --json "$RAW/$tag-p128.json" > "$RAW/$tag-p128.txt" 2>&1 || { tail -20 "$RAW/$tag-p128.txt" >&2; die "$tag p128 failed"; }
  note_load "$tag p512"
  log "   $tag: profile --n-prompt 512 --n-gen 0 --repetitions $REPS"
  "$GNU_TIME" -v -o "$RAW/$tag-p512.time" "$MOELAB" "${common[@]}" --n-prompt 512 --n-gen 0 --repetitions "$REPS" \
    --json "$RAW/$tag-p512.json" > "$RAW/$tag-p512.txt" 2>&1 || { tail -20 "$RAW/$tag-p512.txt" >&2; die "$tag p512 failed"; }
}

step "rounds"
for ((r = 1; r <= ROUNDS; r++)); do
  log "-- round $r/$ROUNDS"
  probe "r$r"
  # A B (C D) B: moelab between llama.cpp formats, twice a round.
  run_llama "${LLAMA_FORMATS[0]}" "$r"
  run_moelab "$r" 1
  for f in "${LLAMA_FORMATS[@]:1}"; do run_llama "$f" "$r"; done
  run_moelab "$r" 2
done
probe "end"
note_load "end"
step_done

# ---- 6. report --------------------------------------------------------------------------------------
step "report"
model_args=()
for f in "${LLAMA_FORMATS[@]}"; do model_args+=(--gguf "$f=$GGUF_DIR/mixtral-shaped-L$LAYERS-$f.gguf"); done
{
  printf 'command\t%q' "$0"
  if [[ ${#ORIG_ARGS[@]} -gt 0 ]]; then printf ' %q' "${ORIG_ARGS[@]}"; fi
  printf ' (threads %s, rounds %s, reps %s)\n' "$THREADS" "$ROUNDS" "$REPS"
} > "$RAW/meta.tsv"
printf 'cpu\t%s\n' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" >> "$RAW/meta.tsv"
printf 'nproc\t%s\n' "$(nproc)" >> "$RAW/meta.tsv"
printf 'moelab_commit\t%s\n' "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" >> "$RAW/meta.tsv"
"$VENV/bin/python" "$ROOT/scripts/bench_vs_llamacpp_report.py" --raw "$RAW" --out "$OUT" --nf4 "$NF4" \
  "${model_args[@]}" --lm-head-bytes "$LM_HEAD_BYTES" --nf4-absmax-bytes "$ABSMAX_BYTES" --threads "$THREADS" --layers "$LAYERS"
step_done
log "results: $OUT/results.md, $OUT/results.json (raw: $RAW)"
