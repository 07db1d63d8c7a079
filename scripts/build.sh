#!/usr/bin/env bash
# Configures and builds moelab (Release) into build/. Extra arguments go to the CMake configure step,
# e.g. scripts/build.sh -DMOELAB_CUDA=OFF
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j"$(nproc)"
