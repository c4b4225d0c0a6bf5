#!/usr/bin/env bash
# Every way a user installs sparsekern, each in a fresh virtual environment that sees
# the installed torch (--system-site-packages: nothing pulls another torch).
#
#   bash scripts/check_installs.sh           # every path, sdist built from scratch
#   bash scripts/check_installs.sh --quick   # the CI subset: every path, but the builds
#                                            # go through ccache and make only the CPU
#                                            # kernel variant this machine runs (the full
#                                            # mode builds the portable set: all variants)
#
# Paths:
#   editable-old-pip   pip 23.2.1 + wheel: pip install --no-build-isolation -e .
#   editable-new-pip   the newest pip:     pip install --no-build-isolation -e .
#   isolated           pip install .  (build isolation): must stop with the message
#                      that says to use --no-build-isolation, and install nothing
#   non-editable       pip install --no-build-isolation .; the console script runs
#                      from another directory
#   wheel+sdist        python -m build --sdist; the sdist holds every source setup.py
#                      compiles; a wheel (from the unpacked sdist in full mode, from the
#                      checkout in --quick) installs into a fresh venv and runs
# Each path prints "PASS <path> <seconds>" or "FAIL <path>" (or "SKIP <path>" when
# SPARSEKERN_INSTALL_PATHS names others); the script exits non-zero
# if any failed. Run it after scripts/setup.sh (the quick mode reuses its build/).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
mode="${1:-full}"
WORK="$(mktemp -d /tmp/sparsekern-installs.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
constraints="$WORK/constraints.txt"
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
failed=()
if [ "$mode" = "--quick" ]; then
  export SPARSEKERN_CPU_VARIANTS="${SPARSEKERN_CPU_VARIANTS:-host}"
fi

# Every path compiles the same sources with the same flags as scripts/setup.sh: with
# ccache (scripts/ccache_env.sh) they hit the cache setup.sh's build filled.
if [ "$mode" = "--quick" ] && ! command -v ccache >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q ccache || (apt-get update -q && apt-get install -y -q ccache)) >/dev/null 2>&1 || true
fi
. "$ROOT/scripts/ccache_env.sh"
echo "$SPARSEKERN_CCACHE_NOTE"

venv() {  # venv NAME -> path of a fresh venv that sees the installed torch
  "$PY" -m venv --system-site-packages "$WORK/$1" && echo "$WORK/$1"
}

# A build without isolation uses the environment's own build tools: the ones
# pyproject.toml's [build-system] names (a new venv may carry an older setuptools).
build_tools() {  # build_tools VENV
  pip_in "$1" install -c "$constraints" "setuptools>=64" wheel ninja
}

pip_in() {  # pip_in VENV ARGS...
  "$1/bin/python" -m pip --disable-pip-version-check -q "${@:2}"
}

# The installed package must come from this venv, import its kernels and run one op.
smoke() {  # smoke VENV EDITABLE(0|1)
  (cd "$WORK" && "$1/bin/python" - "$1" "$2" <<'EOF'
import sys, torch
import sparsekern as sk
venv, editable = sys.argv[1], sys.argv[2] == "1"
where = sk.__file__
assert editable or where.startswith(venv), f"sparsekern imported from {where}, not from {venv}"
assert sk.extension_available(), "the compiled kernels did not load"
layer = sk.SparseLinear(16, 8, density=0.5)
x = torch.randn(3, 16, requires_grad=True)
layer(x).sum().backward()
assert x.grad.shape == (3, 16)
print("smoke ok:", where, "| CPU kernels:", sk.cpu_kernel_variant())
EOF
  )
}

# SPARSEKERN_INSTALL_PATHS="editable-new-pip isolated" runs only those paths (CI's subset).
only="${SPARSEKERN_INSTALL_PATHS:-}"

run_path() {  # run_path NAME FUNCTION
  if [ -n "$only" ] && ! [[ " $only " == *" $1 "* ]]; then echo "SKIP $1 (not in SPARSEKERN_INSTALL_PATHS)"; return; fi
  local t0=$SECONDS
  echo "== $1"
  if "$2" >"$WORK/$1.log" 2>&1; then
    echo "PASS $1 $((SECONDS - t0))s"
  else
    echo "FAIL $1 (last lines of its log:)"
    tail -25 "$WORK/$1.log"
    failed+=("$1")
  fi
}

