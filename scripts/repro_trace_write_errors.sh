#!/bin/bash
# Issue #13 item 4 (finding A1 in docs/fuzzing.md) under ASan+UBSan, by hand: a trace write that fails
# (a 200 KiB file-size limit; a full 256 KiB tmpfs, needs root) must end in one line, exit 1, and no
# sanitizer report at exit. Usage: scripts/repro_trace_write_errors.sh [MOELAB_BINARY] (default build-asan).
set -u
root=$(cd "$(dirname "$0")/.." && pwd); bin=${1:-$root/build-asan/moelab}
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:fast_unwind_on_malloc=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=$root/scripts/sanitizer-suppressions/ubsan.supp
export LSAN_OPTIONS=suppressions=$root/scripts/sanitizer-suppressions/lsan.supp:print_suppressions=0
d=$(mktemp -d); trap 'umount -l $d/small 2>/dev/null; rm -rf $d' EXIT
for i in $(seq 1 3000); do echo "The quick brown fox jumps over the lazy dog number $i and keeps running far away."; done > $d/in.txt
echo "ldd: $(ldd $bin | grep -c hdf5_serial_cpp) hdf5_cpp libraries linked"
( trap '' XFSZ; ulimit -f 200; exec $bin trace -m $root/tests/fixtures/models/mixtral-4e-gqa-f32 --input $d/in.txt --router-logits --window 64 -o $d/t.h5 --progress none ) >$d/out 2>$d/err
echo "file-size limit: exit $?, $(wc -l <$d/err) stderr lines, ASan/UBSan reports: $(grep -c 'Sanitizer\|runtime error' $d/err)"; head -c 300 $d/err; echo
mkdir $d/small && mount -t tmpfs -o size=256k tmpfs $d/small
$bin trace -m $root/tests/fixtures/models/mixtral-4e-gqa-f32 --input $d/in.txt --router-logits --window 64 -o $d/small/t.h5 --progress none >$d/out 2>$d/err
echo "full tmpfs: exit $?, $(wc -l <$d/err) stderr lines, ASan/UBSan reports: $(grep -c 'Sanitizer\|runtime error' $d/err)"; head -c 300 $d/err; echo
