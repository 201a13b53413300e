#!/usr/bin/env bash
# Installs emcad-kernels (editable, C++ extension built) into the active Python environment.
#
#   bash scripts/install.sh                  # core package
#   bash scripts/install.sh dev,flops,triton # with extras
#
# torch is installed only when none is importable (then the CPU build torch==2.13.0); an existing torch, e.g. a
# CUDA build, is kept and pinned so that no extra pulls in another one.
#
# Run again on a checkout whose extension is already built and installed here, with nothing it depends on
# changed (scripts/install_state.py decides), it does not rebuild: it only installs missing requirements.
# FORCE_REBUILD=1 rebuilds anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
say() { echo "install.sh: $*"; }
has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# numpy before torch is first imported (torch warns "Failed to initialize NumPy" without it)
if ! has_module torch; then
    say "no torch found; installing the CPU build torch==2.13.0 (about 200 MB) and numpy"
    "$PY" -m pip install torch==2.13.0 numpy
elif ! has_module numpy; then
    say "installing numpy"
    "$PY" -m pip install numpy
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    say "torch is installed but does not import:"
    "$PY" -c "import torch"
    exit 1
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# the distribution's version, not torch.__version__: PyPI's CUDA wheels report "2.11.0+cu130" but are "2.11.0"
"$PY" -c "from importlib.metadata import version; print('torch==' + version('torch'))" > "$constraints"
say "keeping $(cat "$constraints") (pinned for every install below)"

state_status=0
state=$("$PY" scripts/install_state.py check) || state_status=$?
if [ "${FORCE_REBUILD:-0}" = 1 ]; then
    state_status=1
    state="FORCE_REBUILD=1"
fi
say "$state"
if [ "$state_status" -eq 0 ]; then
    say "skipping the C++ build; installing what is missing of: core requirements${EXTRAS:+ + [$EXTRAS]}"
    reqs_text=$("$PY" scripts/install_state.py requirements "$EXTRAS")
    mapfile -t reqs <<< "$reqs_text"
    { "$PY" -m pip install -c "$constraints" "${reqs[@]}"; } |
        { grep -v -e "^Requirement already satisfied" -e "^Looking in " || true; }
    say "done (nothing rebuilt; FORCE_REBUILD=1 bash scripts/install.sh${EXTRAS:+ $EXTRAS} rebuilds)"
    exit 0
fi

"$PY" -m pip install -q -c "$constraints" setuptools wheel ninja
"$PY" scripts/install_state.py requirements "$EXTRAS" > /dev/null  # an unknown extra stops here
say "building the C++ extension (CPU kernels for SSE2, AVX2 and AVX-512) and installing" \
    "emcad-kernels${EXTRAS:+[$EXTRAS]}: $("$PY" scripts/install_state.py estimate)"
start=$(date +%s)
# --no-build-isolation: the extension must be built against the torch installed here (see README)
"$PY" -m pip install -c "$constraints" --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}" &
pip_pid=$!
# a line a minute, so that a long build is not mistaken for a hang
# (sleep's output goes nowhere, so that a pipe such as `install.sh | tee` does not wait for it)
( while sleep 60 </dev/null >/dev/null 2>&1; do
      say "still building ($(( ($(date +%s) - start) / 60 )) min so far)"
  done ) &
ticker=$!
# "|| true": under set -e a failing kill (the ticker already gone) would turn the script's exit code into 1
trap 'kill "$ticker" 2>/dev/null || true; rm -f "$constraints"' EXIT
status=0
wait "$pip_pid" || status=$?
kill "$ticker" 2>/dev/null || true
if [ "$status" -ne 0 ]; then
    say "pip install failed (exit code $status); see the messages above"
    exit "$status"
fi
"$PY" -c "import emcad_kernels._C" || { say "the extension was built but does not import"; exit 1; }
"$PY" scripts/install_state.py stamp
elapsed=$(( $(date +%s) - start ))
say "done in $(( elapsed / 60 )) min $(( elapsed % 60 )) s" \
    "(install.sh run again here does not rebuild unless the sources change)"
