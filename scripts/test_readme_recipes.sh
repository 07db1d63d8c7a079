#!/usr/bin/env bash
# Runs every command in README.md's ```sh blocks, as a user would, so a recipe that breaks fails CI.
#
#   scripts/test_readme_recipes.sh BUILD_DIR [README]
#
# Each command (continuation lines joined, comments dropped) runs in a fresh scratch folder with these
# substitutions, the ones the README itself asks the reader to make:
#   DIR, Mixtral-8x7B-v0.1          -> the bundled model (models/tiny-mixtral)
#   hellaswag_val.jsonl             -> the committed HellaSwag slice (evals/data/hellaswag-val-200.txt)
#   gsm8k-test.jsonl                -> the committed GSM8K test slice (evals/data/gsm8k-test-20.jsonl)
#   "..."                           -> a short prompt
#   [--opt value]                   -> --opt value (optional arguments are exercised too)
#   build/...                       -> BUILD_DIR/...
# Some commands cannot run on every machine; each such one is named with its reason (a line starting
# "not run: "), never passed silently:
#   - the set-up block (it is what CI itself runs, the surrounding test is inside it);
#   - `--engine cuda-nf4` without a CUDA device: there the command must fail with the documented one-line
#     error ("cuda-nf4: no CUDA device found"), which is checked instead;
#   - timed benchmarks: moelab_bench only lists what its filter selects (which must be something), and
#     the side-by-side scripts (bench_*.sh) are not run: figures, not behaviour, and minutes of CPU;
#   - .venv/bin/python commands when the light Python tier is missing, or lacks a module the command
#     imports (scripts/setup.sh only warns when its PyPI install fails);
#   - curl commands where curl is not installed (scripts/setup.sh installs it); where it runs, an HTTP error
#     status fails the command (--fail-with-body is added).
# A server recipe: a command ending in "&" starts in the background (its output in a log) and must print
# "listening on http://" within 60 s; "kill %N" stops the Nth such command with SIGTERM, which must then exit
# 0 within 30 s having printed "moelab serve: stopped". Port 8080 becomes a free loopback port. Any server
# still running at the end is killed, and counts as a failure.
# Exit status: 0 when every command that ran succeeded (or failed as documented), 1 otherwise.
set -uo pipefail
build=$(cd "${1:?usage: test_readme_recipes.sh BUILD_DIR [README]}" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
readme=${2:-$root/README.md}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/moelab-readme.XXXXXX")
bg_pids=()  # servers started by commands ending in "&", in order (kill %N stops the Nth)
cleanup() {
  for p in "${bg_pids[@]}"; do [ -n "$p" ] && kill -KILL "$p" 2>/dev/null; done
  rm -rf "$scratch"
}
trap cleanup EXIT

# A free loopback port for the server recipes' 8080 (nothing answers on it now).
port=$((18080 + $$ % 1000))
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done

# The commands: ```sh blocks only, a trailing backslash joins the next line, comments and blanks dropped.
mapfile -t commands < <(awk '
  /^```sh$/ { inblock = 1; next }
  /^```$/   { inblock = 0; next }
  inblock {
    line = $0
    sub(/[ \t]+#.*$/, "", line); sub(/^[ \t]*#.*$/, "", line)
    if (line ~ /\\$/) { sub(/\\$/, "", line); pending = pending line; next }
    line = pending line; pending = ""
    gsub(/^[ \t]+|[ \t]+$/, "", line)
    if (line != "") print line
  }' "$readme")

has_gpu=0
"$build/moelab" devices 2>/dev/null | grep -q '^cuda:' && has_gpu=1

ran=0 skipped=0 failed=0
for cmd in "${commands[@]}"; do
  if [[ $cmd == scripts/setup.sh* ]]; then
    echo "not run: $cmd  (the set-up CI itself runs)"; skipped=$((skipped + 1)); continue
  fi
  if [[ $cmd == scripts/bench_* ]]; then
    echo "not run: $cmd  (a timed benchmark against llama.cpp: figures, not behaviour, and minutes of CPU)"
    skipped=$((skipped + 1)); continue
  fi
  if [[ $cmd == .venv/bin/python* && ! -x $root/.venv/bin/python ]]; then
    echo "not run: $cmd  (no light Python tier at $root/.venv)"; skipped=$((skipped + 1)); continue
  fi
  if [[ $cmd == curl* ]] && ! command -v curl >/dev/null; then
    echo "not run: $cmd  (no curl on this machine)"; skipped=$((skipped + 1)); continue
  fi
  if [[ $cmd =~ ^kill\ %([0-9]+)$ ]]; then
    n=${BASH_REMATCH[1]} pid=${bg_pids[$((BASH_REMATCH[1] - 1))]:-}
    echo "RUN: $cmd"
    ran=$((ran + 1))
    if [ -z "$pid" ]; then
      echo "  FAIL: no background command %$n is running"; failed=$((failed + 1)); continue
    fi
    kill -TERM "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "  FAIL: still running 30 s after SIGTERM"; failed=$((failed + 1))
    else
      wait "$pid"; rc=$?
      if ((rc == 0)) && grep -q "moelab serve: stopped" "$scratch/bg$n.log"; then
        echo "  ok: stopped, exit 0"
      else
        echo "  FAIL: exit $rc after SIGTERM:"; tail -20 "$scratch/bg$n.log" | sed 's/^/    /'; failed=$((failed + 1))
      fi
    fi
    bg_pids[$((n - 1))]=""
    continue
  fi
  run=$cmd
  run=${run//build\//$build/}
  run=${run//scripts\//$root/scripts/}
  run=${run//.venv\/bin\/python/$root/.venv/bin/python}
  run=$(sed -E -e "s#(^| )(DIR|Mixtral-8x7B-v0\.1)( |$)#\1$root/models/tiny-mixtral\3#g" \
               -e "s#(^| )(DIR|Mixtral-8x7B-v0\.1)( |$)#\1$root/models/tiny-mixtral\3#g" \
               -e "s#hellaswag_val\.jsonl#$root/evals/data/hellaswag-val-200.txt#g" \
               -e "s#gsm8k-test\.jsonl#$root/evals/data/gsm8k-test-20.jsonl#g" \
               -e 's#"\.\.\."#"The capital of France is"#g' \
               -e 's#\[(--[^]]*)\]#\1#g' \
               -e "s#8080#$port#g" <<<"$run")
  # curl: an HTTP error status fails the command (the body still shows).
  [[ $cmd == curl* ]] && run="$run --fail-with-body"
  # A timed benchmark run: its filter must select benchmarks (listed, not timed).
  [[ $cmd == *moelab_bench* ]] && run="$run --benchmark_list_tests=true | grep -q ."
  expect_cuda_error=0
  [[ $cmd == *"--engine cuda-nf4"* || $cmd == *"--b cuda-nf4"* ]] && ((has_gpu == 0)) && expect_cuda_error=1
  if [[ $run == *" &" ]]; then  # a server: started in the background, ready when it prints its URL
    n=$((${#bg_pids[@]} + 1))
    echo "RUN: $cmd"
    ran=$((ran + 1))
    (cd "$scratch" && exec bash -c "exec ${run% &}") >"$scratch/bg$n.log" 2>&1 &
    bg_pids+=("$!")
    for _ in $(seq 600); do
      grep -q "listening on http://" "$scratch/bg$n.log" && break
      kill -0 "${bg_pids[-1]}" 2>/dev/null || break
      sleep 0.1
    done
    if grep -q "listening on http://" "$scratch/bg$n.log"; then
      echo "  ok: listening (kill %$n stops it)"
    else
      echo "  FAIL: did not print its URL within 60 s:"; tail -20 "$scratch/bg$n.log" | sed 's/^/    /'
      failed=$((failed + 1))
    fi
    continue
  fi
  echo "RUN: $cmd"
  out=$(cd "$scratch" && bash -c "$run" 2>&1)
  rc=$?
  ran=$((ran + 1))
  if ((expect_cuda_error)); then
    if ((rc == 1)) && grep -q "cuda-nf4: no CUDA device found\|built without CUDA" <<<"$out"; then
      echo "  ok: no CUDA device here, and the command fails with the documented error (exit 1)"
    else
      echo "  FAIL: expected the one-line 'no CUDA device' error, got exit $rc:"; sed 's/^/    /' <<<"$out" | tail -20
      failed=$((failed + 1))
    fi
  elif ((rc != 0)) && [[ $cmd == .venv/bin/python* ]] && grep -q "ModuleNotFoundError" <<<"$out"; then
    # The light tier's install is allowed to fail (setup.sh warns; the C++ toolkit never needs it).
    echo "  not run: the light Python tier lacks $(grep -o "No module named '[^']*'" <<<"$out" | head -1)"
    ran=$((ran - 1)) skipped=$((skipped + 1))
  elif ((rc != 0)); then
    echo "  FAIL: exit $rc:"; sed 's/^/    /' <<<"$out" | tail -20
    failed=$((failed + 1))
  else
    echo "  ok"
  fi
done
for i in "${!bg_pids[@]}"; do
  if [ -n "${bg_pids[$i]}" ]; then
    echo "FAIL: background command %$((i + 1)) was never stopped (the recipe needs a kill %$((i + 1)))"
    failed=$((failed + 1))
  fi
done
echo "README recipes: ${#commands[@]} commands, $ran run, $skipped skipped (reasons above), $failed failed"
((${#commands[@]} > 0)) || { echo "no commands found in $readme"; exit 1; }
((failed == 0))
