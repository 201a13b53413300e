"""The cpu backend's ops and EMCADNet-B0 timed in several checkouts of this repository, in interleaved rounds, one
table: for showing that a refactoring left the speed as it was.

    python benchmarks/before_after.py --tree before=/path/to/old/checkout:/path/to/old/venv/bin/python \
        --tree after=.:python --rounds 7 --out benchmarks/results/cpu_before_after.md

Each round runs this file with ``--child`` once in every tree (its own Python and build, the checkout first on
sys.path); a row's time is the minimum over rounds of the minimum over repetitions. The calls use only the public
API, so any version with these ops can be compared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def child(threads: int, reps: int) -> dict:
    import torch

    import emcad_kernels as ek
    from emcad.models.registry import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cl = torch.channels_last

    def bn(c):
        return ek.BatchNormParams(torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True),
                                  torch.zeros(c), torch.ones(c))

    def req(*shape, layout=cl):
        return torch.randn(shape).contiguous(memory_format=layout).requires_grad_()

    x, g = req(6, 64, 56, 56), req(6, 64, 56, 56)
    ws = [torch.randn(64, 1, k, k, requires_grad=True) for k in (1, 3, 5)]
    b3 = [bn(64) for _ in ws]
    xs, wu = req(6, 128, 28, 28), torch.randn(128, 1, 3, 3, requires_grad=True)
    wg, wx = torch.randn(32, 2, 3, 3, requires_grad=True), torch.randn(32, 2, 3, 3, requires_grad=True)
    bg, bx = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    wpsi, bpsi = torch.randn(1, 32, 1, 1, requires_grad=True), torch.randn(1, requires_grad=True)
    fc1, fc2 = torch.randn(4, 64, 1, 1, requires_grad=True), torch.randn(64, 4, 1, 1, requires_grad=True)
    sab = torch.randn(1, 2, 7, 7, requires_grad=True)
    heads = [torch.randn(6, 9, s, s, requires_grad=True) for s in (7, 14, 28, 56)]
    target = torch.randint(0, 9, (6, 224, 224))
    xm = req(6, 32, 64, 64, layout=torch.contiguous_format)
    wm = [torch.randn(8, 1, 3, 3, requires_grad=True) for _ in range(4)]
    bm = [torch.randn(8, requires_grad=True) for _ in range(4)]
    tiny = torch.randn(1, 8, 4, 4)
    tiny_w = [torch.randn(8, 1, k, k) for k in (1, 3, 5)]
    tiny_bn = [ek.BatchNormParams(torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8)) for _ in tiny_w]

    def msdc(tr):
        return ek.multi_scale_dwconv(x, ws, b3, training=tr, shuffle_groups=32, backend="cpu")

    def updw(tr):
        return ek.upsample_dwconv(xs, wu, bn(128), training=tr, backend="cpu")

    def lgag(tr):
        return ek.grouped_attention_gate(g, x, wg, bg, bn(32), wx, bx, bn(32), wpsi, bpsi, bn(1), groups=32,
                                         training=tr, backend="cpu")

    net = create_model("emcad_b0", num_classes=9, backend="cpu").eval()
    img = torch.randn(6, 3, 224, 224)
    # (name, call, mode): "eval" = forward under no_grad, "train" = forward + backward of the sum
    rows = [
        ("msdc forward, eval (6x64x56x56, k 1/3/5)", lambda: msdc(False), "eval"),
        ("msdc forward + backward, train", lambda: msdc(True), "train"),
        ("updw forward, eval (6x128x28x28 -> 56x56)", lambda: updw(False), "eval"),
        ("updw forward + backward, train", lambda: updw(True), "train"),
        ("lgag forward, eval (6x64x56x56, 32 groups)", lambda: lgag(False), "eval"),
        ("lgag forward + backward, train", lambda: lgag(True), "train"),
        ("mscam forward + backward", lambda: ek.mscam(x, fc1, fc2, sab, backend="cpu"), "train"),
        ("mutation_stats forward + backward (4 heads, 224 px)",
         lambda: ek.mutation_stats(heads, target, backend="cpu")[0], "train"),
        ("layernorm_dilated_dwconv forward + backward",
         lambda: ek.layernorm_dilated_dwconv(xm, None, None, wm, bm, dilations=[1, 2, 5, 7], backend="cpu"), "train"),
        ("dilated_dwconv_groupnorm forward + backward",
         lambda: ek.dilated_dwconv_groupnorm(xm, wm, bm, None, None, dilations=[1, 2, 5, 7], backend="cpu"), "train"),
        ("per-call overhead: msdc on 1x8x4x4, x100",
         lambda: [ek.multi_scale_dwconv(tiny, tiny_w, tiny_bn, shuffle_groups=8, backend="cpu") for _ in range(100)],
         "eval"),
        ("EMCADNet-B0 inference, backend cpu (6x3x224x224)", lambda: net(img), "eval"),
    ]
    out = {}
    for name, fn, mode in rows:
        def once():
            if mode == "train":
                fn().sum().backward()
            else:
                with torch.no_grad():
                    fn()
        for _ in range(2):
            once()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            once()
            best = min(best, time.perf_counter() - t0)
        out[name] = best * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR:PYTHON",
                    help="a checkout and the Python (venv) in which its extension is built; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="Markdown file for the table (printed in any case)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.threads, args.reps)))
        return 0
    if len(args.tree) < 2:
        ap.error("--tree: give at least two, LABEL=DIR:PYTHON")
    trees = []
    for spec in args.tree:
        label, _, rest = spec.partition("=")
        directory, _, python = rest.rpartition(":")
        trees.append((label, os.path.abspath(directory), python))
    loads = [os.getloadavg()[0]]
    runs = {label: [] for label, _, _ in trees}
    for _ in range(args.rounds):
        for label, directory, python in trees:
            res = subprocess.run([python, HERE, "--child", "--threads", str(args.threads), "--reps", str(args.reps)],
                                 cwd=directory, capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": directory})
            runs[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
        loads.append(os.getloadavg()[0])
    base = trees[0][0]
    labels = [label for label, _, _ in trees]
    lines = [f"| row (ms, min of {args.rounds} rounds x {args.reps} reps) | " + " | ".join(labels) + " | "
             + " | ".join(f"{label} / {base}" for label in labels[1:]) + " |",
             "|---" * (1 + 2 * len(labels) - 1) + "|"]
    for row in runs[base][0]:
        best = {label: min(r[row] for r in runs[label]) for label in labels}
        lines.append(f"| {row} | " + " | ".join(f"{best[label]:.2f}" for label in labels) + " | "
                     + " | ".join(f"{best[label] / best[base]:.3f}" for label in labels[1:]) + " |")
    import platform

    import torch
    head = ["Trees: " + "; ".join(f"`{label}` = {directory}" for label, directory, _ in trees),
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; load average (1 min) "
            + " -> ".join(f"{v:.2f}" for v in loads), ""]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
