#!/usr/bin/env bash
# cpu-nf4 decode and prefill with the cores shared: `--threads 1` and `--threads N` on an idle machine
# and beside one busy process (a spinning shell loop, as a build or another job would be), interleaved.
# The thread pool must never make N threads slower than 1 when a core is taken.
#
#   scripts/bench_contention.sh MODEL_DIR [THREADS] [REPEAT]
#
# MODEL_DIR: a checkpoint cpu-nf4 loads (e.g. the NF4 one scripts/bench_vs_llamacpp.sh writes under
# .bench-cache/). THREADS defaults to nproc. Prints one markdown table; the load average before each run.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
model=$1
threads=${2:-$(nproc)}
repeat=${3:-2}
moelab=build/moelab
[[ -x $moelab ]] || { echo "bench_contention: build/moelab missing (scripts/build.sh)" >&2; exit 1; }
tmp=$(mktemp -d)
busy=""
cleanup() { [[ -z $busy ]] || kill "$busy" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

run() {  # $1 label, $2 threads -> prints "decode prefill" tok/s
  local json="$tmp/$1.json"
  "$moelab" profile --model "$model" --engine cpu-nf4 --threads "$2" --n-prompt 128 --n-gen 16 --repetitions "$repeat" \
    --totals-only --json "$json" > "$tmp/$1.txt" 2>&1 || { cat "$tmp/$1.txt" >&2; exit 1; }
  python3 - "$json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
def rate(section):
    s = j["phases"][section]
    return s["tokens"] / s["wall_seconds"]
print(f"{rate('decode'):.2f} {rate('prefill'):.2f}")
PY
}

declare -A result
for round in 1 2; do
  for state in idle busy; do
    if [[ $state == busy ]]; then
      (while :; do :; done) & busy=$!
      sleep 1
    fi
    for t in 1 "$threads"; do
      load=$(cut -d' ' -f1-3 /proc/loadavg)
      r=$(run "$state-$t-$round" "$t")
      result[$state,$t]+="${r%% *}/${r##* } "
      echo "[contention] round $round, $state, --threads $t: decode/prefill tok/s $r (load before: $load)" >&2
    done
    if [[ $state == busy ]]; then kill "$busy"; wait "$busy" 2>/dev/null || true; busy=""; fi
  done
done
echo "| machine | --threads 1: decode/prefill tok/s | --threads $threads |"
echo "|---|---|---|"
for state in idle busy; do
  echo "| $state | ${result[$state,1]} | ${result[$state,$threads]} |"
done
