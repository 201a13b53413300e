"""CPU benchmark of EGE-UNet / MALUNet and their multi-dilation ops: the ``cpu`` backend (fused C++ kernels)
against ``backend="torch"`` (the plain nn composition), measured side by side in one run; prints a markdown
report (machine, torch version, command, date, load average, tables).

    PYTHONPATH=. python benchmarks/bench_egeunet_malunet.py                 # full report to stdout
    PYTHONPATH=. python benchmarks/bench_egeunet_malunet.py --rounds 3 --quick

Models: default configurations, 3×256×256 input, fp32, batch 1 and 8; "eval" is a forward under no_grad in eval
mode, "train" one AdamW step (forward, the originals' BCE+Dice loss with EGE-UNet's deep-supervision weights,
backward, step). torch runs in NCHW and channels_last (best of the two is the baseline); the fused model
(``backend="auto"``: the cpu kernels, except MALUNet's GAU convs which stay plain on CPU because the fused call
loses there, see the op table) in NCHW and channels_last too (best reported, layout named).
Ops: each multi-dilation op alone at the model shapes, forward (no_grad) and forward + backward, against the
plain composition the ``"torch"`` models run (channels-first LayerNorm from elementwise ops + grouped dilated
depthwise convs; grouped convs + GroupNorm, or one depthwise conv + GroupNorm for GAU where all groups share
the kernel size and dilation), best of NCHW / channels_last.

Timing: providers of a row are measured in interleaved rounds (a load change on the shared machine hits all of
them alike) and the **minimum** over rounds and repetitions is reported. Default: one intra-op thread and the CPU
time of the calling thread (``time.thread_time``), which is robust against other jobs on a shared machine (with
2 threads on 2 busy cores a parallel region waits for a descheduled thread and wall times scatter by 10×).
``--threads 2 --clock wall`` measures wall-clock time with both cores instead (use on an idle machine).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from emcad.models import create_model  # noqa: E402
from emcad_kernels import dilated_dwconv_groupnorm, layernorm_dilated_dwconv  # noqa: E402


def bce_dice(p, t):
    bce = F.binary_cross_entropy(p, t)
    inter = (p * t).flatten(1).sum(1)
    return bce + 1 - ((2 * inter + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)).mean()


def loss_fn(out, t):
    if isinstance(out, tuple):  # EGE-UNet: GT_BceDiceLoss weights
        heads, final = out
        return bce_dice(final, t) + sum(w * bce_dice(h, t) for w, h in zip((0.1, 0.2, 0.3, 0.4, 0.5), heads))
    return bce_dice(out, t)


CLOCK = time.thread_time


def measure(fns: dict, rounds: int, reps: int) -> dict:
    """Min time (ms) per provider over interleaved rounds of `reps` calls each (after 2 warm-up calls)."""
    for fn in fns.values():
        fn()
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(reps):
                s = CLOCK()
                fn()
                best[k] = min(best[k], (CLOCK() - s) * 1e3)
    return best


def model_fns(name, batch, mode):
    fns = {}
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 256, 256, generator=gen) * 255
    t = (torch.rand(batch, 1, 256, 256, generator=gen) > 0.7).float()
    # the fused model runs the default backend ("auto": the cpu kernels where they win; MALUNet's GAU calls stay
    # plain PyTorch on CPU), reported in the "cpu" column
    for key, backend in (("torch", "torch"), ("cpu", "auto")):
        for layout in ("nchw", "cl"):
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            torch.manual_seed(0)
            m = create_model(name, backend=backend).to(memory_format=fmt)
            xi = x.contiguous(memory_format=fmt)
            if mode == "eval":
                m.eval()

                def fn(m=m, xi=xi):
                    with torch.no_grad():
                        m(xi)
            else:
                opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2)

                def fn(m=m, opt=opt, xi=xi):
                    loss = loss_fn(m(xi), t)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            fns[(key, layout)] = fn
    return fns


# --------------------------------------------------------------------------------------------------
# ops alone
# --------------------------------------------------------------------------------------------------
def plain_lndw(x, lws, lbs, ws, bs, dilations, eps):
    outs = []
    for xi, lw, lb, w, b, d in zip(x.split([w.shape[0] for w in ws], 1), lws, lbs, ws, bs, dilations):
        u = xi.mean(1, keepdim=True)
        s = (xi - u).pow(2).mean(1, keepdim=True)
        z = (xi - u) / torch.sqrt(s + eps) * lw[:, None, None] + lb[:, None, None]
        outs.append(F.conv2d(z, w, b, 1, d * (w.shape[-1] // 2), d, w.shape[0]))
    return torch.cat(outs, 1)


def plain_dwgn(x, ws, bs, gw, gb, dilations, eps):
    if len(set(dilations)) == 1 and len({w.shape[-1] for w in ws}) == 1:
        # GAU's DepthWiseConv2d: the "torch" model runs one depthwise conv over all channels, not four
        w, d = torch.cat(ws), dilations[0]
        y = F.conv2d(x, w, torch.cat(bs), 1, d * (w.shape[-1] // 2), d, w.shape[0])
    else:
        y = torch.cat([F.conv2d(xi, w, b, 1, d * (w.shape[-1] // 2), d, w.shape[0])
                       for xi, w, b, d in zip(x.chunk(len(ws), 1), ws, bs, dilations)], 1)
    return F.group_norm(y, len(ws), gw, gb, eps)


# (label, op, channels per group, kernel size, dilations, resolution)
OPS = [
    ("EGE GAB1 (4×5 ch, d 1/2/5/7, 128²)", "lndw", 5, 3, (1, 2, 5, 7), 128),
    ("EGE GAB3 (4×13 ch, d 1/2/5/7, 32²)", "lndw", 13, 3, (1, 2, 5, 7), 32),
    ("EGE GHPA enc4 norm2+ldw.0 (24 ch, 32²)", "lndw", 24, 3, (1,), 32),
    ("MALU DGA enc4 (4×6 ch, d 7/5/2/1, 32²)", "dwgn", 6, 3, (7, 5, 2, 1), 32),
    ("MALU GAU w2 enc4 (24 ch 5×5 + GN4, 32²)", "dwgn", 6, 5, (1, 1, 1, 1), 32),
    ("MALU GAU w1 enc6 (48 ch 3×3 + GN4, 8²)", "dwgn", 12, 3, (1, 1, 1, 1), 8),
]


def op_fns(op, gc, k, dil, res, batch, mode):
    gen = torch.Generator().manual_seed(0)
    groups = len(dil)
    c = gc * groups
    x0 = torch.randn(batch, c, res, res, generator=gen)
    ws = [torch.randn(gc, 1, k, k, generator=gen) * 0.3 for _ in dil]
    bs = [torch.randn(gc, generator=gen) * 0.1 for _ in dil]
    if op == "lndw":
        params = [[torch.rand(gc, generator=gen) + 0.5 for _ in dil], [torch.randn(gc, generator=gen) * 0.1
                                                                       for _ in dil], ws, bs]

        def fused(x, p):
            return layernorm_dilated_dwconv(x, *p, dilations=dil, eps=1e-6, backend="cpu")

        def plain(x, p):
            return plain_lndw(x, *p, dil, 1e-6)
    else:
        params = [ws, bs, torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.1]

        def fused(x, p):
            return dilated_dwconv_groupnorm(x, *p, dilations=dil, eps=1e-5, backend="cpu")

        def plain(x, p):
            return plain_dwgn(x, *p, dil, 1e-5)

    def leaves(p):
        return [[t.clone().requires_grad_(mode == "train") for t in q] if isinstance(q, list)
                else q.clone().requires_grad_(mode == "train") for q in p]

    fns = {}
    for name, f in (("torch", plain), ("cpu", fused)):
        for layout in ("nchw", "cl"):
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            x = x0.contiguous(memory_format=fmt).requires_grad_(mode == "train")
            p = leaves(params)
            g = torch.randn(x0.shape, generator=gen).contiguous(memory_format=fmt)
            if mode == "eval":
                def fn(f=f, x=x, p=p):
                    with torch.no_grad():
                        f(x, p)
            else:
                def fn(f=f, x=x, p=p, g=g):
                    f(x, p).backward(g)
            fns[(name, layout)] = fn
    return fns


def best_of(times, provider):
    cands = {lay: v for (p, lay), v in times.items() if p == provider}
    lay = min(cands, key=cands.get)
    return cands[lay], lay


def row(label, times):
    t_torch, l_torch = best_of(times, "torch")
    t_cpu, l_cpu = best_of(times, "cpu")
    nchw, cl = times[("torch", "nchw")], times[("torch", "cl")]
    return (f"| {label} | {nchw:.2f} | {cl:.2f} | {t_cpu:.2f} ({'CL' if l_cpu == 'cl' else 'NCHW'}) | "
            f"{t_torch / t_cpu:.2f}× |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="batch 1 models only, fewer repetitions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread",
                    help="thread: CPU time of the calling thread (needs --threads 1); wall: time.perf_counter")
    args = ap.parse_args()
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread measures only the calling thread: use it with --threads 1")
    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    start = datetime.datetime.now(datetime.timezone.utc)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    cpu_name = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from emcad_kernels import _ext
    lines = []
    out = lines.append
    model_cfgs = [(1, "eval"), (1, "train")] if args.quick else [(1, "eval"), (1, "train"), (8, "eval"),
                                                                   (8, "train")]
    out("### Whole models (ms, min over rounds)\n")
    out("| model | mode | input | torch NCHW | torch CL | fused, auto (layout) | best torch / fused |")
    out("|---|---|---|---|---|---|---|")
    for name in ("egeunet", "malunet"):
        for batch, mode in model_cfgs:
            reps = 1 if batch == 8 else 3
            times = measure(model_fns(name, batch, mode), args.rounds, reps)
            out(row(f"{name} | {mode} | {batch}x3x256x256", times))
            print(lines[-1], file=sys.stderr, flush=True)
    out("\n### Each op alone vs its torch composition (ms, min over rounds)\n")
    out("| op (model shape) | mode | batch | torch NCHW | torch CL | cpu backend (layout) | best torch / cpu |")
    out("|---|---|---|---|---|---|---|")
    for label, op, gc, k, dil, res in OPS:
        for batch in ((1,) if args.quick else (1, 8)):
            for mode in ("eval", "train"):
                times = measure(op_fns(op, gc, k, dil, res, batch, mode), args.rounds, 5 if batch == 1 else 2)
                out(row(f"{label} | {'fwd' if mode == 'eval' else 'fwd+bwd'} | {batch}", times))
                print(lines[-1], file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    end = datetime.datetime.now(datetime.timezone.utc)
    header = [
        f"Measured {start:%Y-%m-%d %H:%M}–{end:%H:%M} UTC on {cpu_name}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} intra-op thread(s), clock "
        f"{'CPU time of the calling thread' if args.clock == 'thread' else 'wall'}, cpu kernel ISA `{_ext.cpu_isa()}`, commit `{commit}`"
        f" (+ working tree). Load average (1/5/15 min) {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the start, "
        f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at the end (the machine is shared).",
        f"Command: `PYTHONPATH=. python benchmarks/bench_egeunet_malunet.py {' '.join(sys.argv[1:])}`.".replace(
            " `.", "`."),
        "",
    ]
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
