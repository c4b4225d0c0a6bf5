#!/usr/bin/env bash
# The GPU check: everything a lent GPU must prove, in one command that fits well inside
# 8 minutes on an H100/H200. Run it first on any machine with a GPU, then commit its
# results folder.
#
#     bash scripts/gpu_check.sh              # build, GPU tests, sanitizers, quick benchmark
#     bash scripts/gpu_check.sh --dry-run    # print the plan (runs anywhere; writes nothing)
#     bash scripts/gpu_check.sh --budget 420 # stop starting steps after 420 s (default 450)
#     bash scripts/gpu_check.sh --only build,tests-gpu --out /tmp/check   # a subset, elsewhere
#
# Steps, in order of value (each with its own timeout, so one hang cannot eat the budget;
# a step that would start after the budget is spent is SKIPPED, and counts as failed):
#   env               versions, GPU, CUDA toolkit (CUDA_HOME validated: bin/nvcc, include/,
#                     lib64/libcudart*; the nvcc on PATH may be a wrapper), Python modules
#   build             pip install --no-build-isolation --no-deps -e . for this GPU's arch only,
#                     then checks that the CUDA C++ ops registered
#   tests-gpu         the GPU test files at real sizes (Triton kernels, module/conv/DST paths,
#                     the router and the C++ kernels' own test, the benchmark's interpreter run)
#   tests-cpp         the CSR module/opcheck tests again with SPARSEKERN_GPU_BACKEND=cuda
#   memcheck-triton, memcheck-cuda, racecheck-triton, racecheck-cuda
#                     compute-sanitizer on scripts/gpu_sanitize_cases.py (one small run of
#                     every kernel variant), allocator caching off so memcheck sees overruns
#   bench             python3 benchmarks/bench_gpu.py --quick at the targets' densities
#   compile           tests/test_cuda_compile.py and tests/test_triton_compile.py (CPU-side
#                     compiles for sm_80/sm_90; CI runs them too, so they go last)
#
# Everything lands in benchmarks/results/gpu_check/<UTC date>_<gpu>/: one log per step,
# junit XML per test step, the benchmark's JSON/Markdown, sanitizer logs, summary.md.
# It goes on past a failing step, prints a summary table (step, status, seconds) last,
# and exits 1 if any step failed. When every step that exercises the CUDA C++ kernels
# passed, it prints the line that records their verification in sparsekern/gpu/route.py
# (CUDA_CPP_VERIFIED_BY), which makes `auto` route CSR to them.
set -uo pipefail
CALLER_PWD="$(pwd)"
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
DRY_RUN=0
BUDGET=450
ONLY=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --only) ONLY=",$2,"; shift ;;
    --out) OUT="$2"; [[ "$OUT" = /* ]] || OUT="$CALLER_PWD/$OUT"; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ------------------------------------------------------------------ toolkit
toolkit_problem() {  # why $1 is not a usable CUDA toolkit (empty when it is)
  local home="$1" missing=()
  [ -n "$home" ] || { echo "not set"; return; }
  [ -x "$home/bin/nvcc" ] || missing+=("bin/nvcc")
  [ -f "$home/include/cuda_runtime.h" ] || missing+=("include/cuda_runtime.h")
  compgen -G "$home/lib64/libcudart*" >/dev/null || compgen -G "$home/lib/libcudart*" >/dev/null \
    || missing+=("lib64/libcudart*")
  [ ${#missing[@]} -eq 0 ] || echo "$home lacks ${missing[*]}"
}

find_cuda_home() {  # prints a valid toolkit, or nothing (the reasons go to stderr)
  local candidates=() c nvcc
  if [ -n "${CUDA_HOME:-}" ]; then candidates+=("$CUDA_HOME"); fi
  if nvcc="$(command -v nvcc 2>/dev/null)"; then
    candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
  fi
  candidates+=(/usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12)
  for c in "${candidates[@]}"; do
    local why; why="$(toolkit_problem "$c")"
    if [ -z "$why" ]; then echo "$c"; return 0; fi
    echo "gpu_check: not a CUDA toolkit: $why" >&2
  done
  return 1
}

CUDA_HOME_FOUND="$(find_cuda_home 2>/dev/null || true)"
SANITIZER="$(command -v compute-sanitizer 2>/dev/null || true)"
for c in "$CUDA_HOME_FOUND/bin/compute-sanitizer" "$CUDA_HOME_FOUND/compute-sanitizer/compute-sanitizer"; do
  if [ -z "$SANITIZER" ] && [ -n "$CUDA_HOME_FOUND" ] && [ -x "$c" ]; then SANITIZER="$c"; fi
done
SANITIZER="${SANITIZER:-compute-sanitizer}"
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)"
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)"
ARCH="${ARCH:-8.0;9.0}"
SLUG="$(printf '%s' "${GPU_NAME:-nogpu}" | tr -cs 'A-Za-z0-9' '_' | tr 'A-Z' 'a-z' | sed 's/^_*//; s/_*$//')"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_check/$(date -u +%Y-%m-%d_%H%M)_${SLUG}}"
mkdir_out() { mkdir -p "$OUT"; }
REL_OUT="${OUT#"$ROOT"/}"

# -------------------------------------------------------------------- steps
ALL_STEPS=()
declare -A TIMEOUT CMD
step() { ALL_STEPS+=("$1"); TIMEOUT[$1]="$2"; CMD[$1]="$3"; }

PYTEST="$PY -m pytest -q -p no:cacheprovider -o addopts= -rfEs"
GPU_TESTS="tests/test_triton.py tests/test_triton_conv.py tests/test_triton_dst.py tests/test_cuda_route.py tests/test_bench_gpu.py"
SAN="env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --error-exitcode 1 --print-limit 20"
CASES="$PY scripts/gpu_sanitize_cases.py"

step env 60 "$PY - <<'EOF'
import importlib, importlib.util, platform, subprocess
import torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
print('CUDA_HOME (validated):', '${CUDA_HOME_FOUND:-none found}')
print('compute-sanitizer:', '$SANITIZER')
missing = []
for m in ('triton', 'numpy', 'pytest', 'tqdm', 'safetensors'):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, '__version__', ''))
    except ImportError:
        missing.append(m)
