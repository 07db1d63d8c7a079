#!/usr/bin/env bash
# Installs what moelab needs on a Debian (bookworm or later) machine. Idempotent: safe to re-run.
#
#   scripts/setup.sh          Debian packages (C++ toolchain and libraries) + .venv with the light Python tier
#   scripts/setup.sh --dev    also the heavy tier (torch, transformers 4.x, bitsandbytes, lm-eval), used only
#                             to regenerate fixtures and cross-check; never needed to build or run moelab
#
# The C++ toolkit needs only the Debian packages. Python is for fixtures, cross-checks and plots.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

debian_packages=(
  build-essential cmake pkg-config git ca-certificates
  libeigen3-dev nlohmann-json3-dev libhdf5-dev libsentencepiece-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev libfmt-dev
  zlib1g-dev libbz2-dev libcpp-httplib-dev libopenblas-pthread-dev libre2-dev libpcre2-dev curl
  python3 python3-venv
)

missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "[setup] Debian packages already installed"
fi

# The light tier: reading traces and dumps (h5py, pandas, safetensors, numpy), plots (matplotlib), the real
# Mixtral tokenizer shipped in mistral-common. Exact pins so results reproduce.
# pytablewriter, PyYAML and Jinja2: what lm-eval's results-reading code and make_table import (below).
light=(numpy==2.3.5 safetensors==0.7.0 sentencepiece==0.2.1 h5py==3.15.1 pandas==2.3.3 matplotlib==3.10.8 mistral-common==1.8.8
       pytablewriter==1.2.1 PyYAML==6.0.4 Jinja2==3.1.6)
# lm-eval itself without its dependencies (torch, transformers, datasets: the heavy tier's): the light tier
# uses only lm_eval.utils (the results/samples file readers and make_table), for the lm-eval format test
# (scripts/check_lm_eval_format.py).
light_nodeps=(lm-eval==0.4.9.2)
# The heavy tier: transformers stays on 4.x, whose MixtralForCausalLM keeps the per-expert weight layout
# real checkpoints have on disk (5.x fuses experts at load). peft: the LoRA adapter fixtures (make_lora_fixtures.py).
# tenacity: what lm-eval's API models (local-completions against moelab serve) need beyond its own dependencies
# (scripts/serve_lm_eval_parity.py).
heavy=(torch==2.9.1 transformers==4.57.3 accelerate==1.11.0 bitsandbytes==0.49.2 lm-eval==0.4.9.2 peft==0.21.2
       tenacity==9.2.1)

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  /usr/bin/python3 -m venv .venv
fi
want=("${light[@]}" "${light_nodeps[@]}")
[ "$dev" = 1 ] && want+=("${heavy[@]}")
# Skip pip entirely when every pin is already satisfied (keeps re-runs fast and offline-safe).
if .venv/bin/python - "${want[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        if version(name) != want: sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
  echo "[setup] Python tier already installed ($([ "$dev" = 1 ] && echo light+heavy || echo light))"
else
  echo "[setup] installing Python packages into .venv: ${want[*]}"
  want_deps=("${light[@]}")
  [ "$dev" = 1 ] && want_deps+=("${heavy[@]}")
  if ! { .venv/bin/pip install -q --disable-pip-version-check "${want_deps[@]}" &&
         .venv/bin/pip install -q --disable-pip-version-check --no-deps "${light_nodeps[@]}"; }; then
    # The C++ toolkit and its tests never need Python, so without --dev a failed PyPI install (no
    # network, an untrusted TLS proxy) is a loud warning, not a failed set-up.
    [ "$dev" = 1 ] && { echo "[setup] ERROR: pip could not install the heavy tier" >&2; exit 1; }
    echo "[setup] WARNING: pip could not install the light Python tier into .venv (see above)." >&2
    echo "[setup]          moelab and its tests do not need it (only plots and reading outputs from" >&2
    echo "[setup]          Python do); re-run scripts/setup.sh once PyPI is reachable." >&2
  fi
fi
echo "[setup] done"
