"""Shared parts of the GPU benchmark scripts (``bench_gpu.py``: triton; ``bench_cuda.py``: cuda vs triton): the
environment record, the timer, the copy bandwidth, and the plain-PyTorch compositions of the fused ops (the
baselines) with their fused calls.

Import it after ``TRITON_INTERPRET`` is decided: it imports ``emcad_kernels``.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import emcad_kernels as ek  # noqa: E402

B2_CHANNELS = (512, 320, 128, 64)  # EMCAD-B2 decoder widths at strides 32, 16, 8, 4
DRY_CHANNELS = (16, 12, 8, 4)
STRIDES = (32, 16, 8, 4)
MODES = ("fwd_eval", "fwd_train", "fwd_bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------
# environment and timing
# --------------------------------------------------------------------------------------------------
def _cmd(args) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    driver = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "gpu_name": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
        "driver": driver[0] if driver else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        # a copy of the working tree without .git (a lent GPU machine) gets the commit from the environment
        "git_commit": _cmd(["git", "rev-parse", "HEAD"]) or os.environ.get("EMCAD_GIT_COMMIT") or None,
        "backends_available": ek.available_backends(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        env.update(sm_count=prop.multi_processor_count, memory_gib=round(prop.total_memory / 2**30, 1),
                   capability=f"{prop.major}.{prop.minor}")
    return env


class Timer:
    """Median and 20/80 percentiles in ms: triton.testing.do_bench when available (L2 flushed between calls),
    otherwise CUDA events around each call after a warm-up; on CPU (dry run) one timed call."""

    def __init__(self, device: str, warmup_ms: float, rep_ms: float):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        try:
            import triton.testing
            self.do_bench = triton.testing.do_bench if device == "cuda" else None
        except ImportError:
            self.do_bench = None

    def __call__(self, fn, grad_to_none=None):
        if self.device != "cuda":
            fn()
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            return ms, ms, ms
        if self.do_bench is not None:
            q = self.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none,
                              quantiles=[0.5, 0.2, 0.8])
            return tuple(float(v) for v in q)
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end), 1e-3)
        for _ in range(max(1, int(self.warmup_ms / est))):
            fn()
        times = []
        for _ in range(max(5, int(self.rep_ms / est))):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            times.append((s, e))
        torch.cuda.synchronize()
        ms = sorted(s.elapsed_time(e) for s, e in times)
        pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
        return pick(0.5), pick(0.2), pick(0.8)

    def peak_memory(self, fn) -> float | None:
        """Peak allocated memory (MiB) of one call, above what was allocated before."""
        if self.device != "cuda":
            fn()
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth(timer: Timer, device: str) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written)."""
    nbytes = 2**30 if device == "cuda" else 2**24
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# the ops: plain PyTorch compositions (the baselines) with their fused call
# --------------------------------------------------------------------------------------------------
def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class MSDCRef(nn.Module):
    """MSDC + MSCB shuffle: depthwise 1/3/5 conv -> BN -> ReLU6 branches, summed, shuffled with C/2 groups."""

    def __init__(self, c, kernel_sizes=(1, 3, 5)):
        super().__init__()
        self.dwconvs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False),
                                                   nn.BatchNorm2d(c), nn.ReLU6()) for k in kernel_sizes)
        self.groups = c // 2

    def forward(self, x):
        return channel_shuffle(sum(branch(x) for branch in self.dwconvs), self.groups)

    def fused(self, x, backend="triton"):
        return ek.multi_scale_dwconv(x, [b[0].weight for b in self.dwconvs], [b[1] for b in self.dwconvs],
                                     activation="relu6", shuffle_groups=self.groups, training=self.training,
                                     backend=backend)


class UpDWRef(nn.Module):
    """EUCB front: nearest x2 upsampling -> depthwise 3x3 -> BN -> ReLU."""

    def __init__(self, c):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(self.up(x))))

    def fused(self, x, backend="triton"):
        return ek.upsample_dwconv(x, self.conv.weight, self.bn, mode="nearest", activation="relu",
                                  training=self.training, backend=backend)


class LGAGRef(nn.Module):
    """LGAG with EMCAD's aggregation: g + x * sigmoid(BN(psi(relu(BN(gconv(g)) + BN(gconv(x))))))."""

    def __init__(self, c):
        super().__init__()
        f = c // 2
        self.W_g = nn.Sequential(nn.Conv2d(c, f, 3, 1, 1, groups=f, bias=True), nn.BatchNorm2d(f))
        self.W_x = nn.Sequential(nn.Conv2d(c, f, 3, 1, 1, groups=f, bias=True), nn.BatchNorm2d(f))
        self.psi = nn.Sequential(nn.Conv2d(f, 1, 1, bias=True), nn.BatchNorm2d(1), nn.Sigmoid())
        self.groups = f

    def forward(self, g, x):
        return g + x * self.psi(torch.relu(self.W_g(g) + self.W_x(x)))

    def fused(self, g, x, backend="triton"):
        return ek.grouped_attention_gate(g, x, self.W_g[0].weight, self.W_g[0].bias, self.W_g[1], self.W_x[0].weight,
                                         self.W_x[0].bias, self.W_x[1], self.psi[0].weight, self.psi[0].bias,
                                         self.psi[1], groups=self.groups, add_gate_input=True, activation="relu",
                                         training=self.training, backend=backend)


def make_inputs(shapes, dtype, device, channels_last, requires_grad):
    out = []
    for s in shapes:
        t = torch.randn(s, device=device, dtype=dtype)
        if channels_last and t.dim() == 4:  # token inputs (B, N, C) are channels-last already
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_(requires_grad))
    return out


def env_row(env):
    return {k: env.get(k) for k in ("date", "gpu_name", "driver", "cuda", "torch", "triton", "git_commit")}
