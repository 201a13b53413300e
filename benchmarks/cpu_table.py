"""CPU benchmark of the fused ``cpu`` backend against PyTorch, side by side in one run; writes a markdown table.

    python benchmarks/cpu_table.py                      # full table -> benchmarks/results/cpu_table.md
    python benchmarks/cpu_table.py --quick              # fewer shapes / repeats
    python benchmarks/cpu_table.py --only msdc --res 352

Baselines: for each op the best of the plain PyTorch composition (what ``backend="torch"`` modules
run) in eager NCHW, eager channels_last and ``torch.compile`` (inductor, default mode) of the same composition.
The fused provider is the public functional call with ``backend="cpu"`` (Python checks and dispatch included).
Modes: forward in eval mode, and forward + backward in training mode (batch-statistics BN, running-stat
updates). Whole decoder: inference, and a training step (forward, backward, SGD step), fused vs ``"torch"``;
the fused decoder ("cpu" rows) is the default ``backend="auto"``: the cpu kernels for MSDC / EUCB / LGAG and
``mscam`` (csrc/cpu/mscam.cpp). Also: saved-activation bytes of a decoder training step (``saved_tensors_hooks``) and the fraction of the
measured copy bandwidth that the eval-mode MSDC kernel reaches.

Section ``mscam``: the MSCAM attention (CAB then SAB) of the four decoder stages: plain CAB + SAB modules
(NCHW, channels_last, torch.compile), the reference backend's ``mscam`` op and the cpu kernel, forward and forward + backward; and
the fused decoder with the ``mscam`` cpu kernel vs ``mscam`` on the reference backend (inference, training step).

Section ``fusion``: decoder inference before / after eval-mode pointwise folding and the ``mscam`` op
in one run, EMCADNet's heads (all four vs ``heads="last"``), and operator / compute-launch counts per decoder
forward from ``torch.profiler`` (``op_counts``). On a machine shared with other jobs, two OpenMP threads wait for
each other at every barrier while one of them is descheduled, so wall-clock times balloon; ``--threads 1 --clock
cpu`` (CPU time of one thread) is then the stable measure:

    python benchmarks/cpu_table.py --only fusion --threads 1 --clock cpu

Section ``loss``: the MUTATION deep-supervision loss (9 classes, ce_dice, 15 subsets) forward +
backward from EMCADNet's low-resolution head logits (strides 32, 16, 8, 4): the plain ``SegmentationLoss`` on
the bilinearly upsampled heads (eager, and ``torch.compile`` of the same function) vs the fused
``emcad_kernels.mutation_loss`` (``cpu`` backend, and the ``reference`` backend); time and the peak of the bytes
resident-set growth of one forward + backward (first call, fresh process).

Section ``mixffn``: the middle of PVTv2's Mix-FFN (depthwise 3x3 + bias + exact GELU on ``(B, H*W, C)`` tokens) at
the four PVTv2-B2 stages: PVTv2's modules in eager NCHW (what ``backend="torch"`` runs), on a channels_last view,
and torch.compile of them, vs ``token_dwconv_gelu(backend="cpu")``; forward and forward + backward.

Section ``e2e``: the B2 decoder and whole EMCADNet-B2 / -B0, inference and a training step (the fused models with
the fused MUTATION loss), every row against the best of ``backend="torch"`` in NCHW, in channels_last and
torch.compile of it; bf16-autocast inference where the CPU has avx512_bf16, and the demo model's Dice in bf16 vs
fp32. The command of the end-to-end results (``benchmarks/results/cpu_end_to_end.md``):

    python benchmarks/cpu_table.py --res 224 --only msdc --only eucb --only lgag --only mscam --only mixffn \\
        --only e2e --rounds 3 --reps 2 --threads 1 --clock cpu --out benchmarks/results/cpu_end_to_end.md

(one thread and CPU time because the machine was shared; on an idle machine drop ``--threads 1 --clock cpu``).

Timing: every provider of a row is measured in interleaved rounds (round-robin, so a load change on a shared
machine hits all of them alike); the reported time is the best over all rounds and repetitions.
Threads: ``torch.set_num_threads(2)``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import emcad_kernels as ek  # noqa: E402
from emcad_kernels import _ext  # noqa: E402

THREADS = 2
# time.perf_counter (wall clock, the default) or time.process_time (``--clock cpu``: CPU time of this process,
# all threads summed; with ``--threads 1`` a load-robust stand-in for wall time on a machine shared with others)
CLOCK = time.perf_counter
RESOLUTIONS = {224: 6, 352: 8}  # image size -> batch (EMCAD-B2 training recipes)
B2_CHANNELS = (512, 320, 128, 64)  # decoder widths deep -> shallow (strides 32, 16, 8, 4)
EF = 2  # MSCB expansion


# --------------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------------
def msdc_shapes(res):
    """MSDC tensors of the four MSCBs: (N, E=2C, H, W)."""
    n = RESOLUTIONS[res]
    return [(n, EF * c, res // s, res // s) for c, s in zip(B2_CHANNELS, (32, 16, 8, 4))]


def eucb_shapes(res):
    """EUCB inputs (upsampled x2): (N, C_in, H, W) for eucb3, eucb2, eucb1."""
    n = RESOLUTIONS[res]
    return [(n, c, res // s, res // s) for c, s in zip(B2_CHANNELS[:3], (32, 16, 8))]


def lgag_shapes(res):
    """LGAG g/x tensors: (N, C, H, W) for lgag3, lgag2, lgag1."""
    n = RESOLUTIONS[res]
    return [(n, c, res // s, res // s) for c, s in zip(B2_CHANNELS[1:], (16, 8, 4))]


# --------------------------------------------------------------------------------------------------
# plain PyTorch compositions (the baselines) and fused calls
# --------------------------------------------------------------------------------------------------
def _init_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


class PlainMSDC(nn.Module):
    """MSDC branches (conv -> BN -> ReLU6), summed, then the MSCB channel shuffle (groups = C/2)."""

    def __init__(self, c, ks=(1, 3, 5)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False) for k in ks)
        self.bns = nn.ModuleList(_init_bn(nn.BatchNorm2d(c)) for _ in ks)
        self.groups = c // 2

    def forward(self, x):
        y = sum(F.relu6(bn(conv(x))) for conv, bn in zip(self.convs, self.bns))
        n, c, h, w = y.shape
        return y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def fused(self, x):
        return ek.multi_scale_dwconv(x, [c.weight for c in self.convs], list(self.bns), activation="relu6",
                                     shuffle_groups=self.groups, training=self.training, backend="cpu")


class PlainUpDw(nn.Module):
    """EUCB front: nearest x2 -> depthwise 3x3 -> BN -> ReLU (the identity shuffle is a copy in eager)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn = _init_bn(nn.BatchNorm2d(c))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))))
        n, c, h, w = y.shape
        return y.view(n, c, 1, h, w).transpose(1, 2).reshape(n, c, h, w)

    def fused(self, x):
        return ek.upsample_dwconv(x, self.conv.weight, self.bn, scale=2, mode="nearest", activation="relu",
                                  training=self.training, backend="cpu")


