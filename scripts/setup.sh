#!/usr/bin/env bash
# Set up sparsekern in the current Python environment.
#
# - Uses the torch that is already installed, whatever its version or build
#   (CPU or CUDA). Only when none is installed does it install the CPU wheel
#   torch==2.13.0; it never lets pip pull a CUDA torch on a CPU machine
#   (every later install is constrained to the torch that is present).
# - Installs the test/benchmark dependencies, then builds the compiled
#   extension against that torch (no build isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --disable-pip-version-check --root-user-action=ignore -q)

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: using installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: no torch found; installing the CPU wheel torch==2.13.0"
  "${PIP[@]}" "torch==2.13.0"
fi
constraints="$(mktemp)"
requirements="$(mktemp)"
trap 'rm -f "$constraints" "$requirements"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
# Keep the triton that is installed (a CUDA torch pins its own, e.g. torch 2.14 needs
# triton~=3.8): never downgrade it to requirements-dev.txt's cap, which only chooses a
# version for machines that have none.
if triton_version="$("$PY" -c "import importlib.metadata as m; print(m.version('triton'))" 2>/dev/null)"; then
  echo "setup: keeping installed triton $triton_version"
  echo "triton==$triton_version" >> "$constraints"
  grep -v '^triton' requirements-dev.txt > "$requirements"
else
  cp requirements-dev.txt "$requirements"
fi

"${PIP[@]}" -c "$constraints" -r "$requirements"
# One compile: the CPU kernel variant this machine runs best (a wheel holds all of them;
# SPARSEKERN_CPU_VARIANTS=all builds them here too, SPARSEKERN_CPU_ARCH=native one -march=native build).
export SPARSEKERN_CPU_VARIANTS="${SPARSEKERN_CPU_VARIANTS:-host}"
. scripts/ccache_env.sh
echo "setup: $SPARSEKERN_CCACHE_NOTE"
echo "setup: building the sparsekern extension (SPARSEKERN_CPU_VARIANTS=$SPARSEKERN_CPU_VARIANTS${SPARSEKERN_CPU_ARCH:+, SPARSEKERN_CPU_ARCH=$SPARSEKERN_CPU_ARCH})"
"${PIP[@]}" -c "$constraints" --no-build-isolation -e .
"$PY" -c "import sparsekern as sk; assert sk.extension_available(), 'extension failed to load'; print('setup: sparsekern', sk.__version__, 'ready; CPU kernels:', sk.cpu_kernel_variant())"
