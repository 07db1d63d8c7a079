#!/usr/bin/env bash
# Training speed and memory of `moelab finetune` (issue 15): tokens/s, where the loop's time goes (forward,
# backward, optimizer) and the peak resident memory, on
#   (a) the bundled model (models/default, tiny-mixtral: 4 layers, hidden 128), and
#   (b) a Mixtral-8x7B-shaped model with --layers decoder layers (hidden 4096, intermediate 14336, 8 experts
#       top-2, 32 heads / 8 KV heads, vocab 32000; random BF16 weights from scripts/bench_make_checkpoint.py,
#       quantized once with `moelab quantize` to NF4 and cached under .bench-cache/).
# Each configuration runs in its own process (the peak resident memory is per process: getrusage's
# ru_maxrss, reported by moelab itself in train_summary.json). Prints one markdown table.
#
#   scripts/bench_train.sh [--layers N] [--only bundled|mixtral] [--threads T] [--force] [--out DIR]
#                          [--bundled-steps N] [--bundled-batch B] [--bundled-seq S]
#                          [--mixtral-steps N] [--mixtral-batch B] [--mixtral-seq S] [--gradient-checkpointing]
#
#   --layers N        decoder layers of the Mixtral-shaped model (default 2; ~2.9 GB BF16 on disk per layer
#                     while it is made, ~0.8 GB NF4 per layer kept; training holds one layer dequantized to
#                     FP32 at a time: ~5.8 GB, plus the FP32 embedding and lm_head, 1 GB)
#   --only WHICH      run one of the two configurations
#   --threads T       moelab's --threads (default: nproc)
#   --contention      instead of the table above: the bundled model at --threads 1 and --threads T, on the
#                     idle machine and beside one busy process (a spinning shell loop, as a build would be),
#                     two interleaved rounds; tokens/s per run. Two threads must never train slower than one
#                     when a core is taken (the trainer's pool, train/products.hpp).
#   --force           run even when the 1-minute load average is >= 1.5; the table then marks every figure
#                     "NOT VALID" (without it the script refuses: figures beside other work are not figures);
#                     before each configuration it waits up to MOELAB_BENCH_LOAD_WAIT seconds (default 120)
#                     for the load to fall below 1.5 (the previous configuration's threads keep it up a while)
#   --out DIR         raw outputs (each run's stdout, train_summary.json, train_log.csv)
#                     [default .bench-cache/train-results-UTCSTAMP]
#   steps / batch / seq: optimizer steps, sequences per step, --max-seq-len (defaults: bundled 20 x 8 x 128,
#                     Mixtral-shaped 2 x 2 x 64: a step of it takes minutes on 2 cores). Data: the bundled
#                     corpus (models/default/corpus/train.jsonl.gz), tokenized by each model's own tokenizer;
#                     no held-out evaluation, no checkpoints inside the loop, LoRA r=8 on q/k/v/o (defaults).
#
# Environment: MOELAB_BUILD_DIR (default build), MOELAB_BENCH_CACHE (default .bench-cache), PYTHON for the
# checkpoint writer (default .venv/bin/python, numpy only). The binary must already be built (Release).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

die() { echo "bench_train: $*" >&2; exit 1; }
log() { echo "[bench_train $(date -u +%H:%M:%S)] $*" >&2; }

LAYERS=2 ONLY="" THREADS=$(nproc) FORCE=0 OUT="" GC=0 CONTENTION=0
B_STEPS=20 B_BATCH=8 B_SEQ=128
M_STEPS=2 M_BATCH=2 M_SEQ=64
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) need_value "$@"; LAYERS=$2; shift 2 ;;
    --only) need_value "$@"; ONLY=$2; shift 2 ;;
    --threads) need_value "$@"; THREADS=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --contention) CONTENTION=1; shift ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --gradient-checkpointing) GC=1; shift ;;
    --bundled-steps) need_value "$@"; B_STEPS=$2; shift 2 ;;
    --bundled-batch) need_value "$@"; B_BATCH=$2; shift 2 ;;
    --bundled-seq) need_value "$@"; B_SEQ=$2; shift 2 ;;
    --mixtral-steps) need_value "$@"; M_STEPS=$2; shift 2 ;;
    --mixtral-batch) need_value "$@"; M_BATCH=$2; shift 2 ;;
    --mixtral-seq) need_value "$@"; M_SEQ=$2; shift 2 ;;
    -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for v in LAYERS THREADS B_STEPS B_BATCH B_SEQ M_STEPS M_BATCH M_SEQ; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "${v,,} must be a positive integer, got '${!v}'"
done
[[ -z "$ONLY" || "$ONLY" == bundled || "$ONLY" == mixtral ]] || die "--only must be bundled or mixtral, got '$ONLY'"