for cmd in (['nvidia-smi'], ['${CUDA_HOME_FOUND:-/nonexistent}/bin/nvcc', '--version'], ['$SANITIZER', '--version']):
    try:
        print(subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.SubprocessError) as exc:
        print(cmd[0], 'unavailable:', exc)
print('ninja (optional: a parallel build)', importlib.util.find_spec('ninja') is not None)
assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'
print('GPU', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
assert '${CUDA_HOME_FOUND}', 'no valid CUDA toolkit (set CUDA_HOME to one with bin/nvcc, include/, lib64/libcudart*)'
assert not missing, f'missing Python modules: {missing}'
EOF"
step build 300 "CUDA_HOME='$CUDA_HOME_FOUND' TORCH_CUDA_ARCH_LIST='$ARCH' MAX_JOBS=\$(nproc) \
$PY -m pip install --no-build-isolation --no-deps --disable-pip-version-check -v -e . \
&& $PY -c \"import sparsekern as sk; from sparsekern.gpu import route; \
assert sk.extension_available(), 'extension not loaded'; \
assert route.cpp_ops() is not None, 'CUDA C++ ops not registered'; print('built: sparsekern_cuda ops registered')\""
step tests-gpu 240 "$PYTEST $GPU_TESTS --junitxml='$OUT/tests-gpu.xml'"
step tests-cpp 120 "SPARSEKERN_GPU_BACKEND=cuda $PYTEST tests/test_triton.py tests/test_triton_conv.py \
-k '(module or opcheck) and csr' --junitxml='$OUT/tests-cpp.xml'"
step memcheck-triton 120 "$SAN --tool memcheck --log-file '$OUT/memcheck-triton.sanitizer.log' $CASES --backend triton"
step memcheck-cuda 90 "$SAN --tool memcheck --log-file '$OUT/memcheck-cuda.sanitizer.log' $CASES --backend cuda"
step racecheck-triton 150 "$SAN --tool racecheck --log-file '$OUT/racecheck-triton.sanitizer.log' $CASES --backend triton"
step racecheck-cuda 90 "$SAN --tool racecheck --log-file '$OUT/racecheck-cuda.sanitizer.log' $CASES --backend cuda"
step bench 240 "$PY benchmarks/bench_gpu.py --quick --densities 0.1 0.05 0.02 --out '$OUT/bench'"
step compile 150 "$PYTEST tests/test_cuda_compile.py tests/test_triton_compile.py --junitxml='$OUT/compile.xml'"
# The steps that exercise the CUDA C++ kernels (tests-gpu holds their own test in test_cuda_route.py).
CPP_STEPS=(build tests-gpu tests-cpp memcheck-cuda racecheck-cuda)

STEPS=()
for s in "${ALL_STEPS[@]}"; do
  if [ -z "$ONLY" ] || [[ "$ONLY" == *",$s,"* ]]; then STEPS+=("$s"); fi
done
if [ ${#STEPS[@]} -eq 0 ]; then
  echo "gpu_check: --only ${ONLY//,/ } names no step; steps: ${ALL_STEPS[*]}" >&2
  exit 2
fi

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check plan (dry run: nothing is run or written)"
  echo "results folder: $REL_OUT"
  echo "CUDA_HOME: ${CUDA_HOME_FOUND:-none found here}; arch: $ARCH; sanitizer: $SANITIZER; budget: ${BUDGET}s"
  for s in "${STEPS[@]}"; do
    printf '\n[%s] timeout %ss\n  %s\n' "$s" "${TIMEOUT[$s]}" "${CMD[$s]//$'\n'/$'\n  '}"
  done
  echo
  echo "${#STEPS[@]} steps: ${STEPS[*]}"
  exit 0
fi

# ---------------------------------------------------------------------- run
mkdir_out || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
declare -A STATUS SECS
START=$(date +%s)
for s in "${STEPS[@]}"; do
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -le 10 ]; then
    STATUS[$s]="SKIPPED"; SECS[$s]=0
    echo "gpu_check: $s skipped (budget of ${BUDGET}s spent)" | tee "$OUT/$s.log"
    continue
  fi
  limit=${TIMEOUT[$s]}
  [ "$limit" -le "$left" ] || limit=$left
  echo "gpu_check: $s (timeout ${limit}s) ..."
  t0=$(date +%s)
  { echo "\$ ${CMD[$s]}"; echo; } > "$OUT/$s.log"
  timeout -k 10 "$limit" bash -c "${CMD[$s]}" >> "$OUT/$s.log" 2>&1
  rc=$?
  SECS[$s]=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS[$s]="ok" ;;
    124|137) STATUS[$s]="TIMEOUT" ;;
    *) STATUS[$s]="FAIL($rc)" ;;
  esac
  echo "gpu_check: $s ${STATUS[$s]} in ${SECS[$s]}s (log: $REL_OUT/$s.log)"
  [ "${STATUS[$s]}" = ok ] || tail -n 15 "$OUT/$s.log" | sed 's/^/    /'