class PlainLGAG(nn.Module):
    """LGAG with EMCAD's grouping (groups = C/2) and the aggregation: g + x * psi."""

    def __init__(self, c):
        super().__init__()
        f = c // 2
        self.W_g = nn.Sequential(nn.Conv2d(c, f, 3, 1, 1, groups=f), _init_bn(nn.BatchNorm2d(f)))
        self.W_x = nn.Sequential(nn.Conv2d(c, f, 3, 1, 1, groups=f), _init_bn(nn.BatchNorm2d(f)))
        self.psi = nn.Sequential(nn.Conv2d(f, 1, 1), _init_bn(nn.BatchNorm2d(1)), nn.Sigmoid())
        self.groups = f

    def forward(self, g, x):
        return g + x * self.psi(F.relu(self.W_g(g) + self.W_x(x)))

    def fused(self, g, x):
        return ek.grouped_attention_gate(g, x, self.W_g[0].weight, self.W_g[0].bias, self.W_g[1],
                                         self.W_x[0].weight, self.W_x[0].bias, self.W_x[1], self.psi[0].weight,
                                         self.psi[0].bias, self.psi[1], groups=self.groups, add_gate_input=True,
                                         training=self.training, backend="cpu")


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
SECTIONS = ("msdc", "eucb", "lgag", "mscam", "decoder", "memory", "bandwidth", "bnact", "isa", "fusion", "loss",
            "mixffn", "e2e")


