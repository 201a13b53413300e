"""``emcad selftest``: every registered op on every usable backend against the reference, on this machine.

For each op (``backends.registered_ops()``), each usable fused backend, each of its devices present here and each
of its dtypes, the op's ``examples`` (small public-function calls with odd shapes, ``OpDescriptor.examples``) run
forward and backward on that backend; the output, every input gradient and every tensor the call updates in place
(BatchNorm running statistics) are compared with the reference backend by the 2x rule of
``emcad_kernels.testing`` (the reference in float64 on the CPU as the truth, the reference in the same dtype as the
yardstick). One line per (op, backend, device, dtype): pass / FAIL / ERROR / skip, how many examples ran, the
largest error and the largest share of its tolerance. The exit status of the command is 1 if any check failed.

Python API::

    from emcad_kernels import selftest
    report = selftest.run(backends=["cuda"], dtypes=["bfloat16"])
    print(report.table()); assert report.ok

The Triton backend runs CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, read when the
package's Triton kernels are first imported): ``emcad selftest --include-interpreter`` re-runs itself with it set.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
GRAD_SEED = 1234


@dataclass
class Row:
    """The checks of one op on one backend, device and dtype."""

    op: str
    backend: str
    device: str
    dtype: str
    status: str  # "pass", "FAIL", "ERROR" (the backend raised), "skip" (the backend refused every example)
    examples_run: int
    examples: int
    max_error: Optional[float] = None
    tolerance_share: Optional[float] = None  # max over entries of error / tolerance (<= 1 passes)
    details: list[str] = field(default_factory=list)  # failures, errors, refusals (one line each)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "ERROR")


@dataclass
class Report:
    rows: list[Row]
    notes: list[str]
    seconds: float

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        head = f"{'op':<26} {'backend':<9} {'device':<6} {'dtype':<9} {'result':<6} {'examples':>8} " \
               f"{'max error':>10} {'of tol.':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            err = "-" if r.max_error is None else f"{r.max_error:.2e}"
            share = "-" if r.tolerance_share is None else f"{100 * r.tolerance_share:.0f}%"
            lines.append(f"{r.op:<26} {r.backend:<9} {r.device:<6} {r.dtype:<9} {r.status:<6} "
                         f"{f'{r.examples_run}/{r.examples}':>8} {err:>10} {share:>7}")
        problems = [(r, d) for r in self.rows if r.failed for d in r.details]
        if problems:
            lines += ["", "failures:"]
            lines += [f"  {r.op} on {r.backend}/{r.device}/{r.dtype}: {d}" for r, d in problems]
        if self.notes:
            lines += ["", "notes:"] + [f"  {n}" for n in self.notes]
        counts = {s: sum(r.status == s for r in self.rows) for s in ("pass", "FAIL", "ERROR", "skip")}
        lines += ["", f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['ERROR']} raised, "
                      f"{counts['skip']} skipped (op, backend, device, dtype) combinations in {self.seconds:.1f} s"]
        if not any(r.status in ("pass", "FAIL", "ERROR") for r in self.rows):
            lines.append("nothing was checked: no fused backend ran here (see the notes)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"ok": self.ok, "seconds": self.seconds, "notes": self.notes, "rows": [asdict(r) for r in self.rows]}


# --------------------------------------------------------------------------------------------------
# one evaluation: forward, backward, what the call updated
# --------------------------------------------------------------------------------------------------
def _walk(value, name: str):
    """(name, tensor) for every tensor in nested args (lists, tuples, NamedTuples such as BatchNormParams)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        for f in value._fields:
            yield from _walk(getattr(value, f), f"{name}.{f}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{name}[{i}]")


