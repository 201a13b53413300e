#!/usr/bin/env bash
# Installs emcad-kernels (editable, C++ extension built) into the active Python environment.
#
#   bash scripts/install.sh                  # core package
#   bash scripts/install.sh dev,flops,triton # with extras
#
# torch is installed only when none is importable (then the CPU build torch==2.13.0); an existing torch, e.g. a
# CUDA build, is kept and pinned so that no extra pulls in another one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "install.sh: no importable torch; installing the CPU build torch==2.13.0"
    "$PY" -m pip install torch==2.13.0
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# the distribution's version, not torch.__version__: PyPI's CUDA wheels report "2.11.0+cu130" but are "2.11.0"
"$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$constraints"

# --no-build-isolation: the extension must be built against the torch installed here (see README)
"$PY" -m pip install -c "$constraints" setuptools wheel ninja
"$PY" -m pip install -c "$constraints" --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}"
