"""``emcad bench``: forward and training-step time and memory of one model per backend and with torch.compile.

Rows: ``torch`` (plain module composition), each kernel backend that can run on the device, ``auto`` and, with
``compile=True`` (``--compile``), ``torch+compile`` and ``auto+compile``. Backends that cannot run here (not
built, or a GPU backend on a machine without one) are skipped with the reason (:func:`plan_configs`); a backend
that fails anyway is reported with its error instead of stopping the table.

Times are medians over ``iters`` timed runs after ``warmup`` runs (CUDA events synchronised on GPU). Memory is
measured on one further run: on GPU the peak CUDA allocation above what was allocated before it
(``torch.cuda.max_memory_allocated``); on CPU (Linux) the growth of the process's peak resident set size (VmHWM,
reset through ``/proc/self/clear_refs``) above the resident size before the run, after handing the allocator's
free memory back to the system (glibc ``malloc_trim``), so that memory kept from earlier runs does not hide the
run's own. Elsewhere the CPU memory is not measured (NaN).

The training step is the trainer's (``emcad.training.trainer.training_loss`` / ``training_forward_kwargs``): with
``loss_impl="auto"`` (the trainer's default) EMCADNet returns its low-resolution heads and the MUTATION loss runs
fused (``emcad_kernels.mutation_loss``). The ``torch`` and ``torch+compile`` rows are the plain PyTorch baseline:
upsampled heads and the plain loss, whatever ``loss_impl`` says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import statistics
import threading
import time
from typing import Callable, Optional, Sequence

import torch

__all__ = ["GPU_BACKENDS", "format_table", "plan_configs", "run_bench"]

# kernel backends that run CUDA tensors only (triton runs CPU tensors only under its interpreter, for tests)
GPU_BACKENDS = ("triton", "cuda")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # not Linux
        return 0


class _PeakRSS:
    def __init__(self):
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return max(self.peak - self.base, 0)


def _status_bytes(field: str) -> Optional[int]:
    """A ``/proc/self/status`` size field (VmRSS, VmHWM) in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_libc = None


def _release_free_memory() -> None:
    """Hand the C allocator's free memory back to the system (glibc), so the next run's RSS growth is its own."""
    global _libc
    gc.collect()
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def _cpu_peak_growth(fn: Callable[[], None]) -> float:
    """Peak resident-set growth in bytes during one call of ``fn`` (see the module docstring); NaN if unknown."""
    _release_free_memory()
    base = _status_bytes("VmRSS")
    if base is None:
        return math.nan
    if _reset_peak_rss():
        fn()
        peak = _status_bytes("VmHWM")
        return float(max(peak - base, 0)) if peak is not None else math.nan
    with _PeakRSS() as mem:  # no clear_refs: sample the resident size instead
        fn()
    return float(mem.growth)


def _time(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median milliseconds over ``iters`` runs, and the peak memory growth in bytes of one more run."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return statistics.median(times), float(torch.cuda.max_memory_allocated(device) - base)
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), _cpu_peak_growth(fn)


def plan_configs(backends: Optional[Sequence[str]], compile: bool, device: str | torch.device
                 ) -> tuple[list[tuple[str, bool]], list[str]]:
    """``(configs, skipped)``: the ``(backend, compiled)`` rows to run, and ``"what (why)"`` for each row left
    out. ``backends=None`` means torch, every kernel backend and auto. Unknown names raise ValueError."""
    from emcad_kernels import backends as registry

    dev = torch.device(device)
    names = list(backends) if backends is not None else ["torch", *registry.registered_backends(), "auto"]
    configs, skipped = [], []
    for name in names:
        if name in ("torch", "auto"):
            configs.append((name, False))
            continue
        reason = registry.get_backend(name).unavailable_reason()  # ValueError for an unknown name
        if reason is None and name in GPU_BACKENDS and dev.type != "cuda":
            reason = "no CUDA GPU" if not torch.cuda.is_available() else f"device is {dev.type}"
        if reason is None:
            configs.append((name, False))
        else:
            skipped.append(f"{name} ({reason})")
    if compile:
        configs += [("torch", True), ("auto", True)]
    else:
        skipped.insert(0, "torch.compile rows (use --compile)")
    return configs, skipped


