"""CPU inference of exported models against the in-process paths, side by side in one run.

    python benchmarks/bench_export.py                       # EMCAD-B0, EMCAD-B2 (224 px), EGE-UNet (256 px)
    python benchmarks/bench_export.py --models egeunet --rounds 3 --no-compile

Per model (random weights, eval mode, fp32, ``torch.no_grad``, NCHW input, the prediction output only: EMCADNet
computes only its last head), the providers are:

* ``onnxruntime``: the file written by ``emcad.export_model(format="onnx")`` (the plain composition), CPU execution
  provider, all graph optimisations, ``intra_op_num_threads = --threads``, one inter-op thread;
* ``auto``: the model as created (``backend="auto"``: the fused cpu kernels, eval-mode pointwise folding);
* ``torch``: the same weights with ``backend="torch"`` (the plain nn-module composition), eager;
* ``torch.compile``: ``torch.compile`` (inductor, default mode) of the ``torch`` composition;
* ``aoti .pt2`` (``--pt2``): the package written by ``export_model(format="pt2")``, loaded with
  ``aoti_load_package``.

Timing: wall clock per forward, the minimum over ``--rounds`` interleaved rounds of ``--iters`` calls each (every
provider runs once per round, in turn), after a warm-up. Every provider's output is compared with ``torch``'s.
The table (markdown) goes to stdout and to ``--output`` (default ``results/export_cpu_<N>thread(s).md``).
On a machine whose cores are busy with other processes, compare at ``--threads 1``: PyTorch's multi-threaded
(OpenMP) regions slow down far more than onnxruntime's thread pool when oversubscribed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import emcad  # noqa: E402
from emcad.export import _Exported, export_model, plain_copy  # noqa: E402

# model -> (create_model arguments, input size)
MODELS = {
    "emcad_b0": (dict(num_classes=9, in_channels=3), (224, 224)),
    "emcad_b2": (dict(num_classes=9, in_channels=3), (224, 224)),
    "egeunet": (dict(num_classes=1, in_channels=3), (256, 256)),
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def _providers(name: str, batch: int, threads: int, workdir: str, compile: bool, pt2: bool, log):
    import onnxruntime

    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = emcad.create_model(name, **kwargs).eval()
    x = torch.randn(batch, kwargs["in_channels"], *size)
    if name == "egeunet":
        x = x.uniform_(0, 255)  # its input scaling
    auto = _Exported(model, "prediction").eval()
    plain = _Exported(plain_copy(model), "prediction").eval()
    providers = {}

    log(f"{name}: exporting ONNX")
    onnx_path = os.path.join(workdir, f"{name}.onnx")
    report = export_model(model, onnx_path, size=size)
    log("  " + report.summary())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    feed = {"image": x.numpy()}
    providers["onnxruntime"] = lambda: torch.from_numpy(session.run(None, feed)[0])
    providers["auto"] = lambda: auto(x)
    providers["torch"] = lambda: plain(x)
    if compile:
        log(f"{name}: torch.compile")
        compiled = torch.compile(plain)
        providers["torch.compile"] = lambda: compiled(x)
    if pt2:
        log(f"{name}: exporting .pt2 (AOTInductor)")
        pt2_path = os.path.join(workdir, f"{name}.pt2")
        log("  " + export_model(model, pt2_path, size=size).summary())
        runner = torch._inductor.aoti_load_package(pt2_path)
        providers["aoti .pt2"] = lambda: runner(x)
    return providers, x


def measure(providers: dict, rounds: int, iters: int, warmup: int) -> dict:
    times = {name: [] for name in providers}
    with torch.no_grad():
        for fn in providers.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in providers.items():
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                times[name].append((time.perf_counter() - start) / iters * 1e3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--pt2", action="store_true", help="also the AOTInductor package (minutes of C++ build)")
    parser.add_argument("-o", "--output", help="default: benchmarks/results/export_cpu_<N>thread(s).md")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"export_cpu_{args.threads}thread{'s' if args.threads > 1 else ''}.md")
    import onnxruntime

    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            providers, x = _providers(name, args.batch, args.threads, workdir, args.compile, args.pt2, log)
            with torch.no_grad():
                reference = providers["torch"]()
                diffs = {p: (fn() - reference).abs().max().item() for p, fn in providers.items()}
            log(f"{name}: timing {list(providers)}")
            times = measure(providers, args.rounds, args.iters, args.warmup)
            rows.append((name, tuple(x.shape), times, diffs))
            for p, t in times.items():
                log(f"  {p:<14} min {min(t):8.2f} ms  median {statistics.median(t):8.2f} ms  "
                    f"max|diff vs torch| {diffs[p]:.2g}")
    load_end = os.getloadavg()

    names = list(rows[0][2])
    lines = [f"Measured on: {_cpu_name()}, {os.cpu_count()} cores, {args.threads} threads (torch.set_num_threads, "
             f"onnxruntime intra_op_num_threads); torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
             f"Python {platform.python_version()}; commit {_commit()}; {started}; load average at start "
             f"{load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f} (1/5/15 min), at the end "
             f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}. fp32, batch {args.batch}, ms per forward "
             f"(minimum over {args.rounds} interleaved rounds of {args.iters}; median in brackets).",
             "",
             "| model | input | " + " | ".join(names) + " | auto / onnxruntime | torch.compile / onnxruntime |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for name, shape, times, diffs in rows:
        best = {p: min(t) for p, t in times.items()}
        cells = [f"{best[p]:.2f} ({statistics.median(times[p]):.2f})" for p in names]
        ratio_auto = f"{best['auto'] / best['onnxruntime']:.2f}×"
        ratio_compile = (f"{best['torch.compile'] / best['onnxruntime']:.2f}×" if "torch.compile" in best else "-")
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | " + " | ".join(cells)
                     + f" | {ratio_auto} | {ratio_compile} |")
    lines += ["", "Largest difference of each provider's output from the eager `torch` output: "
              + "; ".join(f"{name}: " + ", ".join(f"{p} {d:.1g}" for p, d in diffs.items() if p != "torch")
                          for name, _, _, diffs in rows) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    log(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
