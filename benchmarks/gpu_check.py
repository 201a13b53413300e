#!/usr/bin/env python3
"""First contact with a GPU machine in one command: build, self-test, GPU tests, compute-sanitizer, benchmarks.

Run from the repository root (``scripts/gpu_check.sh`` is the wrapper)::

    OUT=/tmp/gpu_check bash scripts/gpu_check.sh            # on the GPU machine
    bash scripts/gpu_check.sh --dry-run --out /tmp/dry      # the same steps on CPU, tiny (CI runs this)

Steps, in order, each a subprocess with its own time cap inside one global budget (``--budget``, default 540 s;
a step gets at most what is left after the minimum the later steps need, and is skipped with a note when that is
too little):

1. ``build``: ``python -m pip install --no-build-isolation --no-deps -e .`` with the running python,
   ``MAX_JOBS`` = cores, ``TORCH_CUDA_ARCH_LIST`` = the GPU's compute capability and ``FORCE_CUDA=1`` when a GPU
   is present (a CUDA build that fails fails loudly instead of leaving the cuda backend out); then ``emcad info``.
   The dry run builds only when the CPU extension is missing.
2. ``selftest``: ``emcad selftest`` (every op, backend, device and dtype against the reference).
3. ``tests``: ``pytest -m gpu`` (junit XML; in parallel with pytest-xdist when installed).
4. ``sanitizer``: ``compute-sanitizer --tool memcheck`` on one forward and backward of every example of every op
   of the cuda backend (skipped with a note without a GPU, without compute-sanitizer, or when it cannot start).
5. ``bench``: ``benchmarks/bench_gpu.py``: the copy bandwidth, the decoder and EMCADNet-B2 training step (time and
   peak memory) and inference, then each op forward and forward + backward for eager NCHW, eager channels_last,
   ``torch.compile`` and the fused backends.

Everything goes under ``--out`` (default ``$OUT``, else ``gpu_check_out``) as it happens, so a run cut short still
returns what finished: ``summary.md`` (environment, steps, build, self-test, tests, sanitizer, benchmark tables),
``gpu_check.json`` (the same, for machines), ``bench.json`` / ``bench.csv`` (benchmark rows), ``build.log``,
``pytest.log``, ``junit.xml`` and ``run.log`` (this script's log with the self-test, sanitizer and benchmark
output). Eight files at most: what a lent device machine returns.

Exit status: 0 when every step that ran passed, 1 otherwise (the summary says which).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("build", "selftest", "tests", "sanitizer", "bench")

# (cap, minimum the step needs to be worth starting) in seconds, on a GPU and in the dry run
# (the benchmark's minimum is large: below two minutes it would measure little more than the copy bandwidth)
CAPS = {"build": (360, 60), "selftest": (150, 20), "tests": (240, 30), "sanitizer": (120, 30), "bench": (600, 120)}
DRY_CAPS = {"build": (600, 60), "selftest": (60, 10), "tests": (60, 10), "sanitizer": (60, 10), "bench": (150, 10)}

# the GPU benchmark: one size, bf16, the largest decoder stage, torch.compile in its default mode (max-autotune takes
# minutes per op); the decoder first, then the ops, then EMCADNet-B2 (the longest to compile)
BENCH_ARGS = ["--sizes", "352:16", "--dtypes", "bf16", "--stages", "3", "--modes", "fwd_eval,fwd_bwd",
              "--providers", "eager_nchw,eager_cl,compiled,triton,cuda", "--nets", "decoder,model",
              "--order", "decoder,ops,model", "--compile-mode", "default", "--warmup-ms", "10", "--rep-ms", "50"]
# dry run, kept under a minute: one op (LGAG: the quickest through Triton's interpreter) with every provider,
# torch.compile with the "eager" backend (dynamo's tracing without AOTAutograd); the decoder eager and with the
# fused ops (auto), neither triton (the interpreter takes minutes for a whole decoder) nor compiled (two thirds of
# the dry run's time; tests/test_compile.py compiles the decoder)
DRY_BENCH_ARGS = ["--ops", "lgag", "--modes", "fwd_eval,fwd_bwd", "--nets", "decoder",
                  "--providers", "eager_nchw,eager_cl,compiled,triton,cuda", "--net-providers",
                  "eager_nchw,auto,cuda", "--order", "decoder,ops", "--compile-backend", "eager"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                   help="folder for the results (default: $OUT, else gpu_check_out)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of wall time for everything (default 540; dry run 240)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on CPU: Triton interpreter, tiny shapes, no sanitizer, short budget")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of steps to run (default: {','.join(STEPS)})")
    p.add_argument("--skip-build", action="store_true", help="use the package as it is")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments (one string)")
    p.add_argument("--bench-args", default=None, help="bench_gpu.py arguments instead of the defaults (one string)")
    p.add_argument("--sanitizer-payload", metavar="BACKENDS", help=argparse.SUPPRESS)  # what runs under the sanitizer
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 240.0 if args.dry_run else 540.0
    return args


# --------------------------------------------------------------------------------------------------
# the environment
# --------------------------------------------------------------------------------------------------
def _output(cmd, timeout=30) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "compute-sanitizer")):
            return os.path.join(root, "bin", "compute-sanitizer")
    return None


def environment() -> dict:
    try:
        import torch
    except ImportError as e:
        raise SystemExit(f"gpu_check: {sys.executable} cannot import torch ({e}); run it with the Python that has "
                         f"torch: PYTHON=/path/to/python bash scripts/gpu_check.sh") from None

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "python_executable": sys.executable,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": None, "gpu": None, "capability": None, "driver": None, "nvcc": None,
        "cpu_cores": os.cpu_count(), "machine": platform.node(),
        "git_commit": _output(["git", "rev-parse", "HEAD"]) or os.environ.get("EMCAD_GIT_COMMIT") or None,
        "git_dirty": bool(_output(["git", "status", "--porcelain", "--untracked-files=no"])),
        "compute_sanitizer": find_sanitizer(),
    }
    try:
        from importlib.metadata import version
        env["triton"] = version("triton")
    except Exception:  # noqa: BLE001 - not installed
        pass
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}",
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    driver = _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
    env["driver"] = driver[0] if driver else None
    nvcc = re.search(r"release ([\d.]+)", _output(["nvcc", "--version"]))
    env["nvcc"] = nvcc.group(1) if nvcc else None
    return env


# --------------------------------------------------------------------------------------------------
# the run: steps as subprocesses under caps, results written as they come
# --------------------------------------------------------------------------------------------------
class Check:
    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="gpu_check_")  # files that are not results (the eight-file limit)
        self.log = open(os.path.join(self.out, "run.log"), "a", buffering=1)
        self.state = {"args": {k: v for k, v in vars(args).items() if k != "sanitizer_payload"}, "steps": {},
                      "environment": {}, "finished": False}
        self.gpu = False
        self.caps = DRY_CAPS if args.dry_run else CAPS
        self.wanted = [s for s in args.steps.split(",") if s]
        unknown = [s for s in self.wanted if s not in STEPS]
        if unknown:
            raise SystemExit(f"unknown --steps {unknown}; choose from {STEPS}")

    # ---- bookkeeping ----
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def env(self) -> dict:
        variables = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.args.dry_run:
            variables["TRITON_INTERPRET"] = "1"
        return variables

    def save(self) -> None:
        self.state["seconds"] = round(self.elapsed(), 1)
        for name, text in (("gpu_check.json", json.dumps(self.state, indent=1, default=str)),
                           ("summary.md", summary_markdown(self.state, self.out))):
            tmp = os.path.join(self.out, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.out, name))

    def time_for(self, step: str) -> tuple[float, str]:
        """The cap of ``step``: its own, within what is left after the minimum of the steps still to come."""
        cap, _ = self.caps[step]
        later = STEPS[STEPS.index(step) + 1:]
        reserve = sum(self.caps[s][1] for s in later if s in self.wanted)
        left = self.args.budget - self.elapsed()
        return min(cap, left - reserve), f"cap {cap} s, {left:.0f} s of the budget left, {reserve} s kept for later"

    def record(self, step: str, **info) -> dict:
        entry = self.state["steps"].setdefault(step, {})
        entry.update(info)
        self.save()
        return entry

    def skip(self, step: str, why: str) -> None:
        self.say(f"{step}: skipped ({why})")
        self.record(step, status="skipped", note=why)

    def run(self, step: str, cmd: list, log_path: str, env=None, cap=None, append=False) -> tuple[int, float, bool]:
        """Runs ``cmd`` (output to ``log_path``) for at most ``cap`` seconds: then SIGINT (pytest writes its
        report), SIGTERM, SIGKILL to its process group. Returns (exit status, seconds, timed out)."""
        self.say(f"{step}: {' '.join(cmd)} (at most {cap:.0f} s)")
        t0 = time.monotonic()
        with open(log_path, "a" if append else "w", buffering=1) as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=max(1.0, cap))
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = None
                for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        rc = proc.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                log.write(f"\n[gpu_check] stopped after the {cap:.0f} s cap\n")
        return (rc if rc is not None else -9), time.monotonic() - t0, timed_out

    # ---- steps ----
    def environment(self) -> None:
        env = environment()
        self.gpu = env["gpu"] is not None and not self.args.dry_run
        env["dry_run"] = self.args.dry_run
        self.state["environment"] = env
        self.say(f"GPU: {env['gpu'] or 'none'} (capability {env['capability']}), driver {env['driver']}, torch "
                 f"{env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, nvcc {env['nvcc']}, python "
                 f"{env['python']}, commit {env['git_commit']}")
        if not self.gpu and not self.args.dry_run:
            self.say("no GPU visible to torch: the GPU steps will say so (use --dry-run for the CPU smoke run)")
        self.save()

    def build(self) -> None:
        if self.args.skip_build:
            return self.skip("build", "--skip-build")
        if self.args.dry_run and _cpu_extension_built(self.env()):
            return self.skip("build", "dry run and the CPU extension is already built")
        cap, why = self.time_for("build")
        if cap < self.caps["build"][1]:
            return self.skip("build", f"too little time left ({why})")
        env = self.env()
        env["MAX_JOBS"] = str(os.cpu_count() or 1)
        if self.gpu:
            env["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or \
                (self.state["environment"]["capability"] or "9.0")
            env["FORCE_CUDA"] = "1"
        settings = {k: env[k] for k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "FORCE_CUDA") if k in env}
        rc, seconds, timed_out = self.run("build", [sys.executable, "-m", "pip", "install", "--no-build-isolation",
                                                    "--no-deps", "-e", "."],
                                          os.path.join(self.out, "build.log"), env=env, cap=cap)
        status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
        self.say(f"build: {status} in {seconds:.0f} s (rc {rc}; {settings})")
        self.record("build", status=status, rc=rc, seconds=round(seconds, 1), settings=settings,
                    note=None if rc == 0 else "see build.log" + (" (the CUDA extension must build when a GPU is "
                                                                 "present: FORCE_CUDA=1)" if self.gpu else ""))

    def info(self) -> None:
        """``emcad info``: which backends are usable after the build, and why not."""
        log = os.path.join(self.out, "build.log")
        rc, _, _ = self.run("info", [sys.executable, "-m", "emcad.cli", "info"], log, cap=60, append=True)
        with open(log) as f:
            text = f.read()
        text = text[text.rfind("emcad.cli info"):]
        section = text[text.find("backends (highest priority first):"):text.find("\nmodels:")]
        backends = {m.group(1): m.group(2).strip() for m in re.finditer(r"^  (\w+)\s+(\S.*)$", section, re.M)}
        self.state["backends"] = backends
        self.say("backends: " + "; ".join(f"{k}: {v}" for k, v in backends.items()))
        self.save()

    def selftest(self) -> None:
        cap, why = self.time_for("selftest")
        if cap < self.caps["selftest"][1]:
            return self.skip("selftest", f"too little time left ({why})")
        report = os.path.join(self.scratch, "selftest.json")
        cmd = [sys.executable, "-m", "emcad.cli", "selftest", "--json", report]
        if self.args.dry_run:
            cmd += ["--dtypes", "float32"]
        rc, seconds, timed_out = self.run("selftest", cmd, os.path.join(self.scratch, "selftest.log"), cap=cap)
        self._copy_to_log("selftest", os.path.join(self.scratch, "selftest.log"))
        result = {}
        if os.path.exists(report):
            with open(report) as f:
                result = json.load(f)
        rows = result.get("rows", [])
        counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "FAIL", "ERROR", "skip")}
        status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
        self.say(f"selftest: {status} in {seconds:.0f} s: {counts}")
        self.record("selftest", status=status, rc=rc, seconds=round(seconds, 1), counts=counts, rows=rows,
                    notes=result.get("notes", []))

    def tests(self) -> None:
        cap, why = self.time_for("tests")
        if cap < self.caps["tests"][1]:
            return self.skip("tests", f"too little time left ({why})")
        junit = os.path.join(self.out, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        if self.gpu and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(max(2, min(8, (os.cpu_count() or 2) // 2))), "--dist", "loadfile"]
        if self.gpu and importlib.util.find_spec("pytest_timeout") is not None:
            cmd += ["--timeout", "180"]  # one hung test must not take the others with it
        cmd += self.args.pytest_args.split()
        rc, seconds, timed_out = self.run("tests", cmd, os.path.join(self.out, "pytest.log"), cap=cap)
        counts, failures = junit_summary(junit)
        # pytest: 0 all passed, 1 some failed, 5 none collected (on CPU every gpu test is skipped, not deselected)
        status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
        self.say(f"tests: {status} in {seconds:.0f} s: {counts}")
        self.record("tests", status=status, rc=rc, seconds=round(seconds, 1), counts=counts, failures=failures)

    def sanitizer(self) -> None:
        if self.args.dry_run:
            return self.skip("sanitizer", "dry run")
        if not self.gpu:
            return self.skip("sanitizer", "no GPU")
        tool = self.state["environment"]["compute_sanitizer"]
        if tool is None:
            return self.skip("sanitizer", "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        if not self.state.get("backends", {}).get("cuda", "").startswith("available"):
            return self.skip("sanitizer", "the cuda backend is not available: "
                             + self.state.get("backends", {}).get("cuda", "unknown"))
        cap, why = self.time_for("sanitizer")
        if cap < self.caps["sanitizer"][1]:
            return self.skip("sanitizer", f"too little time left ({why})")
        log = os.path.join(self.scratch, "sanitizer.log")
        cmd = [tool, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20", sys.executable,
               os.path.abspath(__file__), "--sanitizer-payload", "cuda"]
        rc, seconds, timed_out = self.run("sanitizer", cmd, log, cap=cap)
        self._copy_to_log("sanitizer", log)
        with open(log) as f:
            status, note = sanitizer_verdict(f.read(), rc, timed_out, cap)
        self.say(f"sanitizer: {status} in {seconds:.0f} s: {note}")
        self.record("sanitizer", status=status, rc=rc, seconds=round(seconds, 1), note=note)

    def bench(self) -> None:
        cap, why = self.time_for("bench")
        if cap < self.caps["bench"][1]:
            return self.skip("bench", f"too little time left ({why})")
        if not self.gpu and not self.args.dry_run:
            return self.skip("bench", "no GPU")
        extra = self.args.bench_args.split() if self.args.bench_args is not None else \
            (DRY_BENCH_ARGS if self.args.dry_run else BENCH_ARGS)
        cmd = [sys.executable, os.path.join("benchmarks", "bench_gpu.py"), "--out", self.out, "--name", "bench",
               "--formats", "json,csv", "--budget", f"{max(5.0, cap - 60):.0f}", *extra]
        if self.args.dry_run:
            cmd.append("--dry-run")
        log = os.path.join(self.scratch, "bench.log")
        rc, seconds, timed_out = self.run("bench", cmd, log, cap=cap)
        self._copy_to_log("bench", log)
        bench = read_json(os.path.join(self.out, "bench.json"))
        rows = bench.get("rows", []) if bench else []
        run = (bench or {}).get("run", {})
        timed = sum("ms_p50" in r or "train_ms_p50" in r for r in rows)
        errors = sum("error" in r for r in rows)
        status = "timeout" if timed_out else "ok" if rc == 0 and not errors else "failed"
        note = f"{timed} measurements, {errors} failed" + ("" if run.get("complete") else
                                                           f"; not measured (budget): {run.get('not_run', '?')}")
        self.say(f"bench: {status} in {seconds:.0f} s: {note}")
        self.record("bench", status=status, rc=rc, seconds=round(seconds, 1), note=note)

    def _copy_to_log(self, step: str, path: str) -> None:
        if os.path.exists(path):
            with open(path) as f:
                self.log.write(f"----- {step} output -----\n{f.read()}----- end of {step} output -----\n")

    def main(self) -> int:
        self.say(f"gpu_check: results in {self.out}, budget {self.args.budget:.0f} s"
                 + (" (dry run)" if self.args.dry_run else ""))
        self.environment()
        for step in STEPS:
            try:
                if step in self.wanted:
                    getattr(self, step)()
                if step == "build":
                    self.info()
            except Exception as e:  # noqa: BLE001 - one broken step must not lose the others' results
                self.say(f"{step}: the check itself failed: {type(e).__name__}: {e}")
                self.record(step, status="failed", note=f"gpu_check error: {type(e).__name__}: {e}")
        self.state["finished"] = True
        self.save()
        # a sanitizer that could not start checked nothing: the summary says so, the exit status does not fail
        bad = [s for s, e in self.state["steps"].items()
               if e.get("status") not in ("ok", "skipped", "could not start")]
        self.say(f"done in {self.elapsed():.0f} s; " + (f"problems: {', '.join(bad)}" if bad else "every step that "
                                                        "ran passed") + f"; summary: {self.out}/summary.md")
        shutil.rmtree(self.scratch, ignore_errors=True)
        return 1 if bad else 0


def sanitizer_verdict(text: str, rc: int, timed_out: bool, cap: float) -> tuple[str, str]:
    """(status, note) of a compute-sanitizer run from its output: a memcheck error fails it; a sanitizer that
    could not use the device (it refuses some virtualised GPUs, and the program then fails at its first
    allocation) is "could not start", not a memory error of ours."""
    summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
    errors = int(summary.group(1)) if summary else None
    if timed_out:
        return "timeout", f"stopped after {cap:.0f} s"
    if "Device not supported" in text or summary is None:
        last = [line for line in text.strip().splitlines() if line.strip()] or ["no output"]
        return "could not start", "compute-sanitizer did not check the program: " + last[-1][:300]
    if errors == 0 and rc == 0 and "sanitizer payload: done" in text:
        return "ok", "memcheck: 0 errors"
    if errors:
        return "failed", f"memcheck: {errors} errors (see run.log)"
    return "failed", f"the payload failed under memcheck (rc {rc}; see run.log)"


def _cpu_extension_built(env) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import emcad_kernels._C"], cwd=REPO, env=env,
                           capture_output=True, timeout=120)
    return probe.returncode == 0


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def junit_summary(path) -> tuple[dict, list[str]]:
    """(counts, failing tests with the first line of their message) from a junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"report": "missing"}, []
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failures = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                failures.append(f"{case.get('classname')}::{case.get('name')} ({kind}): "
                                f"{message[0][:200] if message else ''}")
    return counts, failures


