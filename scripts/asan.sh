#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   bash scripts/asan.sh           # every kernel, module and bad-input test file
#   bash scripts/asan.sh --quick   # the CI subset (a few minutes): races, block sizes,
#                                  # extreme geometry, non-finite values, the fuzz of every
#                                  # op, bad input, construction edge cases, bf16/fp16 tiles
#
# Builds a scratch copy of the tree (tracked and untracked, not ignored files) in
# build/asan with SPARSEKERN_SANITIZE=address,undefined (-O1 -g, every report fatal),
# then runs the tests there with the sanitizer runtimes preloaded (python itself is
# not instrumented). SPARSEKERN_CPU_ARCH picks the -march (default native; ASan runs
# AVX-512 code, valgrind does not: use e.g. x86-64-v3 for valgrind builds).
# Rebuilds are incremental (ninja keeps the objects in build/asan/build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
DEST="${SPARSEKERN_ASAN_DIR:-$ROOT/build/asan}"
mode="${1:-full}"

mkdir -p "$DEST"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$DEST"
. "$ROOT/scripts/ccache_env.sh"
echo "asan: building the sanitized extension in $DEST ($SPARSEKERN_CCACHE_NOTE)"
(cd "$DEST" && SPARSEKERN_SANITIZE=address,undefined "$PY" setup.py -q build_ext --inplace >build.log 2>&1) \
  || { tail -30 "$DEST/build.log"; exit 1; }

libs="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$libs"
# Reports go to files as well (pytest captures stderr, and an abort loses it).
rm -f "$DEST"/sanitizer-report.*
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:alloc_dealloc_mismatch=0:detect_odr_violation=0:log_path=$DEST/sanitizer-report"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$DEST/sanitizer-report"
report() {
  local f
  for f in "$DEST"/sanitizer-report.*; do [ -e "$f" ] && { echo "asan: report $f"; head -60 "$f"; }; done
  echo "asan: FAILED"
  exit 1
}
export PYTHONPATH="$DEST${PYTHONPATH:+:$PYTHONPATH}"
cd "$DEST"
"$PY" -c "import sparsekern, sys; assert sparsekern.__file__.startswith('$DEST'), sparsekern.__file__; \
assert sparsekern.extension_available(); print('asan: sanitized sparsekern from', sparsekern.__file__)"

if [ "$mode" = "--quick" ]; then
  files=(tests/test_kernel_safety.py tests/test_bad_input.py tests/test_construction_edges.py
         tests/test_free_candidates.py tests/test_csr_transpose.py tests/test_reduced_precision.py)
  # (the fuzz in test_kernel_safety.py covers every conv and linear op in fp32/fp64,
  # test_reduced_precision.py's every bf16/fp16 linear tile path)
  "$PY" -m pytest -q -p no:cacheprovider "${files[@]}" || report
else
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_safety.py tests/test_bad_input.py \
    tests/test_ops.py tests/test_conv.py tests/test_conv_module.py tests/test_linear.py \
    tests/test_formats.py tests/test_opcheck_gradcheck.py tests/test_dst.py \
    tests/test_load_atomic.py tests/test_construction_edges.py tests/test_dst_robust.py \
    tests/test_free_candidates.py tests/test_csr_transpose.py tests/test_reduced_precision.py || report
fi
ls "$DEST"/sanitizer-report.* >/dev/null 2>&1 && report
echo "asan: no sanitizer report"