def run_bench(model_name: str = "emcad_b0", *, size: Sequence[int] = (224, 224), batch_size: int = 4,
              num_classes: int = 9, in_channels: int = 3, backends: Optional[Sequence[str]] = None,
              compile: bool = False, iters: int = 10, warmup: int = 2, device: str = "auto",
              train_step: bool = True, log: Optional[Callable[[str], None]] = None,
              loss_impl: str = "auto", configs: Optional[Sequence[tuple[str, bool]]] = None) -> list[dict]:
    """One row per configuration: ``{"config", "forward_ms", "forward_mem_mb", "train_step_ms",
    "train_mem_mb", "speedup_fwd", "speedup_train", "error"}`` (speed-ups relative to ``torch``). ``configs``
    (from :func:`plan_configs`) replaces ``backends`` / ``compile``."""
    from emcad.models import create_model, set_backend
    from emcad.training.trainer import LOSS_IMPLS, logits_kwargs, training_forward_kwargs, training_loss

    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"--size must be multiples of 32, got {size[0]}x{size[1]}")
    if configs is None:
        configs, _ = plan_configs(backends, compile, dev)
    torch.manual_seed(0)
    extra = logits_kwargs(model_name)
    base_model = create_model(model_name, num_classes=num_classes, in_channels=in_channels, backend="torch", **extra)
    state = base_model.state_dict()
    x = torch.randn(batch_size, in_channels, *size, device=dev)
    y = torch.randint(0, max(num_classes, 2) if num_classes > 1 else 2, (batch_size, *size), device=dev)
    rows = []
    for backend, compiled in configs:
        name = backend + ("+compile" if compiled else "")
        row = {"config": name, "forward_ms": float("nan"), "forward_mem_mb": float("nan"),
               "train_step_ms": float("nan"), "train_mem_mb": float("nan"), "error": ""}
        if log:
            log(f"bench: {name} ...")
        try:
            model = create_model(model_name, num_classes=num_classes, in_channels=in_channels, backend="torch",
                                 **extra)
            model.load_state_dict(state)
            set_backend(model, backend)
            model.to(dev)
            run = torch.compile(model) if compiled else model

            def forward():
                with torch.no_grad():
                    run(x)

            model.eval()
            row["forward_ms"], mem = _time(forward, iters, warmup, dev)
            row["forward_mem_mb"] = mem / 2 ** 20
            if train_step:
                model.train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
                impl = "plain" if backend == "torch" else loss_impl  # the PyTorch baseline: plain loss
                criterion = training_loss(num_classes, impl)
                fwd_kwargs = training_forward_kwargs(model, impl)

                def step():
                    loss = criterion(run(x, **fwd_kwargs), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                row["train_step_ms"], mem = _time(step, iters, warmup, dev)
                row["train_mem_mb"] = mem / 2 ** 20
        except Exception as e:  # report and go on with the other rows
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
        rows.append(row)
        if log:
            log(f"bench: {name}: forward {row['forward_ms']:.2f} ms, training step {row['train_step_ms']:.2f} ms"
                + (f" ({row['error']})" if row["error"] else ""))
    ref = next((r for r in rows if r["config"] == "torch"), None)
    for r in rows:
        for key, out in (("forward_ms", "speedup_fwd"), ("train_step_ms", "speedup_train")):
            r[out] = (ref[key] / r[key]) if ref and r[key] == r[key] and r[key] > 0 else float("nan")
    for r in rows:
        r["device"] = str(dev)
        r["shape"] = f"{batch_size}x{in_channels}x{size[0]}x{size[1]}"
    return rows


def format_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "(no rows)"
    head = (f"{'config':<16}{'fwd ms':>10}{'fwd MB':>10}{'x torch':>9}{'train ms':>11}{'train MB':>10}"
            f"{'x torch':>9}")
    memory = ("peak CUDA allocation of one run" if rows[0]["device"].startswith("cuda") else
              "peak resident-set growth of one run")
    lines = [f"{rows[0]['shape']} on {rows[0]['device']} (memory: {memory})", head]

    def f(v, fmt):
        return format(v, fmt) if v == v else "-"

    for r in rows:
        line = (f"{r['config']:<16}{f(r['forward_ms'], '10.2f'):>10}{f(r['forward_mem_mb'], '10.1f'):>10}"
                f"{f(r['speedup_fwd'], '8.2f'):>9}{f(r['train_step_ms'], '11.2f'):>11}"
                f"{f(r['train_mem_mb'], '10.1f'):>10}{f(r['speedup_train'], '8.2f'):>9}")
        if r["error"]:
            line += f"  error: {r['error']}"
        lines.append(line)
    return "\n".join(lines)
