#!/bin/sh
# Downloads (does not install) the Debian -dev packages moelab's build needs, with the libraries they need,
# into .device-debs/ (git-ignored), so they travel with the working tree to the GPU machine, which reaches
# no package registry and lacks Eigen, fmt, nlohmann-json, CLI11, sentencepiece, HDF5, OpenBLAS, cpp-httplib,
# GoogleTest and Google Benchmark. scripts/device_check.sh unpacks them with `dpkg -x` into .device-prefix/.
#
#   scripts/fetch_device_debs.sh [DIR]      (default .device-debs; run on a Debian machine with apt)
#
# The package list is scripts/setup.sh's, less the toolchain (the GPU image has its own compiler, CMake,
# git and Python). apt resolves it as for an empty machine (one provider per alternative), and then the C
# library, the compiler's runtime and the other base-system packages are left out: unpacked ahead of the
# image's own on LD_LIBRARY_PATH, bookworm's libstdc++ (GCC 12) would shadow the image's newer one.
# Fails when the working tree plus these packages would exceed what the device tool carries (64 MiB).
set -eu
cd "$(dirname "$0")/.."
out=${1:-.device-debs}
limit_mib=${MOELAB_DEVICE_CARRY_LIMIT_MIB:-60}

# What the build needs: setup.sh's Debian packages, minus the toolchain, plus pkgconf (the image may lack
# pkg-config).
toolchain=" build-essential cmake pkg-config git ca-certificates curl python3 python3-venv "
top="pkgconf"
# shellcheck disable=SC2013  # words, not lines: the array holds several names a line
for p in $(sed -n '/^debian_packages=(/,/^)/p' scripts/setup.sh | sed 's/debian_packages=(//; s/)//'); do
  case "$toolchain" in *" $p "*) ;; *) top="$top $p" ;; esac
done

# Left out by name: the base system and toolchain runtime (the image has its own, newer) and what only
# libhdf5-dev's own dependencies pull in that moelab neither compiles against nor links (Fortran and C++
# HDF5 bindings, the h5cc wrappers, curl/jpeg/aec headers; openssl and brotli headers stay: httplib.h and
# cpp-httplib.pc need them). Runtime libraries stay: the image may lack them.
skip_names=" libc6 libc6-dev libc-dev-bin linux-libc-dev libcrypt1 libcrypt-dev libstdc++6 libgcc-s1 zlib1g
  rpcsvc-proto libnsl2 libnsl-dev libtirpc3 libtirpc-dev libtirpc-common libgomp1 libatomic1 libzstd1
  hdf5-helpers libhdf5-fortran-102 libhdf5-hl-fortran-100 libhdf5-cpp-103-1 libhdf5-hl-cpp-100
  libcurl4-openssl-dev libjpeg-dev libjpeg62-turbo-dev libaec-dev "
skip_names=" $(echo "$skip_names" | tr -s " \n" "  ") "  # one line, one space between names: the case patterns below match " name "
# The closure apt would install on a machine with nothing installed: an empty dpkg status file.
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
: > "$state/status"
# shellcheck disable=SC2086
all=$(apt-get -q -s -o Dir::State::status="$state/status" -o Debug::NoLocking=1 --no-install-recommends \
        install $top 2>"$state/err" | sed -n 's/^Inst \([^ ]*\) .*/\1/p') || true
[ -n "$all" ] || { echo "fetch_device_debs: apt could not resolve: $top" >&2; cat "$state/err" >&2; exit 1; }
# Priority required/important: in every Debian/Ubuntu base image.
# shellcheck disable=SC2086
base=" $(apt-cache show --no-all-versions $all 2>/dev/null |
         awk '/^Package: / {p = $2} /^Priority: (required|important)$/ {printf "%s ", p}') "
want=""
for p in $all; do
  name=${p%%:*}
  case "$skip_names$base" in *" $name "*) continue ;; esac
  case "$name" in gcc-*-base|libgcc-*|libstdc++*) continue ;; esac
  want="$want $name"
done
echo "fetch_device_debs: $(echo "$want" | wc -w) of $(echo "$all" | wc -w) packages into $out:$want"

# Into a fresh folder, then renamed over the old one: no stale versions left beside the new ones.
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
# shellcheck disable=SC2086
(cd "$out.tmp" && apt-get -q download $want)
rm -rf "$out"
mv "$out.tmp" "$out"

# The device tool carries the tracked and untracked-not-ignored files plus the carried folder: 64 MiB.
debs=$(du -cb "$out"/*.deb | tail -n 1 | cut -f 1)
tree=0
if git rev-parse --git-dir > /dev/null 2>&1; then
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2> /dev/null |
         awk '{s += $1} END {print s + 0}')
fi
total=$((debs + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "fetch_device_debs: $(find "$out" -name "*.deb" | wc -l) .debs, $(mib "$debs") MiB; working tree $(mib "$tree") MiB;" \
     "together $(mib "$total") MiB (limit ${limit_mib} MiB)"
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
  echo "fetch_device_debs: ERROR: $(mib "$total") MiB is over ${limit_mib} MiB: the device tool would refuse" \
       "the working tree (64 MiB); leave out more packages" >&2
  exit 1
fi
