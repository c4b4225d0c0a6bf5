#!/usr/bin/env bash
# The portable build's CPU kernel variants, each one this CPU runs, through the kernel
# test files (the CI suite runs the one variant scripts/setup.sh builds, plus
# tests/test_cpu_variants.py's choice logic on synthetic CPUs).
#
#   bash scripts/check_cpu_variants.sh
#
# Builds a scratch copy of the tree (tracked and untracked, not ignored files) in
# build/variants with every variant (SPARSEKERN_CPU_VARIANTS=all: what a wheel holds),
# then runs the tests there once per variant with SPARSEKERN_CPU_ISA forcing it. A
# variant this CPU cannot run (avx512 on an AVX2 machine) is compiled and reported
# "not runnable here". Rebuilds are incremental (ninja keeps build/variants/build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
DEST="${SPARSEKERN_VARIANTS_DIR:-$ROOT/build/variants}"
files=(tests/test_linear.py tests/test_conv.py tests/test_ops.py tests/test_conv_module.py
       tests/test_kernel_safety.py tests/test_cpu_variants.py tests/test_reduced_precision.py)

mkdir -p "$DEST"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$DEST"
echo "variants: building every CPU kernel variant in $DEST"
(cd "$DEST" && SPARSEKERN_CPU_VARIANTS=all "$PY" setup.py -q build_ext --inplace >build.log 2>&1) \
  || { tail -30 "$DEST/build.log"; exit 1; }
export PYTHONPATH="$DEST${PYTHONPATH:+:$PYTHONPATH}"
cd "$DEST"
summary=()
status=0
for v in $("$PY" -c "from sparsekern import _cpu_isa as i; print(' '.join(i.VARIANTS))"); do
  missing="$("$PY" -c "from sparsekern import _cpu_isa as i; print(' '.join(i.missing_flags('$v', i.cpu_flags() or i._torch_flags())))")"
  if [ -n "$missing" ]; then
    summary+=("$v: built, not runnable here (this CPU lacks $missing)")
    continue
  fi
  echo "== variant $v"
  t0=$SECONDS
  if SPARSEKERN_CPU_ISA="$v" "$PY" -m pytest -q -p no:cacheprovider "${files[@]}" > "$DEST/tests-$v.log" 2>&1; then
    summary+=("$v: PASS $(tail -1 "$DEST/tests-$v.log") ($((SECONDS - t0)) s)")
  else
    tail -30 "$DEST/tests-$v.log"
    summary+=("$v: FAIL (log: $DEST/tests-$v.log)")
    status=1
  fi
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
printf '%s\n' "${summary[@]}"
exit $status