def evaluate(op, args: tuple, kwargs: dict, backend: str) -> dict:
    """Runs one example of ``op`` on ``backend`` (as its public function does) and returns {name: tensor or
    None}: the outputs, the gradient of every input that requires grad (for fixed random upstream gradients) and
    every other floating-point input after the call (BatchNorm running statistics are updated in place)."""
    import torch

    from . import backends

    # named after the public function's parameters: "grad x", "grad bn[1].weight", "bn[1].running_mean after ..."
    bound = inspect.signature(op.prepare).bind(*args, **kwargs).arguments
    named = [pair for key, value in bound.items() for pair in _walk(value, key)]
    leaves = [(n, t) for n, t in named if t.requires_grad]
    others = [(n, t) for n, t in named if not t.requires_grad and t.is_floating_point()]
    out = backends.run(op.prepare(*args, **kwargs), backend)
    outputs = [out] if isinstance(out, torch.Tensor) else list(out)
    result = {("out" if len(outputs) == 1 else f"out[{i}]"): o.detach().clone() for i, o in enumerate(outputs)}
    differentiable = [o for o in outputs if o.requires_grad]
    if leaves and differentiable:
        gen = torch.Generator().manual_seed(GRAD_SEED)
        upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
                    for o in differentiable]
        grads = torch.autograd.grad(differentiable, [t for _, t in leaves], upstream, allow_unused=True)
        result.update({f"grad {n}": (None if g is None else g.detach()) for (n, _), g in zip(leaves, grads)})
    result.update({f"{n} after the call": t.detach().clone() for n, t in others})
    return result


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:300]}"


