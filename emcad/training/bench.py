"""``emcad bench``: forward and training-step time and memory of one model per backend and with torch.compile.

Rows: ``torch`` (plain module composition), each available ``emcad_kernels`` backend, ``auto`` and, unless
disabled, ``torch+compile`` and ``auto+compile``. Times are medians over ``iters`` timed runs after ``warmup``
runs (CUDA events synchronised on GPU). Memory is the peak CUDA allocation on GPU; on CPU it is the peak growth of
the process's resident set size sampled during the runs (approximate). A backend that fails is reported with its
error instead of stopping the table.

The training step is the trainer's (``emcad.training.trainer.training_loss`` / ``training_forward_kwargs``): with
``loss_impl="auto"`` (the trainer's default) EMCADNet returns its low-resolution heads and the MUTATION loss runs
fused (``emcad_kernels.mutation_loss``). The ``torch`` and ``torch+compile`` rows are the plain PyTorch baseline:
upsampled heads and the plain loss, whatever ``loss_impl`` says.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable, Optional, Sequence

import torch

__all__ = ["format_table", "run_bench"]


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


def _time(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> tuple[float, int]:
    """Median milliseconds and peak memory bytes."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), torch.cuda.max_memory_allocated(device) - base
    with _PeakRSS() as mem:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), mem.growth


def run_bench(model_name: str = "emcad_b0", *, size: Sequence[int] = (224, 224), batch_size: int = 4,
              num_classes: int = 9, in_channels: int = 3, backends: Optional[Sequence[str]] = None,
              compile: bool = True, iters: int = 10, warmup: int = 2, device: str = "auto",
              train_step: bool = True, log: Optional[Callable[[str], None]] = None,
              loss_impl: str = "auto") -> list[dict]:
    """One row per configuration: ``{"config", "forward_ms", "forward_mem_mb", "train_step_ms",
    "train_mem_mb", "speedup_fwd", "speedup_train", "error"}`` (speed-ups relative to ``torch``)."""
    import emcad_kernels

    from emcad.models import create_model, set_backend
    from emcad.training.trainer import LOSS_IMPLS, logits_kwargs, training_forward_kwargs, training_loss

    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"--size must be multiples of 32, got {size[0]}x{size[1]}")
    if backends is None:
        backends = ["torch", *emcad_kernels.available_backends(), "auto"]
    configs = [(b, False) for b in backends]
    if compile:
        configs += [("torch", True), ("auto", True)]
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
    lines = [f"{rows[0]['shape']} on {rows[0]['device']} (memory: peak "
             f"{'CUDA allocation' if rows[0]['device'].startswith('cuda') else 'RSS growth, approximate'})", head]

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
