#!/usr/bin/env bash
# `cmake --install` into a scratch prefix, then the installed moelab runs from another folder, on the model
# it installed (share/moelab/models/default), not on the source tree's.
#   scripts/test_install.sh BUILD_DIR [CMAKE]
set -euo pipefail
build=${1:?usage: test_install.sh BUILD_DIR [CMAKE]}
cmake=${2:-cmake}
prefix=$(mktemp -d "${TMPDIR:-/tmp}/moelab-install.XXXXXX")
trap 'rm -rf "$prefix"' EXIT
"$cmake" --install "$build" --prefix "$prefix" >/dev/null
cd "$prefix"
./bin/moelab inspect --json inspect.json >/dev/null
want="$prefix/share/moelab/models/default"
got=$(sed -n 's/^  "model": "\(.*\)",\{0,1\}$/\1/p' inspect.json)
[[ $got == "$want" ]] || { echo "installed moelab used model '$got', expected '$want'"; exit 1; }
./bin/moelab generate -p "Once upon a time" -n 4 >/dev/null
echo "installed into $prefix and ran there on $got"
