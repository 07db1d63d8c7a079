#!/bin/sh
# Downloads (does not install) the Debian -dev packages moelab's build needs, with their library
# dependencies, into .device-debs/ (git-ignored), so they travel with the working tree to the GPU
# machine, which reaches no package registry and lacks Eigen, fmt, nlohmann-json, CLI11, sentencepiece,
# HDF5, GoogleTest and Google Benchmark. scripts/device_check.sh unpacks them with `dpkg -x`.
#
#   scripts/fetch_device_debs.sh [DIR]      (default .device-debs; run on a Debian machine with apt)
set -eu
cd "$(dirname "$0")/.."
out=${1:-.device-debs}
mkdir -p "$out"
top="libeigen3-dev nlohmann-json3-dev libcli11-dev libfmt-dev libgtest-dev libgmock-dev libbenchmark-dev
     libsentencepiece-dev libhdf5-dev pkgconf"
# Library dependencies, recursively, minus what any Debian/Ubuntu base image already has (priority
# required/important: libc6, libstdc++6, libgcc-s1, zlib ...); virtual packages have no .deb.
deps=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
         --no-enhances --no-pre-depends $top 2>/dev/null | sed -n 's/^\([a-z0-9][a-z0-9.+-]*\)$/\1/p' | sort -u)
want=""
for p in $deps; do
  prio=$(apt-cache show --no-all-versions "$p" 2>/dev/null | sed -n 's/^Priority: //p' | head -n 1)
  case "$prio" in
    required|important|"") continue ;;  # in every base image, or virtual
  esac
  want="$want $p"
done
echo "fetch_device_debs: $(echo $want | wc -w) packages into $out"
cd "$out"
# shellcheck disable=SC2086
apt-get download $want
ls -1 *.deb | wc -l