BUILD_DIR="${MOELAB_BUILD_DIR:-$ROOT/build}"
MOELAB="$BUILD_DIR/moelab"
CACHE="${MOELAB_BENCH_CACHE:-$ROOT/.bench-cache}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CORPUS="$ROOT/models/default/corpus/train.jsonl.gz"
TOKENIZER="$ROOT/tests/fixtures/tokenizers/mixtral-8x7b-v0.1.model"
[[ -x "$MOELAB" ]] || die "$MOELAB missing: build it first (cmake --build $BUILD_DIR --target moelab)"
[[ -f "$CORPUS" ]] || die "$CORPUS missing (the bundled model's corpus)"

# The machine's vector ISA (what the CPU offers; each summary says which OpenBLAS kernel set ran the frozen
# weights' products, "blas_kernels", and what Eigen, the rest, was compiled for, "simd").
cpu_isa() {
  local flags isa=()
  flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
  for f in avx512f avx512_vnni avx_vnni avx2 fma; do [[ " $flags " == *" $f "* ]] && isa+=("$f"); done
  [[ ${#isa[@]} -gt 0 ]] && (IFS=+; echo "${isa[*]}") || echo "x86-64 baseline"
}
ISA=$(cpu_isa)
load1() { cut -d' ' -f1 /proc/loadavg; }

busy() { awk -v l="$1" 'BEGIN { exit !(l >= 1.5) }'; }
# Refuse (or, with --force, warn loudly) when the machine is busy. Prints the load for the table. The previous
# configuration's own threads leave the 1-minute average high for a while (it decays with a 1-minute time
# constant), so wait up to WAIT_S seconds for it to fall first.
WAIT_S=${MOELAB_BENCH_LOAD_WAIT:-120}
check_load() {
  local l waited=0
  l=$(load1)
  while busy "$l" && [[ $waited -lt $WAIT_S ]]; do
    sleep 5
    waited=$((waited + 5))
    l=$(load1)
  done
  if busy "$l"; then
    if [[ $FORCE -eq 0 ]]; then
      die "1-minute load average is $l (>= 1.5): another job is running and the figures would not be valid; wait for a quiet machine, or pass --force to run anyway (every figure is then marked NOT VALID)"
    fi
    {
      echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
      echo "!!! bench_train: load average $l >= 1.5 -- running anyway (--force): these figures are NOT VALID !!!"
      echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    } >&2
    echo "$l NOT VALID"
  else
    echo "$l"
  fi
}

# The Mixtral-shaped NF4 checkpoint, made once (BF16 written, quantized, the BF16 copy deleted).
mixtral_checkpoint() {
  local bf16="$CACHE/mixtral-shaped-L$LAYERS" nf4="$CACHE/mixtral-shaped-L$LAYERS-nf4"
  if [[ -f "$nf4/.complete" ]]; then echo "$nf4"; return; fi
  [[ -f "$TOKENIZER" ]] || die "tokenizer fixture missing: $TOKENIZER"
  if [[ ! -f "$bf16/.complete" ]]; then
    [[ -x "$PYTHON" ]] || die "$PYTHON missing (needs numpy; scripts/setup.sh makes .venv)"
    log "writing $bf16 ($LAYERS layers, random BF16; ~$((LAYERS * 29 / 10 + 1)) GB)"
    rm -rf "$bf16.partial"
    "$PYTHON" "$ROOT/scripts/bench_make_checkpoint.py" --out "$bf16.partial" --layers "$LAYERS" --tokenizer "$TOKENIZER" >&2
    rm -rf "$bf16"
    mv "$bf16.partial" "$bf16"
    printf 'layers %s\n' "$LAYERS" > "$bf16/.complete"
  fi
  log "moelab quantize $bf16 -> $nf4"
  rm -rf "$nf4.partial"
  "$MOELAB" quantize --model "$bf16" --output "$nf4.partial" --progress none > "$OUT/quantize.log" 2>&1 \
    || { tail -20 "$OUT/quantize.log" >&2; die "moelab quantize failed (log: $OUT/quantize.log)"; }
  rm -rf "$nf4"
  mv "$nf4.partial" "$nf4"
  printf 'layers %s\n' "$LAYERS" > "$nf4/.complete"
  rm -rf "$bf16"  # the NF4 copy is all the benchmark reads; the BF16 one is ~2.9 GB a layer
  echo "$nf4"
}

[[ $FORCE -eq 1 ]] || check_load > /dev/null  # refuse before making anything
[[ -n "$OUT" ]] || OUT="$CACHE/train-results-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"

if [[ $CONTENTION -eq 1 ]]; then
  spinner=""
  trap '[[ -z $spinner ]] || kill "$spinner" 2>/dev/null || true' EXIT
  declare -A rate
  for round in 1 2; do
    for state in idle busy; do
      # The idle runs wait for a quiet machine (the busy runs' spinner and their own threads raise the load).
      [[ $state == idle ]] && load=$(check_load) || load=$(load1)
      if [[ $state == busy ]]; then
        (while :; do :; done) & spinner=$!
        sleep 1
      fi
      for t in 1 "$THREADS"; do
        dir="$OUT/contention-$state-t$t-r$round"
        rm -rf "$dir"
        "$MOELAB" finetune --model "$ROOT/models/default" --data "$CORPUS" -o "$dir" --max-steps "$B_STEPS" \
          --batch-size "$B_BATCH" --max-seq-len "$B_SEQ" --save-steps 0 --logging-steps 1000 --threads "$t" \
          --progress none > "$dir.stdout" 2>&1 || { tail -20 "$dir.stdout" >&2; die "contention run failed"; }
        r=$(python3 -c 'import json,sys; print("%.0f" % json.load(open(sys.argv[1]))["tokens_per_s"])' "$dir/train_summary.json")
        rate[$state,$t]+="$r "
        log "round $round, $state, --threads $t: $r tokens/s (load before: $load)"
      done
      if [[ $state == busy ]]; then kill "$spinner"; wait "$spinner" 2>/dev/null || true; spinner=""; fi
    done
  done
  {
    echo
    echo "moelab finetune beside a busy process, bundled model ($B_STEPS steps x $B_BATCH x <= $B_SEQ tokens), $(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, $ISA"
    echo
    echo "| machine | --threads 1: tokens/s (round 1, 2) | --threads $THREADS |"
    echo "|---|---|---|"
    for state in idle busy; do echo "| $state | ${rate[$state,1]}| ${rate[$state,$THREADS]}|"; done
  } | tee "$OUT/contention.md"
  log "raw outputs: $OUT"
  exit 0
fi

ROWS=()
# run_config LABEL MODEL STEPS BATCH SEQ
run_config() {
  local label=$1 model=$2 steps=$3 batch=$4 seq=$5 load dir t0 t1 extra=()
  [[ $GC -eq 1 ]] && extra+=(--gradient-checkpointing)
  dir="$OUT/$label"
  rm -rf "$dir"
  load=$(check_load)
  log "$label: moelab finetune --model $model --max-steps $steps --batch-size $batch --max-seq-len $seq --threads $THREADS (load before: $load)"
  t0=$(date +%s.%N)
  "$MOELAB" finetune --model "$model" --data "$CORPUS" -o "$dir" --max-steps "$steps" --batch-size "$batch" \
    --max-seq-len "$seq" --save-steps 0 --logging-steps 1 --threads "$THREADS" --progress none "${extra[@]}" \
    > "$OUT/$label.stdout" 2>&1 || { tail -20 "$OUT/$label.stdout" >&2; die "$label: moelab finetune failed"; }
  t1=$(date +%s.%N)
  grep '^finetune: .* steps in ' "$OUT/$label.stdout" >&2 || true
  ROWS+=("$(python3 - "$dir/train_summary.json" "$label" "$load" "$ISA" "$t0" "$t1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
label, load, isa, t0, t1 = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6])
total = j["train_seconds"]
parts = [j["forward_seconds"], j["backward_seconds"], j["optimizer_seconds"]]
other = total - sum(parts)
cells = [f"{p:.3f} ({100 * p / total:.0f}%)" for p in parts]
deq = j["dequantize_seconds"]
cells.insert(2, f"{deq:.3f} ({100 * deq / total:.0f}%)")
mib = lambda b: f"{b / 2**20:.0f}"
print(f"| {label} | {j['steps']} | {j['tokens']} | {j['tokens_per_s']:.1f} | {total:.2f} | " + " | ".join(cells) +
      f" | {other:.2f} | {mib(j['peak_rss_bytes'])} ({mib(j['peak_rss_before_training_bytes'])}) | {t1 - t0:.1f} |"
      f" {load} | {j['threads']} | {isa}; OpenBLAS {j.get('blas_kernels', 'not used')}, Eigen {j['simd'].replace(', ', '+')} |")
PY
)")
}

if [[ -z "$ONLY" || "$ONLY" == bundled ]]; then
  run_config bundled "$ROOT/models/default" "$B_STEPS" "$B_BATCH" "$B_SEQ"
fi
if [[ -z "$ONLY" || "$ONLY" == mixtral ]]; then
  ckpt=$(mixtral_checkpoint)
  run_config "mixtral-shaped-L$LAYERS" "$ckpt" "$M_STEPS" "$M_BATCH" "$M_SEQ"
fi

{
  echo
  echo "moelab finetune, $(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores$([[ $GC -eq 1 ]] && echo ', --gradient-checkpointing')"
  echo
  echo "| model | steps | tokens | tokens/s | loop s | forward s | backward s | of both: dequantize s | optimizer s | other s | peak RSS MiB (before the loop) | process s | load before | threads | ISA |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/table.md"
log "raw outputs: $OUT"