# --------------------------------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------------------------------
def summary_markdown(state: dict, out: str) -> str:
    env = state.get("environment", {})
    steps = state.get("steps", {})
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU'}" + (" (dry run on CPU)" if env.get("dry_run") else ""), ""]
    if not state.get("finished"):
        lines += ["**Incomplete**: the run was still going (or was stopped) when this was written.", ""]
    lines += ["| | |", "|---|---|"]
    for label, key in (("GPU", "gpu"), ("compute capability", "capability"), ("GPU memory (GiB)", "gpu_memory_gib"),
                       ("driver", "driver"), ("CUDA (torch)", "torch_cuda"), ("nvcc", "nvcc"), ("torch", "torch"),
                       ("triton", "triton"), ("python", "python"), ("git commit", "git_commit"),
                       ("uncommitted changes", "git_dirty"), ("date (UTC)", "date"), ("CPU cores", "cpu_cores")):
        lines.append(f"| {label} | {env.get(key)} |")
    lines.append(f"| wall time | {state.get('seconds')} s of a {state.get('args', {}).get('budget')} s budget |")
    lines += ["", "## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    for name in STEPS:
        e = steps.get(name)
        if e:
            lines.append(f"| {name} | {e.get('status')} | {e.get('seconds', '–')} | {e.get('note') or ''} |")
    build = steps.get("build", {})
    if build.get("settings") or state.get("backends"):
        lines += ["", "## Build", ""]
        if build.get("settings"):
            lines.append(f"{build.get('status')} in {build.get('seconds')} s with {build.get('settings')} "
                         f"(log: build.log)")
        if state.get("backends"):
            lines += [""] + [f"* `{k}`: {v}" for k, v in state["backends"].items()]
    selftest = steps.get("selftest", {})
    if selftest.get("rows") is not None and "counts" in selftest:
        c = selftest["counts"]
        lines += ["", "## Self-test (`emcad selftest`)", "",
                  f"{c['pass']} passed, {c['FAIL']} failed, {c['ERROR']} raised, {c['skip']} skipped; "
                  f"{selftest.get('seconds')} s", "",
                  "| op | backend | device | dtype | result | examples | max error | of tolerance |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in selftest["rows"]:
            err = "–" if r.get("max_error") is None else f"{r['max_error']:.2e}"
            share = "–" if r.get("tolerance_share") is None else f"{100 * r['tolerance_share']:.0f}%"
            lines.append(f"| {r['op']} | {r['backend']} | {r['device']} | {r['dtype']} | {r['status']} | "
                         f"{r['examples_run']}/{r['examples']} | {err} | {share} |")
        problems = [f"* {r['op']} on {r['backend']}/{r['device']}/{r['dtype']}: {d}"
                    for r in selftest["rows"] if r["status"] in ("FAIL", "ERROR") for d in r["details"]]
        if problems:
            lines += ["", "Failures:", ""] + problems[:40]
        if selftest.get("notes"):
            lines += ["", "Notes:", ""] + [f"* {n}" for n in selftest["notes"]]
    tests = steps.get("tests", {})
    if "counts" in tests:
        lines += ["", "## GPU tests (`pytest -m gpu`)", "", f"{tests['counts']} (rc {tests.get('rc')}; pytest.log, "
                                                              f"junit.xml)"]
        if tests.get("failures"):
            lines += [""] + [f"* {f}" for f in tests["failures"][:60]]
    sanitizer = steps.get("sanitizer")
    if sanitizer:
        lines += ["", "## compute-sanitizer (memcheck, cuda backend)", "", f"{sanitizer.get('status')}: "
                                                                        f"{sanitizer.get('note')}"]
    bench = read_json(os.path.join(out, "bench.json"))
    if bench:
        lines += ["", "## Benchmarks (`benchmarks/bench_gpu.py`; median times)", ""]
        try:
            if os.path.join(REPO, "benchmarks") not in sys.path:
                sys.path.insert(0, os.path.join(REPO, "benchmarks"))
            from bench_gpu import summary_markdown as bench_markdown
            lines.append(bench_markdown(bench["environment"], bench["copy_bandwidth_gbps"], bench["rows"],
                                        bench.get("targets", []), title=False))
        except Exception as e:  # noqa: BLE001 - the rows are in bench.json / bench.csv anyway
            lines.append(f"(table not rendered: {type(e).__name__}: {e}; rows in bench.csv)")
        run = bench.get("run", {})
        if not run.get("complete"):
            lines.append(f"Not measured (budget or stopped): {run.get('not_run', 'the rest')}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# what runs under compute-sanitizer
# --------------------------------------------------------------------------------------------------
def sanitizer_payload(backend_names: str) -> int:
    """One forward and backward of every example of every op on each backend, float32, on the GPU (on the CPU
    without one: a test runs it there with the cpu backend so that it keeps up with the op layer)."""
    sys.path.insert(0, REPO)
    import torch

    from emcad_kernels import backends
    from emcad_kernels.selftest import evaluate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ran = 0
    for name in backend_names.split(","):
        backend = backends.get_backend(name)
        for op_name, op in backends.registered_ops().items():
            if name not in op.support or op.examples is None:
                continue
            for i, (args, kwargs) in enumerate(op.examples(device, torch.float32)):
                if backend.reasons(op.prepare(*args, **kwargs)):
                    continue
                evaluate(op, args, kwargs, name)
                if device == "cuda":
                    torch.cuda.synchronize()
                ran += 1
                print(f"{op_name} example {i} on {name}: forward and backward ran", flush=True)
    if ran == 0:  # a memcheck of nothing must not read as a pass
        print(f"sanitizer payload: no example ran on {backend_names} ({device})", flush=True)
        return 1
    print(f"sanitizer payload: done ({ran} examples)", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sanitizer_payload:
        return sanitizer_payload(args.sanitizer_payload)
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