done

failed=0
for s in "${STEPS[@]}"; do [ "${STATUS[$s]}" = ok ] || failed=1; done
cpp_ok=1
for s in "${CPP_STEPS[@]}"; do [ "${STATUS[$s]:-not run}" = ok ] || cpp_ok=0; done
if [ "$cpp_ok" = 1 ]; then
  VERDICT="CUDA C++ kernels: every step that exercises them passed (${CPP_STEPS[*]}).
To route auto CSR to them, commit this folder and set in sparsekern/gpu/route.py:
    CUDA_CPP_VERIFIED_BY = \"$REL_OUT\""
else
  VERDICT="CUDA C++ kernels: NOT verified (a step that exercises them did not pass, or did not run); auto keeps CSR on Triton."
fi
TABLE="$(printf '%-18s %-10s %s\n' step status seconds; \
         for s in "${STEPS[@]}"; do printf '%-18s %-10s %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}"; done)"
{
  echo "# GPU check: ${GPU_NAME:-no GPU}, $(date -u '+%Y-%m-%d %H:%M UTC'), total $(( $(date +%s) - START ))s"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  for s in "${STEPS[@]}"; do echo "| $s | ${STATUS[$s]} | ${SECS[$s]} |"; done
  echo
  echo "$VERDICT"
} > "$OUT/summary.md"
echo
echo "$VERDICT"
echo "results: $REL_OUT (summary.md, one log per step)"
echo
echo "$TABLE"
exit $failed