def measure(providers: dict[str, Callable[[], None]], rounds: int, reps: int) -> dict[str, float]:
    """Best time over interleaved rounds of ``reps`` calls each, in milliseconds. The minimum, not the median:
    on a shared machine other processes only ever add time, and every provider gets the same chances."""
    for fn in providers.values():  # warm-up (compilation, allocator)
        fn()
        fn()
    samples = {k: [] for k in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            best = float("inf")
            for _ in range(reps):
                t0 = CLOCK()
                fn()
                best = min(best, CLOCK() - t0)
            samples[name].append(best * 1e3)
    return {k: min(v) for k, v in samples.items()}


def _compile(mod_or_fn):
    torch._dynamo.reset()
    return torch.compile(mod_or_fn)


OP_PROVIDERS = ("eager nchw", "eager cl", "compile", "cpu (nchw)", "cpu (cl)")


def op_providers(kind: str, shape, mode: str, with_compile: bool = True,
                 only: Optional[tuple] = None) -> dict[str, Callable[[], None]]:
    """Callables for one benchmark row: baselines nchw/cl/compile and the fused cpu call (``only``: a subset)."""
    torch.manual_seed(0)
    n, c, h, w = shape
    training = mode == "train"
    mod = {"msdc": PlainMSDC, "eucb": PlainUpDw, "lgag": PlainLGAG}[kind](c).train(training)
    n_inputs = 2 if kind == "lgag" else 1
    x_nchw = [torch.randn(shape) for _ in range(n_inputs)]
    x_cl = [t.contiguous(memory_format=torch.channels_last) for t in x_nchw]
    mod_cl = copy.deepcopy(mod).to(memory_format=torch.channels_last)
    want = set(only or OP_PROVIDERS)
    compiled = _compile(copy.deepcopy(mod)) if with_compile and "compile" in want else None

    def run(fn, inputs):
        if training:
            ins = [t.detach().requires_grad_(True) for t in inputs]

            def step():
                out = fn(*ins)
                out.backward(torch.ones_like(out))
            return step

        def fwd():
            with torch.no_grad():
                fn(*inputs)
        return fwd

    providers = {"eager nchw": run(mod, x_nchw), "eager cl": run(mod_cl, x_cl)}
    if compiled is not None:
        providers["compile"] = run(compiled, x_nchw)
    fused_mod = copy.deepcopy(mod)
    providers["cpu (nchw)"] = run(fused_mod.fused, x_nchw)
    providers["cpu (cl)"] = run(fused_mod.fused, x_cl)
    return {k: v for k, v in providers.items() if k in want}


def mscam_shapes(res):
    """MSCAM attention inputs of the four decoder stages: (N, C, H, W), deep -> shallow."""
    n = RESOLUTIONS[res]
    return [(n, c, res // s, res // s) for c, s in zip(B2_CHANNELS, (32, 16, 8, 4))]


def mscam_providers(shape, mode: str, with_compile: bool = True) -> dict[str, Callable[[], None]]:
    """One row of the ``mscam`` section: the plain CAB + SAB modules (``d = cab(x) * x; sab(d) * d``, what
    ``backend="torch"`` runs) in NCHW and channels_last and torch.compile of them, the reference backend's
    ``mscam`` op and the cpu
    kernel (the public ``ek.mscam`` call). ``eval``: forward under no_grad; ``train``: forward + backward (the
    gradients of x and of the three weights)."""
    from emcad.models import CAB, SAB
    torch.manual_seed(0)
    c = shape[1]
    cab, sab = CAB(c), SAB(7)
    with torch.no_grad():  # non-trivial gates (the default init makes every gate ~0.5)
        for p in (*cab.parameters(), *sab.parameters()):
            p.copy_(torch.randn(p.shape) * (1.5 / p[0].numel() ** 0.5))
    for m in (cab, sab):
        m.set_backend("torch")
    training = mode == "train"
    x_nchw = torch.randn(shape)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    grad = {False: torch.randn(shape), True: torch.randn(shape).contiguous(memory_format=torch.channels_last)}

    def plain(x):
        d = cab(x) * x
        return sab(d) * d

    def op(backend):
        return lambda x: ek.mscam(x, cab.fc1.weight, cab.fc2.weight, sab.conv.weight, activation="relu",
                                  backend=backend)

    def run(fn, x):
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if training:
            xr = x.detach().requires_grad_(True)

            def step():
                fn(xr).backward(grad[cl])
            return step

        def fwd():
            with torch.no_grad():
                fn(x)
        return fwd

    return {"eager nchw": run(plain, x_nchw), "eager cl": run(plain, x_cl),
            **({"compile": run(_compile(plain), x_nchw)} if with_compile else {}),
            "reference (nchw)": run(op("reference"), x_nchw), "reference (cl)": run(op("reference"), x_cl),
            "cpu (nchw)": run(op("cpu"), x_nchw), "cpu (cl)": run(op("cpu"), x_cl)}


def mscam_decoder_providers(res, mode):
    """The fused decoder (``backend="auto"``, NCHW and channels_last) with the cpu backend's ``mscam`` kernel and
    with ``mscam`` on the reference backend (the state before the kernel existed: the cpu entry taken out of the
    mscam descriptor during the call), in one run."""
    from emcad_kernels.ops.mscam import MSCAM
    cpu_support = MSCAM.support["cpu"]

    def on_reference(fn):
        def call():
            del MSCAM.support["cpu"]
            ek.backends.clear_decisions()
            try:
                fn()
            finally:
                MSCAM.support["cpu"] = cpu_support
                ek.backends.clear_decisions()
        return call
    new, old = decoder_providers(res, mode), decoder_providers(res, mode)
    return {"nchw, mscam reference": on_reference(old["cpu (nchw)"]), "nchw, mscam cpu": new["cpu (nchw)"],
            "cl, mscam reference": on_reference(old["cpu (cl)"]), "cl, mscam cpu": new["cpu (cl)"]}


# --------------------------------------------------------------------------------------------------
# whole decoder
# --------------------------------------------------------------------------------------------------
def decoder_inputs(res, channels_last=False):
    n = RESOLUTIONS[res]
    feats = [torch.randn(n, c, res // s, res // s) for c, s in zip(B2_CHANNELS, (32, 16, 8, 4))]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    return feats[0], feats[1:]


def make_decoder(backend):
    from emcad.models.decoder import EMCAD
    torch.manual_seed(0)
    dec = EMCAD(B2_CHANNELS, backend=backend)
    for m in dec.modules():
        if isinstance(m, nn.BatchNorm2d):
            _init_bn(m)
    return dec


def decoder_providers(res, mode):
    providers = {}
    for label, backend, cl in (("torch nchw", "torch", False), ("torch cl", "torch", True),
                               ("cpu (nchw)", "auto", False), ("cpu (cl)", "auto", True)):
        dec = make_decoder(backend)
        if cl:
            dec = dec.to(memory_format=torch.channels_last)
        x, skips = decoder_inputs(res, cl)
        if mode == "eval":
            dec.eval()

            def fwd(dec=dec, x=x, skips=skips):
                with torch.no_grad():
                    dec(x, skips)
            providers[label] = fwd
        else:
            dec.train()
            opt = torch.optim.SGD(dec.parameters(), lr=1e-3, momentum=0.9)

            def step(dec=dec, x=x, skips=skips, opt=opt):
                opt.zero_grad(set_to_none=True)
                outs = dec(x, skips)
                sum(o.float().mean() for o in outs).backward()
                opt.step()
            providers[label] = step
    return providers


def decoder_compile_provider(res, mode):
    """torch.compile (inductor) of the ``backend="torch"`` decoder: inference, or the training step of
    ``decoder_providers`` with forward + loss compiled."""
    dec = make_decoder("torch")
    x, skips = decoder_inputs(res)
    if mode == "eval":
        fn = _compile(dec.eval())

        def fwd():
            with torch.no_grad():
                fn(x, skips)
        return fwd
    dec.train()
    opt = torch.optim.SGD(dec.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = _compile(lambda a, b: sum(o.float().mean() for o in dec(a, b)))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(x, skips).backward()
        opt.step()
    return step


def saved_activation_bytes(backend, res, channels_last=False):
    """Bytes of distinct tensors saved for backward during one decoder training forward."""
    dec = make_decoder(backend).train()
    x, skips = decoder_inputs(res, channels_last)
    if channels_last:
        dec = dec.to(memory_format=torch.channels_last)
    params = {p.untyped_storage().data_ptr() for p in dec.parameters()}
    inputs = {t.untyped_storage().data_ptr() for t in (x, *skips)}
    seen, total = set(), [0]

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen and key not in params and key not in inputs:
            seen.add(key)
            total[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = dec(x, skips)
    del outs
    return total[0]


def _isa_available(ext, name: str) -> bool:
    before = ext.cpu_isa()
    try:
        ext.set_cpu_isa(name)
        return True
    except (ValueError, RuntimeError):
        return False
    finally:
        ext.set_cpu_isa(before)


def copy_bandwidth_gbs(numel=64 * 2**20 // 4, rounds=5, reps=5):
    """Copy bandwidth (bytes read + written per second) with torch's own copy on THREADS threads."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    t = measure({"copy": lambda: dst.copy_(src)}, rounds, reps)["copy"]
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# eval-mode pointwise folding, heads at inference, op counts
# --------------------------------------------------------------------------------------------------
def folding_providers(res):
    """Decoder inference: torch baselines, and the fused cpu backend without the eval-mode folding and the mscam op
    ("unfolded": ``FOLD_EVAL_POINTWISE = False`` and plain CAB / SAB) and with them ("folded": folded pointwise convs, the
    ``mscam`` op), NCHW and channels_last, in one run. "folded" runs ``backend="auto"``: the cpu kernels for
    MSDC / EUCB / LGAG and ``mscam``."""
    from emcad.models import blocks

    def with_fold(fold, fn):
        def call():
            old = blocks.FOLD_EVAL_POINTWISE
            blocks.FOLD_EVAL_POINTWISE = fold
            try:
                fn()
            finally:
                blocks.FOLD_EVAL_POINTWISE = old
        return call

    providers = {}
    for label, backend, cl, fold in (("torch nchw", "torch", False, True), ("torch cl", "torch", True, True),
                                     ("cpu nchw unfolded", "cpu", False, False),
                                     ("cpu cl unfolded", "cpu", True, False),
                                     ("cpu nchw folded", "auto", False, True), ("cpu cl folded", "auto", True, True)):
        dec = make_decoder(backend).eval()
        if not fold:  # the fused path before the eval-mode folding and the mscam op: plain CAB / SAB too (no mscam op)
            for m in (dec.cab4, dec.cab3, dec.cab2, dec.cab1, dec.sab):
                m.set_backend("torch")
        if cl:
            dec = dec.to(memory_format=torch.channels_last)
        x, skips = decoder_inputs(res, cl)

        def fwd(dec=dec, x=x, skips=skips):
            with torch.no_grad():
                dec(x, skips)
        providers[label] = with_fold(fold, fwd)
    return providers


def heads_providers(res, num_classes=9):
    """EMCADNet's heads on B2 decoder outputs: all four heads + four full-size upsamplings vs p1 only."""
    n = RESOLUTIONS[res]
    ds = [torch.randn(n, c, res // s, res // s) for c, s in zip(B2_CHANNELS, (32, 16, 8, 4))]
    heads = [nn.Conv2d(c, num_classes, 1) for c in B2_CHANNELS]

    def all_heads():
        with torch.no_grad():
            [F.interpolate(h(d), size=(res, res), mode="bilinear", align_corners=False) for h, d in zip(heads, ds)]

    def last_head():
        with torch.no_grad():
            F.interpolate(heads[-1](ds[-1]), size=(res, res), mode="bilinear", align_corners=False)
    return {"all heads": all_heads, "p1 only": last_head}


def prologue_providers(shape):
    """MSCAM's ``ca·sa`` into pconv1's input vs leaving it separate, channels_last, eval, for the part of
    an MSCB that differs: attention maps given. "separate": write ``y = x·ca·sa``, pconv1 as one GEMM with BN
    folded (+ ReLU6), residual ``out += y``. "prologue": ``ca`` folded into per-image pconv1 weights
    ``W·diag(ca)`` (a batched GEMM), ``sa`` applied to the GEMM output (it commutes with the 1×1 conv) with the
    folded bias and ReLU6, residual ``out += x·ca·sa`` without ``y``. Both use single-pass torch ops where a fused
    kernel would (``y`` as one multiply by the precombined map is a lower bound of the mscam op's last pass)."""
    n, c, h, w = shape
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    ca = torch.rand(n, c, 1, 1)
    sa = torch.rand(n, 1, h, w).contiguous(memory_format=torch.channels_last)
    casa = (ca * sa).contiguous(memory_format=torch.channels_last)  # precombined: y in one pass
    wt, bias = torch.randn(2 * c, c) / c ** 0.5, torch.randn(2 * c)
    out = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)  # stands for pconv2's output

    def rows(t):
        return t.permute(0, 2, 3, 1).reshape(n, h * w, t.shape[1])

    def separate():
        y = x * casa
        torch.addmm(bias, rows(y).reshape(n * h * w, c), wt.t()).clamp_(0, 6)
        out.add_(y)

    def prologue():
        wb = wt.unsqueeze(0) * ca.view(n, 1, c)  # per-image W·diag(ca)
        p = torch.bmm(rows(x), wb.transpose(1, 2))
        torch.addcmul(bias, p, rows(sa)).clamp_(0, 6)
        out.addcmul_(x, casa)

    with torch.no_grad():  # same result up to rounding (checked once)
        y = x * casa
        ref = torch.addmm(bias, rows(y).reshape(n * h * w, c), wt.t()).clamp_(0, 6).view(n, h * w, 2 * c)
        wb = wt.unsqueeze(0) * ca.view(n, 1, c)
        alt = torch.addcmul(bias, torch.bmm(rows(x), wb.transpose(1, 2)), rows(sa)).clamp_(0, 6)
        torch.testing.assert_close(alt, ref, rtol=1e-4, atol=1e-4)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                fn()
        return call
    return {"separate": no_grad(separate), "prologue": no_grad(prologue)}


def loss_providers(res, num_classes=9, with_compile=True, batch=None) -> dict[str, Callable[[], None]]:
    """MUTATION loss forward + backward from the four low-res heads (strides 32..4), plain vs fused."""
    from emcad.losses import SegmentationLoss

    n = batch or RESOLUTIONS[res]
    g = torch.Generator().manual_seed(0)
    heads = [(torch.randn(n, num_classes, res // s, res // s, generator=g) * 2).requires_grad_()
             for s in (32, 16, 8, 4)]
    target = torch.randint(0, num_classes, (n, res, res), generator=g)
    plain_loss = SegmentationLoss(num_classes, "mutation", "ce_dice", fused=False)

    def plain_fn(hs, y):
        ups = [F.interpolate(z, size=(res, res), mode="bilinear", align_corners=False) for z in hs]
        return plain_loss(ups, y)

    def run(fn):
        def call():
            for z in heads:
                z.grad = None
            fn(heads, target).backward()
        return call

    providers = {"plain eager": run(plain_fn)}
    if with_compile:
        providers["plain compile"] = run(_compile(plain_fn))
    providers["fused reference"] = run(lambda hs, y: ek.mutation_loss(hs, y, backend="reference"))
    providers["cpu fused"] = run(lambda hs, y: ek.mutation_loss(hs, y, backend="cpu"))
    return providers


def loss_peak_rss_mb(res, provider: str) -> float:
    """Peak resident-set growth (MB) of the first full-size forward + backward of a ``loss_providers`` entry, in a
    fresh process after one tiny call of the same provider (one-off initialisation: thread pools, autograd
    engine), sampled every 2 ms, minus the RSS before the call (inputs already allocated). Eager providers only
    (compilation would dominate a first call)."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import torch; torch.set_num_threads({THREADS}); "
            f"from benchmarks import cpu_table as ct; from emcad.training.bench import _PeakRSS; "
            f"ct.loss_providers(64, with_compile=False, batch=1)[{provider!r}]()\n"  # one-off initialisation
            f"p = ct.loss_providers({res}, with_compile=False)[{provider!r}]\n"
            f"with _PeakRSS() as m: p()\n"
            f"print(m.growth / 2 ** 20)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# end to end: PVTv2's Mix-FFN op, the decoder, whole EMCADNets, bf16
# --------------------------------------------------------------------------------------------------
# PVTv2-B2 Mix-FFN problems at 224 px: (tokens per image, hidden channels) at strides 4, 8, 16, 32
PVT_B2_MIXFFN = ((56, 512), (28, 1024), (14, 1280), (7, 2048))


def mixffn_providers(res, stage, mode, with_compile=True) -> dict[str, Callable[[], None]]:
    """One row of the ``mixffn`` section: the middle of PVTv2's Mix-FFN (depthwise 3x3 + bias + GELU) on
    ``(B, H*W, C)`` tokens. "eager nchw": PVTv2's modules (tokens -> NCHW copy, conv, -> tokens, GELU: what
    ``backend="torch"`` runs); "eager cl": the same ops on a channels_last view of the tokens (no copies);
    "compile": torch.compile of the modules; "cpu": ``token_dwconv_gelu(backend="cpu")``. eval: forward under
    no_grad; train: forward + backward (grads of x, weight, bias)."""
    from emcad.encoders.pvtv2 import TokenDepthwiseConv, map_as_tokens, tokens_as_map
    torch.manual_seed(0)
    side, c = PVT_B2_MIXFFN[stage]
    side = side * res // 224
    n = RESOLUTIONS[res]
    dw = TokenDepthwiseConv(c)

    def plain(t):
        return F.gelu(dw(t, side, side))

    def plain_cl(t):
        return F.gelu(map_as_tokens(dw.dwconv(tokens_as_map(t, side, side))))

    def fused(t):
        return ek.token_dwconv_gelu(t, dw.dwconv.weight, dw.dwconv.bias, (side, side), backend="cpu")

    x = torch.randn(n, side * side, c)
    grad = torch.randn(n, side * side, c)
    training = mode == "train"

    def run(fn):
        if training:
            xr = x.detach().requires_grad_(True)

            def step():
                fn(xr).backward(grad)
            return step

        def fwd():
            with torch.no_grad():
                fn(x)
        return fwd

    providers = {"eager nchw": run(plain), "eager cl": run(plain_cl)}
    if with_compile:
        providers["compile"] = run(_compile(plain))
    providers["cpu"] = run(fused)
    return providers


def peak_rss_growth_mb(fn: Callable[[], None]) -> float:
    """Peak resident-set growth (MB) during one call, after the warm-up calls of ``measure`` (allocator and
    thread pools initialised; freed tensors are returned to the system by the CPU allocator)."""
    from emcad.training.bench import _PeakRSS

    with _PeakRSS() as m:
        fn()
    return m.growth / 2**20


def make_emcadnet(name, backend, channels_last=False, dtype=torch.float32):
    from emcad.models import create_model
    torch.manual_seed(0)
    model = create_model(name, num_classes=9, backend=backend).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_providers(name, res, mode, with_compile=True) -> dict[str, Callable[[], None]]:
    """Whole-network rows (EMCADNet ``name``, 9 classes, ``res`` px, batch RESOLUTIONS[res]). Baselines:
    ``backend="torch"`` in NCHW, channels_last, and torch.compile of the torch model (forward and plain loss as
    one compiled function); fused: ``backend="auto"`` (cpu kernels in the decoder and the PVTv2 encoder), NCHW
    and channels_last. eval: ``model(x, heads="last")`` under no_grad (what evaluation runs). train: one step
    with SGD: baselines run the four upsampled heads and the plain MUTATION loss (``SegmentationLoss(fused=
    False)``), the fused models the low-resolution heads and the fused loss (what ``emcad train`` runs)."""
    from emcad.losses import SegmentationLoss
    n = RESOLUTIONS[res]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, res, res, generator=gen)
    target = torch.randint(0, 9, (n, res, res), generator=gen)
    plain_loss = SegmentationLoss(9, "mutation", "ce_dice", fused=False)
    fused_loss = SegmentationLoss(9, "mutation", "ce_dice", fused="auto")
    providers = {}
    for label, backend, cl in (("torch nchw", "torch", False), ("torch cl", "torch", True),
                               ("compile", "torch", False), ("cpu", "auto", False), ("cpu (cl)", "auto", True)):
        if label == "compile" and not with_compile:
            continue
        model = make_emcadnet(name, backend, cl)
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x
        fused = backend != "torch"
        if mode == "eval":
            model.eval()
            fn = _compile(lambda t, m=model: m(t, heads="last")) if label == "compile" else \
                (lambda t, m=model: m(t, heads="last"))

            def fwd(fn=fn, xin=xin):
                with torch.no_grad():
                    fn(xin)
            providers[label] = fwd
            continue
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        if fused:
            def loss_fn(t, y, m=model):
                return fused_loss(m(t, heads="lowres"), y)
        else:
            def loss_fn(t, y, m=model):
                return plain_loss(m(t), y)
            if label == "compile":
                loss_fn = _compile(loss_fn)

        def step(loss_fn=loss_fn, xin=xin, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(xin, target).backward()
            opt.step()
        providers[label] = step
    return providers


def bf16_providers(name, res) -> dict[str, Callable[[], None]]:
    """Inference (``heads="last"``, no_grad) of the fused model in fp32 and under bf16 autocast, and of the torch
    model under bf16 autocast."""
    n = RESOLUTIONS[res]
    x = torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(0))
    providers = {}
    for label, backend, bf16 in (("torch bf16", "torch", True), ("cpu fp32", "auto", False),
                                 ("cpu bf16", "auto", True)):
        model = make_emcadnet(name, backend).eval()

        def fwd(model=model, bf16=bf16):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x, heads="last")
        providers[label] = fwd
    return providers


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512_bf16" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def demo_dice(checkpoint: Optional[str]) -> tuple[dict[tuple[str, str], float], str]:
    """Mean foreground Dice of the demo model (``emcad train -o runs/demo``: EMCAD-B0, 64x64 synthetic data, 200
    steps) on its held-out synthetic test split (64 images), fp32 and under bf16 autocast, with the fused
    (``auto``) and the plain (``torch``) backend: ``{(backend, "fp32" | "bf16"): dice}``. Without ``checkpoint``
    the demo run is trained first, into a temporary folder."""
    import tempfile

    from emcad.data import SyntheticSegmentation
    from emcad.training.evaluation import evaluate_dataset
    from emcad.training.inference import load_for_inference

    if checkpoint is None:
        from emcad.cli import main as emcad_main
        threads = torch.get_num_threads()
        tmp = tempfile.mkdtemp(prefix="emcad_demo_")
        if emcad_main(["train", "-o", tmp]) != 0:
            raise RuntimeError("training the demo model failed")
        torch.set_num_threads(threads)  # train may lower them on a busy machine
        checkpoint = os.path.join(tmp, "checkpoints", "best")
    dice = {}
    for backend in ("auto", "torch"):
        model, pre = load_for_inference(checkpoint, backend=backend, device="cpu")
        size = tuple(pre.get("size") or (64, 64))
        ds = SyntheticSegmentation(64, size, seed=0, split="test")
        k = int(pre.get("num_classes") or model.num_classes)
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            summary, _, _ = evaluate_dataset(model, ds, k, device="cpu", autocast_dtype=dtype, compute_hd95=False)
            dice[(backend, label)] = float(summary["mean"]["dice"])
    return dice, checkpoint


# aten ops that only make views, allocate or reinterpret: not kernel launches
NON_COMPUTE_OPS = {"aten::" + n for n in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "permute", "expand", "as_strided", "t", "transpose",
    "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "chunk", "unbind", "detach", "alias",
    "empty", "empty_like", "empty_strided", "new_empty", "resize_", "lift_fresh", "to", "_to_copy", "contiguous",
    "clone", "flatten", "narrow", "result_type", "is_nonzero", "item", "_local_scalar_dense", "resolve_conj",
    "resolve_neg", "as_strided_")}


def op_counts(backend, res, channels_last, fold=True, train=False):
    """Per decoder inference forward (``train=False``) or per training step (``train=True``: forward, backward
    of the mean of the four outputs, SGD step, as in :func:`decoder_providers`), from torch.profiler: (ops
    dispatched from Python, compute launches). Compute launches = innermost aten ops that compute (views,
    allocations and casts excluded; a real copy shows up as its ``aten::copy_``) + each innermost
    ``emcad_kernels`` op (its C++ kernel)."""
    from torch.profiler import ProfilerActivity, profile
    from emcad.models import blocks
    dec = make_decoder(backend).train(train)
    if not fold:  # as in folding_providers: the fused path before the eval-mode folding and the mscam op
        for m in (dec.cab4, dec.cab3, dec.cab2, dec.cab1, dec.sab):
            m.set_backend("torch")
    x, skips = decoder_inputs(res, channels_last)
    if channels_last:
        dec = dec.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(dec.parameters(), lr=1e-3, momentum=0.9)

    def run():
        if not train:
            with torch.no_grad():
                dec(x, skips)
            return
        opt.zero_grad(set_to_none=True)
        sum(o.float().mean() for o in dec(x, skips)).backward()
        opt.step()

    old = blocks.FOLD_EVAL_POINTWISE
    blocks.FOLD_EVAL_POINTWISE = fold
    try:
        run()  # warm the folded-weight caches and the optimizer state
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    finally:
        blocks.FOLD_EVAL_POINTWISE = old
    events = [e for e in prof.events() if "::" in e.name]
    top = [e for e in events if e.cpu_parent is None and e.name not in NON_COMPUTE_OPS]

    def computes(e):  # e or one of its descendants is a compute op
        return e.name not in NON_COMPUTE_OPS or any(computes(c) for c in e.cpu_children)

    # innermost compute ops: e.g. mkldnn_convolution (its children only allocate) counts, conv2d above it not
    leaves = [e for e in events if e.name.startswith("aten::") and e.name not in NON_COMPUTE_OPS
              and not any(computes(c) for c in e.cpu_children)]
    kernels = [e for e in events if e.name.startswith("emcad_kernels::")
               and not any(c.name.startswith("emcad_kernels::") for c in e.cpu_children)]
    return len(top), len(leaves) + len(kernels)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def machine_info():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "isa": _ext.cpu_isa(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "commit": commit,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load": load,
    }


def best_baseline(times: dict[str, float]) -> tuple[str, float]:
    base = {k: v for k, v in times.items() if not k.startswith("cpu")}
    name = min(base, key=base.get)
    return name, base[name]


def best_fused(times: dict[str, float]) -> tuple[str, float]:
    fused = {k: v for k, v in times.items() if k.startswith("cpu")}
    name = min(fused, key=fused.get)
    return name, fused[name]


def fmt_row(label, times, target: Optional[float]):
    bname, bt = best_baseline(times)
    fname, ft = best_fused(times)
    ratio = bt / ft
    cells = " | ".join(f"{times[k]:.2f}" for k in times)
    verdict = "" if target is None else (" ✓" if ratio >= target else f" ✗ (target {target}×)")
    return f"| {label} | {cells} | {bname} | {fname} | **{ratio:.2f}×**{verdict} |", ratio


def main(argv=None):
    global THREADS, CLOCK
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and shapes")
    ap.add_argument("--only", choices=SECTIONS,
                    action="append")
    ap.add_argument("--res", type=int, choices=sorted(RESOLUTIONS), action="append")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_table.md"))
    ap.add_argument("--threads", type=int, default=THREADS, help=f"torch.set_num_threads [{THREADS}]")
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds per row [5; 3 with --quick]")
    ap.add_argument("--reps", type=int, help="calls per provider and round [3; 2 with --quick]")
    ap.add_argument("--demo-checkpoint", help="e2e: the demo model (runs/demo/checkpoints/best) for the bf16 Dice "
                    "check; trained into a temporary folder when not given")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: time.perf_counter; cpu: time.process_time (all threads summed) [wall]")
    args = ap.parse_args(argv)
    THREADS = args.threads
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(THREADS)
    _ext.require_cpu_ext()
    rounds, reps = (3, 2) if args.quick else (5, 3)
    rounds, reps = args.rounds or rounds, args.reps or reps
    sections = args.only or list(SECTIONS)
    resolutions = args.res or sorted(RESOLUTIONS)
    started = time.perf_counter()
    info = machine_info()
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, torch.set_num_threads({THREADS}), clock "
             f"{args.clock}; kernel build "
             f"`{info['isa']}` (PyTorch CPU capability {info['torch_cpu_capability']}); torch {info['torch']}, "
             f"Python {info['python']}; commit {info['commit']}; {info['date']}; load average at start "
             f"{info['load'][0]:.1f}.", "",
             f"Command: `python benchmarks/cpu_table.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             ""]
    targets = {("msdc", "eval"): 5.0, ("msdc", "train"): 3.0, ("eucb", "eval"): 3.0, ("lgag", "eval"): 3.0,
               ("eucb", "train"): None, ("lgag", "train"): None}
    summary = {}
    shape_fns = {"msdc": msdc_shapes, "eucb": eucb_shapes, "lgag": lgag_shapes}
    for kind in ("msdc", "eucb", "lgag"):
        if kind not in sections:
            continue
        for mode in ("eval", "train"):
            title = {"eval": "forward, eval mode", "train": "forward + backward, training mode"}[mode]
            lines += [f"### {kind.upper()} {title} (fp32, ms; lower is better)", ""]
            header = None
            for res in resolutions:
                shapes = shape_fns[kind](res)
                if args.quick:
                    shapes = shapes[-2:]
                for shape in shapes:
                    times = measure(op_providers(kind, shape, mode, not args.no_compile), rounds, reps)
                    if header is None:
                        header = list(times)
                        lines += ["| shape (N, C, H, W) | " + " | ".join(header) +
                                  " | best baseline | best fused | speed-up |",
                                  "|" + "---|" * (len(header) + 4)]
                    row, ratio = fmt_row(f"{res}: {tuple(shape)}", times, targets[(kind, mode)])
                    lines.append(row)
                    summary.setdefault((kind, mode), []).append(ratio)
                    print(row, flush=True)
            lines.append("")
    if "mscam" in sections:
        for mode in ("eval", "train"):
            title = {"eval": "forward (no_grad)", "train": "forward + backward (grads of x and the 3 weights)"}[mode]
            lines += [f"### MSCAM attention (CAB then SAB, `x · ca · sa`) {title} (fp32, ms; lower is better)", "",
                      "Baselines: the plain CAB + SAB modules (eager NCHW, channels_last, torch.compile) and the reference "
                      "backend's `mscam` op.", ""]
            header = None
            for res in resolutions:
                for shape in mscam_shapes(res):
                    times = measure(mscam_providers(shape, mode, not args.no_compile), rounds, reps)
                    if header is None:
                        header = list(times)
                        lines += ["| shape (N, C, H, W) | " + " | ".join(header) +
                                  " | best baseline | best fused | speed-up |",
                                  "|" + "---|" * (len(header) + 4)]
                    row, ratio = fmt_row(f"{res}: {tuple(shape)}", times, None)
                    lines.append(row)
                    summary.setdefault(("mscam", mode), []).append(ratio)
                    print(row, flush=True)
            lines.append("")
        lines += ["### Fused decoder with the `mscam` cpu kernel vs `mscam` on the reference backend (fp32, ms)", "",
                  "| input, mode | nchw, mscam reference | nchw, mscam cpu | cl, mscam reference | cl, mscam cpu | "
                  "best before / best after |", "|---|---|---|---|---|---|"]
        for res in resolutions:
            for mode in ("eval", "train"):
                t = measure(mscam_decoder_providers(res, mode), rounds, max(1, reps - 1))
                before = min(t["nchw, mscam reference"], t["cl, mscam reference"])
                after = min(t["nchw, mscam cpu"], t["cl, mscam cpu"])
                what = "inference" if mode == "eval" else "training step"
                lines.append(f"| {res}px, batch {RESOLUTIONS[res]}, {what} | " + " | ".join(f"{v:.2f}" for v in t.values())
                             + f" | **{before / after:.2f}×** |")
                print(lines[-1], flush=True)
        lines.append("")
    if "decoder" in sections:
        for mode in ("eval", "train"):
            title = {"eval": "inference (no_grad, eval mode)",
                     "train": "training step (forward, backward, SGD step)"}[mode]
            lines += [f"### Whole EMCAD-B2 decoder, {title} (fp32, ms)", ""]
            header = None
            for res in resolutions:
                times = measure(decoder_providers(res, mode), rounds, max(1, reps - 1))
                if header is None:
                    header = list(times)
                    lines += ["| input | " + " | ".join(header) + " | best torch | best fused | speed-up |",
                              "|" + "---|" * (len(header) + 4)]
                target = 2.5 if mode == "eval" else 2.0
                row, ratio = fmt_row(f"{res}px, batch {RESOLUTIONS[res]}", times, target)
                lines.append(row)
                summary.setdefault(("decoder", mode), []).append(ratio)
                print(row, flush=True)
            lines.append("")
    if "memory" in sections:
        lines += ["### Saved activations of one decoder training forward (MB, distinct storages)", "",
                  "| input | torch | cpu | cpu / torch |", "|---|---|---|---|"]
        for res in resolutions:
            t = saved_activation_bytes("torch", res) / 2**20
            c = saved_activation_bytes("auto", res) / 2**20
            verdict = "✓" if c / t <= 0.4 else "✗ (target ≤ 40%)"
            lines.append(f"| {res}px, batch {RESOLUTIONS[res]} | {t:.1f} | {c:.1f} | **{100 * c / t:.0f}%** {verdict} |")
            summary.setdefault(("memory", ""), []).append(c / t)
            print(lines[-1], flush=True)
        lines.append("")
    if "bandwidth" in sections:
        bw = copy_bandwidth_gbs(rounds=rounds, reps=reps)
        lines += ["### Eval-mode MSDC kernel vs copy bandwidth", "",
                  f"Copy bandwidth (torch `copy_`, 256 MB moved per call, {THREADS} threads): **{bw:.1f} GB/s**.", "",
                  "| shape | layout | ms | GB/s (x read + y written) | fraction of copy |", "|---|---|---|---|---|"]
        for res in resolutions:
            for shape in msdc_shapes(res)[-2:]:
                mod = PlainMSDC(shape[1]).eval()
                for layout in ("nchw", "cl"):
                    x = torch.randn(shape)
                    if layout == "cl":
                        x = x.contiguous(memory_format=torch.channels_last)

                    def fwd(x=x, mod=mod):
                        with torch.no_grad():
                            mod.fused(x)
                    t = measure({"cpu": fwd}, rounds, reps)["cpu"]
                    gbs = 2 * x.numel() * 4 / (t * 1e-3) / 1e9
                    verdict = "✓" if gbs / bw >= 0.5 else "✗ (target ≥ 50%)"
                    lines.append(f"| {res}: {tuple(shape)} | {layout} | {t:.2f} | {gbs:.1f} | "
                                 f"**{100 * gbs / bw:.0f}%** {verdict} |")
                    summary.setdefault(("bandwidth", ""), []).append(gbs / bw)
                    print(lines[-1], flush=True)
        lines.append("")
    if "bnact" in sections:
        # MSCB pconv1's training-mode BN + ReLU6: nn modules vs batch_norm_act (keeps only its input; recomputes)
        from emcad_kernels.batchnorm_act import batch_norm_act
        lines += ["### Training-mode BN + ReLU6 of MSCB's pconv1: modules vs `batch_norm_act` (fp32, ms, fwd+bwd)", "",
                  "| shape | layout | modules | batch_norm_act | modules / batch_norm_act |", "|---|---|---|---|---|"]
        for res in resolutions:
            shape = msdc_shapes(res)[-1]
            for layout in ("nchw", "cl"):
                bn = nn.BatchNorm2d(shape[1])
                x = torch.randn(shape)
                if layout == "cl":
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                g = torch.randn_like(x)

                def modules(x=x, bn=bn, g=g):
                    F.relu6(bn(x)).backward(g)

                def fused(x=x, bn=bn, g=g):
                    batch_norm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, bn.eps,
                                   "relu6").backward(g)
                t = measure({"modules": modules, "fused": fused}, rounds, reps)
                lines.append(f"| {res}: {tuple(shape)} | {layout} | {t['modules']:.2f} | {t['fused']:.2f} | "
                             f"{t['modules'] / t['fused']:.2f}× |")
                print(lines[-1], flush=True)
        lines.append("")
    if "isa" in sections:
        # the same kernels compiled per instruction set (csrc/cpu/isa_target.h): if the inner loops vectorise as
        # meant, AVX2 (8 lanes) and AVX-512 (16 lanes) beat the SSE2 baseline build by a wide margin
        isas = [i for i in ("default", "avx2", "avx512") if _isa_available(_ext, i)]
        ratios = " | ".join(f"{i} / default" for i in isas[1:])
        lines += ["### Vectorisation check: the same MSDC kernels per instruction-set build (fp32, ms)", "",
                  "| shape, layout, mode | " + " | ".join(isas) + " | " + ratios + " |",
                  "|" + "---|" * (2 * len(isas))]
        before = _ext.cpu_isa()
        try:
            for res in resolutions:
                shape = msdc_shapes(res)[-2]
                for mode in ("eval", "train"):
                    mod = PlainMSDC(shape[1]).train(mode == "train")
                    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
                    x.requires_grad_(mode == "train")

                    def call(isa, mod=mod, x=x, mode=mode):
                        _ext.set_cpu_isa(isa)
                        if mode == "eval":
                            with torch.no_grad():
                                mod.fused(x)
                        else:
                            mod.fused(x).sum().backward()
                    t = measure({i: (lambda i=i: call(i)) for i in isas}, rounds, reps)
                    what = "forward (eval)" if mode == "eval" else "fwd+bwd (train)"
                    lines.append(f"| {res}: {tuple(shape)}, cl, {what} | "
                                 + " | ".join(f"{t[i]:.2f}" for i in isas) + " | "
                                 + " | ".join(f"{t['default'] / t[i]:.2f}×" for i in isas[1:]) + " |")
                    print(lines[-1], flush=True)
        finally:
            _ext.set_cpu_isa(before)
        lines.append("")
    if "fusion" in sections:
        lines += ["### Decoder inference with eval-mode pointwise folding (fp32, ms, no_grad, eval)", "",
                  "`unfolded` = the fused path before the eval-mode folding and the mscam op (`blocks.FOLD_EVAL_POINTWISE = False`, plain CAB/SAB), "
                  "`folded` = after it; same run, interleaved rounds.", ""]
        header = None
        for res in resolutions:
            times = measure(folding_providers(res), rounds, max(1, reps - 1))
            if header is None:
                header = list(times)
                lines += ["| input | " + " | ".join(header) + " | best torch | unfolded speed-up | folded speed-up |",
                          "|" + "---|" * (len(header) + 4)]
            base = min(times["torch nchw"], times["torch cl"])
            bname = "torch nchw" if times["torch nchw"] <= times["torch cl"] else "torch cl"
            unf = min(times["cpu nchw unfolded"], times["cpu cl unfolded"])
            fol = min(times["cpu nchw folded"], times["cpu cl folded"])
            verdict = " ✓" if base / fol >= 3.0 else " ✗ (target 3×)"
            lines.append(f"| {res}px, batch {RESOLUTIONS[res]} | " + " | ".join(f"{times[k]:.2f}" for k in header) +
                         f" | {bname} | {base / unf:.2f}× | **{base / fol:.2f}×**{verdict} |")
            summary.setdefault(("fusion", "eval"), []).append(base / fol)
            print(lines[-1], flush=True)
        lines += ["", "Heads of EMCADNet (9 classes) on the B2 decoder outputs: all four heads + upsamplings vs "
                  "`heads=\"last\"` (p1 only), ms:", "", "| input | all heads | p1 only |", "|---|---|---|"]
        for res in resolutions:
            t = measure(heads_providers(res), rounds, reps)
            lines.append(f"| {res}px, batch {RESOLUTIONS[res]} | {t['all heads']:.2f} | {t['p1 only']:.2f} |")
            print(lines[-1], flush=True)
        lines += ["", "MSCAM's `ca·sa` folded into pconv1's input vs left separate (`prologue_providers`; channels_last, "
                  "eval, ms; the MSCB input shapes of the stages):", "",
                  "| shape (N, C, H, W) | separate | prologue | separate / prologue |", "|---|---|---|---|"]
        for res in resolutions:
            for shape in [(RESOLUTIONS[res], c, res // s, res // s) for c, s in zip(B2_CHANNELS, (32, 16, 8, 4))]:
                t = measure(prologue_providers(shape), rounds, reps)
                lines.append(f"| {res}: {shape} | {t['separate']:.2f} | {t['prologue']:.2f} | "
                             f"{t['separate'] / t['prologue']:.2f}× |")
                print(lines[-1], flush=True)
        res = resolutions[0]
        lines += ["", f"Per decoder inference forward and per decoder training step ({res}px, torch.profiler, see "
                  "`op_counts`): ops dispatched from Python, and compute launches (leaf aten compute ops + C++ "
                  "kernels of the fused ops); the training step is forward, backward and an SGD step:", "",
                  "| decoder | forward: ops from Python | forward: compute launches | training step: ops from Python "
                  "| training step: compute launches |", "|---|---|---|---|---|"]
        for label, backend, cl, fold in (("torch nchw", "torch", False, True), ("torch cl", "torch", True, True),
                                         ("cpu cl unfolded", "cpu", True, False),
                                         ("cpu cl folded", "auto", True, True),
                                         ("cpu nchw folded", "auto", False, True)):
            fwd, step = op_counts(backend, res, cl, fold), op_counts(backend, res, cl, fold, train=True)
            lines.append(f"| {label} | {fwd[0]} | {fwd[1]} | {step[0]} | {step[1]} |")
            print(lines[-1], flush=True)
        lines.append("")
    if "loss" in sections:
        lines += ["### MUTATION loss forward + backward from the four low-res heads (9 classes, fp32)", "",
                  "Times in ms (best of interleaved rounds); memory: peak resident-set growth (MB) of one forward + "
                  "backward (first full-size call in a fresh process, after a tiny warm-up call; eager providers only).", ""]
        for res in resolutions:
            providers = loss_providers(res, with_compile=not args.no_compile)
            t = measure(providers, rounds, reps)
            mem = {k: loss_peak_rss_mb(res, k) for k in providers if "compile" not in k}
            if res == resolutions[0]:
                lines += ["| input | " + " | ".join(f"{k} ms" for k in t) + " | " +
                          " | ".join(f"{k} MB" for k in mem) + " | best torch | speed-up |",
                          "|---|" + "---|" * (len(t) + len(mem) + 2)]
            bname = min((k for k in t if k.startswith("plain")), key=t.get)
            bt = t[bname]
            lines.append(f"| {res}px, batch {RESOLUTIONS[res]} | " + " | ".join(f"{v:.1f}" for v in t.values()) +
                         " | " + " | ".join(f"{v:.0f}" for v in mem.values()) +
                         f" | {bname} | **{bt / t['cpu fused']:.2f}×** |")
            print(lines[-1], flush=True)
        lines.append("")
    if "mixffn" in sections:
        for mode in ("eval", "train"):
            title = {"eval": "forward (no_grad)", "train": "forward + backward (grads of x, weight, bias)"}[mode]
            lines += [f"### PVTv2 Mix-FFN middle (depthwise 3x3 + bias + GELU on tokens) {title} (fp32, ms; "
                      "lower is better)", "", "Tokens (N, H·W, C) of the four PVTv2-B2 stages; RSS: peak resident-set "
                      "growth of one call (MB).", ""]
            header = None
            for res in resolutions:
                for stage in range(4):
                    providers = mixffn_providers(res, stage, mode, not args.no_compile)
                    times = measure(providers, rounds, reps)
                    rss = {k: peak_rss_growth_mb(fn) for k, fn in providers.items()}
                    if header is None:
                        header = list(times)
                        lines += ["| tokens (N, H·W, C) | " + " | ".join(header) +
                                  " | best baseline | best fused | speed-up | RSS MB (" + ", ".join(header) + ") |",
                                  "|" + "---|" * (len(header) + 5)]
                    side, c = PVT_B2_MIXFFN[stage]
                    side = side * res // 224
                    row, ratio = fmt_row(f"{res}: ({RESOLUTIONS[res]}, {side * side}, {c})", times,
                                         4.0 if mode == "eval" else None)
                    lines.append(row + " " + ", ".join(f"{v:.0f}" for v in rss.values()) + " |")
                    summary.setdefault(("mixffn", mode), []).append(ratio)
                    print(lines[-1], flush=True)
            lines.append("")
    if "e2e" in sections:
        res = resolutions[0]
        n = RESOLUTIONS[res]
        lines += [f"### End to end ({res} px, batch {n}, fp32, ms; RSS: peak resident-set growth of one call, MB)", "",
                  "Baselines: `backend=\"torch\"` (the plain modules) in NCHW and channels_last, and torch.compile "
                  "(inductor) of it. Fused: `backend=\"auto\"` (cpu kernels in the decoder and, for PVTv2, the encoder's "
                  "Mix-FFN `token_dwconv_gelu` and SDPA attention). Inference: `heads=\"last\"`, no_grad, eval. Training "
                  "step: forward, MUTATION loss, backward, SGD; the baselines with the plain loss on the upsampled heads, "
                  "the fused models with `heads=\"lowres\"` and the fused loss (as `emcad train`).", ""]
        header = ["torch nchw", "torch cl", "compile", "cpu", "cpu (cl)"]
        if args.no_compile:
            header.remove("compile")
        lines += ["| network, mode | " + " | ".join(header) + " | best baseline | best fused | speed-up | RSS MB ("
                  + ", ".join(header) + ") |", "|" + "---|" * (len(header) + 5)]
        rows_e2e = [("decoder", "eval", 2.0), ("decoder", "train", None), ("emcad_b2", "eval", 2.0),
                    ("emcad_b2", "train", 1.7), ("emcad_b0", "eval", None), ("emcad_b0", "train", None)]
        for net, mode, target in rows_e2e:
            if net == "decoder":
                providers = decoder_providers(res, mode)
                providers = {"torch nchw": providers["torch nchw"], "torch cl": providers["torch cl"],
                             **({} if args.no_compile else {"compile": decoder_compile_provider(res, mode)}),
                             "cpu": providers["cpu (nchw)"], "cpu (cl)": providers["cpu (cl)"]}
                label = "EMCAD-B2 decoder"
            else:
                providers = model_providers(net, res, mode, not args.no_compile)
                label = {"emcad_b2": "EMCADNet-B2", "emcad_b0": "EMCADNet-B0"}[net]
            times = measure(providers, max(2, rounds - 2), 1)
            rss = {k: peak_rss_growth_mb(fn) for k, fn in providers.items()}
            what = "inference" if mode == "eval" else "training step"
            row, ratio = fmt_row(f"{label}, {what}", times, target)
            lines.append(row + " " + ", ".join(f"{v:.0f}" for v in rss.values()) + " |")
            summary.setdefault(("e2e", net, mode), []).append(ratio)
            print(lines[-1], flush=True)
            del providers
        lines.append("")
        if cpu_has_avx512_bf16():
            lines += [f"bf16 inference under `torch.autocast(\"cpu\", torch.bfloat16)` (this CPU has avx512_bf16"
                      + (" and AMX" if "amx_bf16" in open("/proc/cpuinfo").read() else "") + "), ms:", "",
                      "| network | torch bf16 | cpu fp32 | cpu bf16 | cpu fp32 / cpu bf16 |", "|---|---|---|---|---|"]
            for net in ("emcad_b2", "emcad_b0"):
                t = measure(bf16_providers(net, res), max(2, rounds - 2), 1)
                ratio = t["cpu fp32"] / t["cpu bf16"]
                verdict = " ✓" if ratio >= 1.5 else " ✗ (target 1.5×)"
                lines.append(f"| {net} | {t['torch bf16']:.1f} | {t['cpu fp32']:.1f} | {t['cpu bf16']:.1f} | "
                             f"**{ratio:.2f}×**{verdict} |")
                print(lines[-1], flush=True)
            dice, ckpt = demo_dice(args.demo_checkpoint)
            d32, d16 = dice[("auto", "fp32")], dice[("auto", "bf16")]
            t32, t16 = dice[("torch", "fp32")], dice[("torch", "bf16")]
            verdict = "✓" if abs(d32 - d16) <= 0.005 else "✗ (must agree within 0.005)"
            lines += ["", f"Demo model (`{ckpt}`), mean foreground Dice on its synthetic test split (64 images): "
                      f"fused (`auto`) fp32 {d32:.4f}, bf16 autocast {d16:.4f}, difference {abs(d32 - d16):.4f} "
                      f"{verdict}; plain (`torch`) fp32 {t32:.4f}, bf16 autocast {t16:.4f}, difference "
                      f"{abs(t32 - t16):.4f}.",
                      ""]
            print(lines[-2], flush=True)
        else:
            lines += ["bf16 inference: not measured, this CPU has no avx512_bf16 (bf16 would be emulated).", ""]
    lines += [f"Load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min); "
              f"wall time of the run {time.perf_counter() - started:.0f} s.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