# --------------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------------
class _Checker:
    def __init__(self):
        self._reference: dict = {}

    def reference(self, op, index: int, device: str, dtype) -> dict:
        key = (op.name, index, device, dtype)
        if key not in self._reference:
            args, kwargs = op.examples(device, dtype)[index]
            self._reference[key] = evaluate(op, args, kwargs, "reference")
        return self._reference[key]

    def check(self, op, backend, device: str, dtype) -> Row:
        import torch

        from .testing import compare

        start = time.perf_counter()
        dtype_name = str(dtype).replace("torch.", "")
        examples = op.examples(device, dtype)
        row = Row(op.name, backend.name, device, dtype_name, "skip", 0, len(examples))
        errors, shares, failed, raised = [], [], False, False
        for i, (args, kwargs) in enumerate(examples):
            try:
                reasons = backend.reasons(op.prepare(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - a broken example must show up, not stop the run
                row.details.append(f"example {i}: its arguments are rejected ({_first_line(e)})")
                raised = True
                continue
            if reasons:
                row.details.append(f"example {i}: refused: " + "; ".join(reasons))
                continue
            args, kwargs = op.examples(device, dtype)[i]  # fresh tensors: the check above may not touch them
            try:
                got = evaluate(op, args, kwargs, backend.name)
            except Exception as e:  # noqa: BLE001 - reported as ERROR
                row.details.append(f"example {i}: {_first_line(e)}")
                raised = True
                continue
            row.examples_run += 1
            comparisons = compare(got, self.reference(op, i, device, dtype),
                                  self.reference(op, i, "cpu", torch.float64), dtype)
            for c in comparisons:
                errors.append(c.error)
                shares.append(c.error / c.tolerance if c.tolerance > 0 else (0.0 if c.error == 0 else math.inf))
                if not c.ok:
                    failed = True
                    row.details.append(c.message(f"example {i}"))
        if errors:
            row.max_error, row.tolerance_share = max(errors), max(shares)
        row.status = "ERROR" if raised else "FAIL" if failed else "pass" if row.examples_run else "skip"
        row.seconds = time.perf_counter() - start
        return row


def _dtype(name: str):
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPE_NAMES}")
    return getattr(torch, name)


def run(ops: Optional[Sequence[str]] = None, backends: Optional[Sequence[str]] = None,
        devices: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None,
        include_interpreter: bool = False, progress: Optional[Callable[[Row], None]] = None) -> Report:
    """Checks ``ops`` (default: every registered op) on ``backends`` (default: every registered backend but the
    reference) for ``devices`` (default: cpu, and cuda when available) and ``dtypes`` (default: each backend's).
    The triton backend on CPU (Triton's interpreter, only when ``TRITON_INTERPRET=1`` was set before the import)
    is checked only with ``include_interpreter``. ``progress`` is called with each finished row."""
    import torch

    from . import backends as registry

    start = time.perf_counter()
    all_ops = registry.registered_ops()
    unknown = [o for o in (ops or ()) if o not in all_ops]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; expected some of {sorted(all_ops)}")
    names = list(backends) if backends else [b for b in registry.registered_backends() if b != "reference"]
    for name in names:
        registry.get_backend(name)  # unknown names raise with the list
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = None if dtypes is None else [_dtype(d) for d in dtypes]
    notes, rows, checker = [], [], _Checker()
    for name in names:
        backend = registry.get_backend(name)
        reason = backend.unavailable_reason()
        if reason:
            notes.append(f"{name}: not checked, unavailable here: {reason}")
            continue
        for device in devices:
            if name == "triton" and device == "cpu" and not (include_interpreter and device in backend.devices):
                notes.append("triton on cpu: not checked; CPU tensors run only through Triton's interpreter (slow, "
                             "for tests): --include-interpreter" + (" (needs TRITON_INTERPRET=1 before emcad_kernels is "
                                                                     "imported)" if include_interpreter else ""))
                continue
            if backend.devices is not None and device not in backend.devices:
                continue
            for dtype in backend.dtypes if wanted is None else [d for d in wanted if d in backend.dtypes]:
                missing = []
                for op_name, op in all_ops.items():
                    if ops and op_name not in ops:
                        continue
                    if backend.support_name != "reference" and backend.support_name not in op.support:
                        missing.append(op_name)
                        continue
                    if op.examples is None:
                        notes.append(f"{op_name}: not checked, its descriptor has no examples")
                        continue
                    row = checker.check(op, backend, device, dtype)
                    rows.append(row)
                    if progress is not None:
                        progress(row)
                if missing and dtype == backend.dtypes[0]:
                    notes.append(f"{name} does not implement: {', '.join(missing)} (auto uses another backend)")
    return Report(rows, list(dict.fromkeys(notes)), time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v for v in value.split(",") if v] if value else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", help="comma list of ops (default: all registered)")
    parser.add_argument("--backends", help="comma list of backends (default: all but the reference)")
    parser.add_argument("--devices", help="comma list of cpu, cuda (default: cpu, and cuda when available)")
    parser.add_argument("--dtypes", help=f"comma list of {', '.join(DTYPE_NAMES)} (default: each backend's)")
    parser.add_argument("--include-interpreter", action="store_true",
                        help="also check the triton backend on CPU through Triton's interpreter (slow)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the table")


def _triton_interpreter_loaded() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def main(args: argparse.Namespace) -> int:
    import torch

    if args.include_interpreter and not _triton_interpreter_loaded():
        if torch.cuda.is_available():
            print("note: --include-interpreter is ignored on a machine with a GPU (triton runs on the GPU)")
        else:
            # TRITON_INTERPRET is read when the backends are registered and the Triton kernels imported: start afresh
            argv = [sys.executable, "-m", "emcad.cli", "selftest", "--include-interpreter"] + _argv_of(args)
            return subprocess.call(argv, env=dict(os.environ, TRITON_INTERPRET="1"))

    from . import __version__

    done: list[Row] = []

    def progress(row: Row) -> None:
        if not args.quiet:
            print(f"  {row.op} on {row.backend}/{row.device}/{row.dtype}: {row.status} ({row.seconds:.1f} s)",
                  file=sys.stderr, flush=True)
        if args.json:  # rewritten after every row: an interrupted run keeps what it checked
            done.append(row)
            _write_json(args.json, {"complete": False, "rows": [asdict(r) for r in done]})

    if not args.quiet:
        print(f"emcad-kernels {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
              + (", Triton interpreter on" if _triton_interpreter_loaded() else ""), flush=True)
    try:
        report = run(_split(args.ops), _split(args.backends), _split(args.devices), _split(args.dtypes),
                     args.include_interpreter, progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table(), flush=True)
    if args.json:
        _write_json(args.json, dict(report.to_json(), complete=True))
    return 0 if report.ok else 1


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` as command-line arguments."""
    out = []
    for option in ("ops", "backends", "devices", "dtypes", "json"):
        value = getattr(args, option)
        if value:
            out += [f"--{option}", value]
    return out + (["--quiet"] if args.quiet else [])