editable_old_pip() {
  local v; v="$(venv old)"
  pip_in "$v" install -c "$constraints" "pip==23.2.1" wheel
  build_tools "$v"
  "$v/bin/python" -m pip --version
  pip_in "$v" install -c "$constraints" --no-build-isolation --no-deps -e "$ROOT"
  smoke "$v" 1
}

editable_new_pip() {
  local v; v="$(venv new)"
  pip_in "$v" install -U pip
  build_tools "$v"
  "$v/bin/python" -m pip --version
  pip_in "$v" install -c "$constraints" --no-build-isolation --no-deps -e "$ROOT"
  smoke "$v" 1
}

isolated() {
  local v out; v="$(venv iso)"
  # Isolation is the point here: the build environment has no torch, so setup.py must
  # stop with its message (nothing downloaded beyond setuptools and ninja).
  if out="$(cd "$WORK" && "$v/bin/python" -m pip --disable-pip-version-check install "$ROOT" 2>&1)"; then
    echo "$out"; echo "an isolated build must not succeed"; return 1
  fi
  echo "$out" | tail -20
  echo "$out" | grep -q -- "--no-build-isolation" || { echo "the message does not say --no-build-isolation"; return 1; }
  ! "$v/bin/python" -m pip show -q sparsekern 2>/dev/null | grep -q "$v"
}

non_editable() {
  local v; v="$(venv plain)"
  build_tools "$v"
  pip_in "$v" install -c "$constraints" --no-build-isolation --no-deps "$ROOT"
  smoke "$v" 0
  (cd "$WORK" && "$v/bin/sparsekern-train" --help | head -3)
}

wheel_sdist() {
  local v whl sdist src; v="$(venv wheel)"
  build_tools "$v"
  pip_in "$v" install build
  (cd "$ROOT" && "$v/bin/python" -m build --sdist --no-isolation --outdir "$WORK/dist")
  sdist="$(ls "$WORK"/dist/*.tar.gz)"
  # Every source setup.py compiles (and every header they include) is in the sdist.
  "$v/bin/python" - "$sdist" "$ROOT" <<'EOF'
import pathlib, sys, tarfile
sdist, root = sys.argv[1], pathlib.Path(sys.argv[2])
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
need = [str(p.relative_to(root)) for p in root.glob("csrc/**/*") if p.is_file()]
need += ["setup.py", "pyproject.toml", "README.md"]
missing = sorted(set(need) - names)
assert not missing, f"the sdist lacks {missing}"
print(f"sdist holds all {len(need)} build files")
EOF
  if [ "$mode" = "--quick" ]; then
    src="$ROOT"   # the checkout: its build/ objects are reused
  else
    mkdir -p "$WORK/unpacked" && tar -xzf "$sdist" -C "$WORK/unpacked"
    src="$(ls -d "$WORK"/unpacked/*)"
  fi
  pip_in "$v" wheel -c "$constraints" --no-build-isolation --no-deps -w "$WORK/wheels" "$src"
  whl="$(ls "$WORK"/wheels/sparsekern-*.whl)"
  echo "wheel: $(basename "$whl")"
  # The wheel holds the CPU kernel variants asked for (all of them by default: portable).
  "$v/bin/python" - "$whl" "$ROOT" <<'EOF'
import os, pathlib, runpy, sys, zipfile
whl, root = sys.argv[1], sys.argv[2]
want = {name.split(".")[1] for name, _ in runpy.run_path(f"{root}/setup.py", run_name="x")["cpu_builds"]()}
have = {pathlib.Path(n).name.split(".")[0] for n in zipfile.ZipFile(whl).namelist() if n.endswith(".so")}
assert want <= have, f"the wheel lacks {sorted(want - have)} (has {sorted(have)})"
print("wheel holds", sorted(have))
EOF
  local v2; v2="$(venv fresh)"
  pip_in "$v2" install -c "$constraints" --no-deps "$whl"
  smoke "$v2" 0
}

run_path editable-old-pip editable_old_pip
run_path editable-new-pip editable_new_pip
run_path isolated isolated
run_path non-editable non_editable
run_path wheel+sdist wheel_sdist

if [ ${#failed[@]} -gt 0 ]; then
  echo "install paths FAILED: ${failed[*]}"
  exit 1
fi
echo "install paths: all passed"
