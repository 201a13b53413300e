#!/usr/bin/env bash
# The test suite: compile-checks the pure-CUDA kernel files with nvcc (when nvcc exists), then runs pytest.
# Extra arguments go to pytest. Exit code is non-zero if anything fails or if pytest collected no test.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

cuda_files=$(ls csrc/cuda/*.cu 2>/dev/null || true)
if [ -n "$cuda_files" ]; then
    if command -v nvcc >/dev/null 2>&1; then
        out=$(mktemp -d)
        jobs=$(nproc 2>/dev/null || echo 2)
        echo "nvcc compile check (sm_80, sm_90) of:" $cuda_files
        # shellcheck disable=SC2086
        printf '%s\n' $cuda_files | xargs -P "$jobs" -I{} sh -c \
            'nvcc -c -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
                 "{}" -o "'"$out"'/$(basename "{}").o" || { echo "nvcc compile check FAILED: {}"; exit 255; }' \
            || { rm -rf "$out"; exit 1; }
        rm -rf "$out"
        echo "nvcc compile check passed"
    else
        echo "nvcc not found: skipping the CUDA kernel compile check"
    fi
fi

echo "run_tests.sh: running pytest $* (the default suite: about 7-8 minutes on 2 CPU cores, see README)"
start=$(date +%s)
"$PY" -m pytest "$@"
rc=$?
echo "run_tests.sh: pytest finished in $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s (exit code $rc)"
if [ "$rc" -eq 5 ]; then
    echo "run_tests.sh: pytest collected no test; treating that as a failure"
    exit 1
fi
exit "$rc"
