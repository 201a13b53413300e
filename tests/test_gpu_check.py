"""``scripts/gpu_check.sh``, the one command for a GPU machine, run on CPU: its dry run goes through every step (no
build when the extension is built, no sanitizer) and leaves the result files; a spent budget skips steps with a note
and still writes the summary."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import emcad_kernels as ek

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)  # loaded from its file: benchmarks/ is no package
_spec.loader.exec_module(gpu_check)
# what a lent device machine returns from its output folder: at most eight files
MAX_RESULT_FILES = 8


def _gpu_check(out, *args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_goes_through_every_step(tmp_path):
    args = ["--dry-run"] + (["--skip-build"] if "cpu" not in ek.available_backends() else [])
    # one small GPU test file keeps this quick; the whole `-m gpu` selection is the GPU run's
    args += ["--pytest-args", "tests/test_triton_mscam.py"]
    proc = _gpu_check(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= MAX_RESULT_FILES, files
    for name in ("summary.md", "gpu_check.json", "bench.json", "bench.csv", "pytest.log", "junit.xml", "run.log"):
        assert name in files, files
    state = json.loads((tmp_path / "gpu_check.json").read_text())
    assert state["finished"] and state["environment"]["dry_run"]
    steps = state["steps"]
    assert steps["build"]["status"] in ("ok", "skipped")
    assert set(state["backends"]) == set(ek.backends.registered_backends()), state["backends"]  # from `emcad info`
    assert steps["selftest"]["status"] == "ok" and steps["selftest"]["counts"]["FAIL"] == 0
    assert steps["tests"]["status"] == "ok" and steps["tests"]["counts"]["tests"] > 0
    assert steps["sanitizer"] == {"status": "skipped", "note": "dry run"}
    assert steps["bench"]["status"] == "ok", steps["bench"]
    bench = json.loads((tmp_path / "bench.json").read_text())
    timed = {(r["kind"], r["provider"]) for r in bench["rows"] if "ms_p50" in r or "train_ms_p50" in r}
    triton = ("triton",) if importlib.util.find_spec("triton") is not None else ()  # the interpreter
    for provider in ("eager_nchw", "eager_cl", "compiled", *triton):
        assert ("op", provider) in timed, timed
    for provider in ("eager_nchw", "auto"):  # the dry run's decoder: neither triton nor compiled (too slow)
        assert ("decoder", provider) in timed, timed
    assert any(r["provider"] == "cuda" and "skipped" in r for r in bench["rows"])  # no GPU: said, not hidden
    summary = (tmp_path / "summary.md").read_text()
    for section in ("# GPU check: no GPU (dry run on CPU)", "## Steps", "## Self-test", "## GPU tests",
                    "## compute-sanitizer", "## Benchmarks", "| lgag |", "| decoder |"):
        assert section in summary, section
    assert "Incomplete" not in summary


def test_spent_budget_skips_steps_and_still_reports(tmp_path):
    proc = _gpu_check(tmp_path, "--dry-run", "--budget", "1", "--steps", "selftest,tests,bench", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "gpu_check.json").read_text())
    for step in ("selftest", "tests", "bench"):
        assert state["steps"][step]["status"] == "skipped"
        assert state["steps"][step]["note"].startswith("too little time left")
    assert "build" not in state["steps"]
    assert "## Steps" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("bad", [["--steps", "nonsense"]])
def test_bad_options_are_refused(tmp_path, bad):
    proc = _gpu_check(tmp_path, "--dry-run", *bad, timeout=120)
    assert proc.returncode != 0
    assert "unknown --steps ['nonsense']" in proc.stderr


def test_sanitizer_payload_runs_every_example():
    """What runs under compute-sanitizer on the GPU, here on the cpu backend: it must keep up with the op layer."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--sanitizer-payload",
                           "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    if "cpu" not in ek.available_backends():
        assert proc.returncode == 1 and "no example ran" in proc.stdout
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = {line.split(" example ")[0] for line in proc.stdout.splitlines() if "forward and backward ran" in line}
    assert ran == {name for name, op in ek.backends.registered_ops().items() if "cpu" in op.support}
    assert "sanitizer payload: done" in proc.stdout


@pytest.mark.parametrize("text, rc, timed_out, expected", [
    ("op example 0 on cuda: forward and backward ran\nsanitizer payload: done (9 examples)\n"
     "========= ERROR SUMMARY: 0 errors\n", 0, False, "ok"),
    ("========= Invalid __global__ write of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n", 1, False, "failed"),
    ("Traceback ...\nRuntimeError: boom\n========= ERROR SUMMARY: 0 errors\n", 1, False, "failed"),
    ("========= Error: Device not supported\ntorch.AcceleratorError: CUDA error 999\n"
     "========= ERROR SUMMARY: 1 error\n", 1, False, "could not start"),
    ("compute-sanitizer: error while loading shared libraries\n", 127, False, "could not start"),
    ("op example 0 on cuda: forward and backward ran\n", -9, True, "timeout"),
])
def test_sanitizer_verdict(text, rc, timed_out, expected):
    """How the GPU run reads compute-sanitizer's output (only a GPU runs the sanitizer itself)."""
    status, note = gpu_check.sanitizer_verdict(text, rc, timed_out, 120)
    assert status == expected, note
    if expected == "failed" and "ERROR SUMMARY: 3" in text:
        assert note.startswith("memcheck: 3 errors")
