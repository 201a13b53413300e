#!/usr/bin/env bash
# One command for a GPU machine, from the repository root: build (CUDA forced when a GPU is present), emcad selftest,
# pytest -m gpu, compute-sanitizer, benchmarks; results under $OUT (or --out DIR) as they come, within a time budget.
#
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh             # on the GPU machine (about 9 minutes)
#   bash scripts/gpu_check.sh --dry-run --out /tmp/dry       # the same steps on CPU, tiny (a CI test runs this)
#
# Options: python3 benchmarks/gpu_check.py --help. PYTHON selects the interpreter (default python3: the image's own).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
