#!/usr/bin/env python3
"""GPU benchmark of the cuda backend, side by side with triton, eager and torch.compile in one run.

Shapes and targets are those of bench_gpu.py: the EMCAD-B2 decoder at 224 px / batch 6 and
352 px / batch 16, four stages, bf16 and fp32. For each fused op (``msdc``: MSDC + MSCB shuffle on the 2C-channel
expansion; ``updw``: EUCB front, nearest x2 + depthwise 3x3 + BN + ReLU; ``lgag``: LGAG with EMCAD's aggregation)
and each mode (``fwd_eval``, ``fwd_train``, ``fwd_bwd``) it times:

* ``eager_nchw`` / ``eager_cl``: the plain module composition (``nn.Conv2d``, ``nn.BatchNorm2d``, ...), NCHW /
  channels_last inputs;
* ``compiled``: ``torch.compile(mode=--compile-mode)`` of that composition (channels_last inputs);
* ``cuda`` / ``cuda_nchw``: the fused ops with ``backend="cuda"``, channels_last / NCHW inputs;
* ``triton``: the fused ops with ``backend="triton"`` (channels_last), when triton and a GPU are available.

The device copy bandwidth is measured in the same run; forward rows carry the achieved bandwidth of the ideal
traffic (MSDC: read x + write y; EUCB front: read x + write 4x; LGAG: read g, x + write out) and its fraction of
the copy bandwidth. Speedups against eager NCHW, eager channels_last and compiled are computed per row, and the
faster fused backend per (op, shape, dtype, mode) is listed: that table is what ``auto``'s per-shape choice is
derived from (``--markdown`` prints it).

Results: ``<out>/bench_cuda_<gpu>_<utc-time>.json`` (environment + rows + choice table) and ``.csv`` with the same
rows; every row carries GPU name, driver, CUDA, torch and triton versions, git commit and date.

Examples::

    python benchmarks/bench_cuda.py --out benchmarks/results
    python benchmarks/bench_cuda.py --out /tmp/b --sizes 352:16 --dtypes bf16 --ops msdc --stages 3
    python benchmarks/bench_cuda.py --out /tmp/smoke --dry-run     # CPU: checks that the script runs
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]  # the package, and gpu_common when run via runpy

import torch  # noqa: E402

from gpu_common import (B2_CHANNELS, DRY_CHANNELS, DTYPES, MODES, STRIDES, LGAGRef, MSDCRef, Timer,  # noqa: E402
                        UpDWRef, copy_bandwidth, env_row, environment, make_inputs)

PROVIDERS = ("eager_nchw", "eager_cl", "compiled", "cuda", "cuda_nchw", "triton")
FUSED = ("cuda", "cuda_nchw", "triton")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the JSON / CSV results")
    p.add_argument("--sizes", default="224:6,352:16", help="image_size:batch pairs (default: 224:6,352:16)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--ops", default="msdc,updw,lgag")
    p.add_argument("--stages", default="0,1,2,3", help="decoder stages (0 = deepest, stride 32)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the baseline")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--markdown", action="store_true", help="print a Markdown summary at the end")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke test with tiny shapes (timings meaningless)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# environment and timing
# --------------------------------------------------------------------------------------------------
def op_problem(op: str, channels, stage: int, size: int, batch: int):
    """(module, input shapes, ideal forward traffic in elements) of one op at one decoder stage."""
    c = channels[stage]
    r = max(1, size // STRIDES[stage])
    if op == "msdc":  # MSCB expands to 2C channels before the MSDC
        return MSDCRef(2 * c), [(batch, 2 * c, r, r)], 2 * batch * 2 * c * r * r
    if op == "updw":  # EUCB upsamples the stage map to the next stage's resolution
        return UpDWRef(c), [(batch, c, r, r)], 5 * batch * c * r * r
    return LGAGRef(c), [(batch, c, r, r), (batch, c, r, r)], 3 * batch * c * r * r


def provider_unavailable(provider: str, device: str) -> str | None:
    if provider in FUSED:
        name = "cuda" if provider.startswith("cuda") else provider
        from emcad_kernels import backends
        reason = backends.get_backend(name).unavailable_reason()
        if reason:
            return reason
        if device != "cuda":
            return "needs a GPU"
    return None


def bench_op(op, stage, size, batch, dtype_name, providers, modes, timer, args, channels, device, copy_bw, env):
    dtype = DTYPES[dtype_name]
    base, shapes, ideal_elems = op_problem(op, channels, stage, size, batch)
    base = base.to(device=device, dtype=dtype)
    rows = []
    for provider in providers:
        cl = provider in ("eager_cl", "compiled", "cuda", "triton")
        common = dict(env_row(env), op=op, image_size=size, batch=batch, stage=stage,
                      shape="x".join(map(str, shapes[0])), dtype=dtype_name, provider=provider,
                      layout="channels_last" if cl else "nchw")
        why = provider_unavailable(provider, device)
        if why:
            rows += [dict(common, mode=m, error=f"unavailable: {why}") for m in modes]
            continue
        module = copy.deepcopy(base)
        if cl:
            module = module.to(memory_format=torch.channels_last)
        if provider == "compiled":
            fn = torch.compile(module, mode=None if device != "cuda" else args.compile_mode,
                               backend="inductor" if device == "cuda" else "aot_eager")
        elif provider in FUSED:
            backend = "cuda" if provider.startswith("cuda") else provider
            fn = lambda *xs, _m=module, _b=backend: _m.fused(*xs, backend=_b)  # noqa: E731
        else:
            fn = module
        for mode in modes:
            row = dict(common, mode=mode)
            try:
                module.train(mode != "fwd_eval")
                inputs = make_inputs(shapes, dtype, device, cl, mode == "fwd_bwd")
                params = list(module.parameters())
                if mode == "fwd_eval":
                    def call():
                        with torch.no_grad():
                            return fn(*inputs)
                    ms = timer(call)
                elif mode == "fwd_train":
                    ms = timer(lambda: fn(*inputs))
                else:
                    gy = torch.randn_like(fn(*inputs))

                    def call():
                        fn(*inputs).backward(gy)
                    ms = timer(call, grad_to_none=inputs + params)
                row.update(ms_p50=ms[0], ms_p20=ms[1], ms_p80=ms[2])
                if mode != "fwd_bwd":
                    gbps = ideal_elems * torch.finfo(dtype).bits / 8 / (ms[0] * 1e-3) / 1e9
                    row.update(ideal_gbps=gbps, frac_copy_bw=gbps / copy_bw)
            except Exception as e:  # a failing provider must not lose the other measurements
                row.update(error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
            rows.append(row)
            print(_fmt(row), flush=True)
    _add_speedups(rows)
    return rows


def _fmt(row):
    t = f"{row['ms_p50']:.4f} ms" if "ms_p50" in row else row.get("error", "")
    bw = f"  {row['frac_copy_bw']:.0%} of copy" if "frac_copy_bw" in row else ""
    return f"{row['op']:5} {row['image_size']}/{row['batch']} s{row['stage']} {row['dtype']:5} {row['mode']:9} " \
           f"{row['provider']:11} {t}{bw}"


def _add_speedups(rows):
    for row in rows:
        if "ms_p50" not in row:
            continue
        for base in ("eager_nchw", "eager_cl", "compiled"):
            ref = next((r for r in rows if r["provider"] == base and r["mode"] == row["mode"] and "ms_p50" in r),
                       None)
            if ref is not None:
                row[f"speedup_vs_{base}"] = ref["ms_p50"] / row["ms_p50"]


def fused_choice(rows):
    """Per (op, image size, stage, dtype, mode): the faster of cuda and triton (channels_last), and by how much."""
    table = []
    keys = sorted({(r["op"], r["image_size"], r["batch"], r["stage"], r["dtype"], r["mode"]) for r in rows})
    for op, size, batch, stage, dtype, mode in keys:
        timed = {r["provider"]: r["ms_p50"] for r in rows
                 if (r["op"], r["image_size"], r["batch"], r["stage"], r["dtype"], r["mode"]) ==
                 (op, size, batch, stage, dtype, mode) and "ms_p50" in r and r["provider"] in ("cuda", "triton")}
        if not timed:
            continue
        best = min(timed, key=timed.get)
        entry = dict(op=op, image_size=size, batch=batch, stage=stage, dtype=dtype, mode=mode, choice=best,
                     **{f"{k}_ms": v for k, v in timed.items()})
        if len(timed) == 2:
            other = "triton" if best == "cuda" else "cuda"
            entry["margin"] = timed[other] / timed[best]
        table.append(entry)
    return table


def write_results(out_dir, env, copy_bw, rows, choice):
    os.makedirs(out_dir, exist_ok=True)
    gpu = "".join(ch if ch.isalnum() else "_" for ch in env["gpu_name"]).strip("_") or "device"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(out_dir, f"bench_cuda_{gpu}_{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "copy_bandwidth_gbps": copy_bw, "rows": rows, "fused_choice": choice}, f,
                  indent=1)
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return base


def markdown(env, copy_bw, rows, choice):
    lines = [f"GPU {env['gpu_name']} (driver {env['driver']}, CUDA {env['cuda']}), torch {env['torch']}, "
             f"triton {env['triton']}, commit {env['git_commit'][:10]}, {env['date']}; copy bandwidth "
             f"{copy_bw:.0f} GB/s", "",
             "| op | size/batch | stage | dtype | mode | cuda ms | x eager NCHW | x eager CL | x compiled | "
             "% copy BW |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["provider"] != "cuda" or "ms_p50" not in r:
            continue
        f = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        bw = f"{r['frac_copy_bw']:.0%}" if "frac_copy_bw" in r else "-"
        lines.append(f"| {r['op']} | {r['image_size']}/{r['batch']} | {r['stage']} | {r['dtype']} | {r['mode']} | "
                     f"{r['ms_p50']:.4f} | {f('speedup_vs_eager_nchw')} | {f('speedup_vs_eager_cl')} | "
                     f"{f('speedup_vs_compiled')} | {bw} |")
    if choice:
        lines += ["", "| op | size/batch | stage | dtype | mode | faster fused backend | margin |",
                  "|---|---|---|---|---|---|---|"]
        for c in choice:
            margin = f"{c['margin']:.2f}x" if "margin" in c else "-"
            lines.append(f"| {c['op']} | {c['image_size']}/{c['batch']} | {c['stage']} | {c['dtype']} | "
                         f"{c['mode']} | {c['choice']} | {margin} |")
    return "\n".join(lines)


def main(args):
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA GPU (use --dry-run to check the script on CPU)")
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    channels = B2_CHANNELS
    if args.dry_run:
        sizes, channels = [(64, 2)], DRY_CHANNELS
    torch.manual_seed(0)
    env = environment(device)
    timer = Timer(device, args.warmup_ms, args.rep_ms)
    copy_bw = copy_bandwidth(timer, device)
    print(f"{env['gpu_name']}: copy bandwidth {copy_bw:.0f} GB/s", flush=True)
    providers = [p for p in args.providers.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    for size, batch in sizes:
        for dtype_name in args.dtypes.split(","):
            for op in args.ops.split(","):
                for stage in (int(s) for s in args.stages.split(",")):
                    if op == "updw" and stage == 3:
                        continue  # the finest stage has no EUCB
                    if op == "lgag" and stage == 0:
                        continue  # the deepest stage has no LGAG
                    rows += bench_op(op, stage, size, batch, dtype_name, providers, modes, timer, args, channels,
                                     device, copy_bw, env)
    choice = fused_choice(rows)
    base = write_results(args.out, env, copy_bw, rows, choice)
    print(f"wrote {base}.json and {base}.csv")
    if args.markdown:
        print(markdown(env, copy_bw, rows, choice))


if __name__ == "__main__":
    main(parse_args())
