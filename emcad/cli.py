"""The ``emcad`` command line.

    emcad info                         versions, backends (and why one is unavailable), models
    emcad flops --model emcad_b2       parameters and MACs in the paper's convention (EMCAD.md §6)
    emcad train                        train (default: EMCAD-B0 on the built-in synthetic data, 2-3 min on CPU)
    emcad evaluate --checkpoint DIR    Dice, IoU and HD95 per class and per case (test_metrics.json)
    emcad predict IMAGES --checkpoint DIR   masks (class indices and colour) and overlay PNGs
    emcad bench --model emcad_b0       forward / training-step time and memory per backend (--compile: also
                                       torch.compile)
    emcad selftest                     every fused op on every usable backend vs the reference (exit 1 on a failure)

Errors: one ``error:`` line on stderr; exit code 2 for a wrong command line, 1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Optional, Sequence

EXIT_RUNTIME_ERROR = 1  # bad data, missing or unreadable files, ...: one `error:` line on stderr
EXIT_USAGE_ERROR = 2    # the command line itself is wrong (argparse's code)


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import emcad
    import emcad_kernels as ek
    from emcad_kernels import backends

    print(f"emcad-kernels {ek.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA available: {torch.cuda.is_available()}, threads: {torch.get_num_threads()}")
    print("backends (highest priority first):")
    for name in backends.registered_backends():
        print(f"  {name:<10} {_backend_status(name)}")
    print("models: " + ", ".join(emcad.list_models()))
    return 0


def _backend_status(name: str) -> str:
    """The backend's own availability, plus the remark that an installed triton cannot run without a GPU."""
    import torch

    from emcad_kernels import backends

    reason = backends.get_backend(name).unavailable_reason()
    if reason is not None:
        return "unavailable: " + reason
    if name == "triton" and not torch.cuda.is_available():
        from importlib import metadata
        try:
            installed = f"triton {metadata.version('triton')}"
        except metadata.PackageNotFoundError:  # importable without metadata (a source tree on sys.path)
            installed = "triton"
        return f"installed ({installed}), but no CUDA GPU: runs only under TRITON_INTERPRET=1 (tests)"
    return "available"


def _cmd_flops(args: argparse.Namespace) -> int:
    import torch

    import emcad
    from emcad.flops import count_macs, decoder_inputs

    height, width = args.size
    if height % 32 or width % 32:
        print(f"error: --size must be multiples of 32, got {height}x{width}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = emcad.create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    if args.model in ("egeunet", "malunet"):
        return _print_thop_flops(args, model, height, width)
    if args.decoder_only:
        target = model.decoder
        inputs = decoder_inputs(target.channels, height, width)
        what = f"{args.model} decoder"
    else:
        target = model
        inputs = (torch.randn(1, args.in_channels, height, width),)
        what = f"{args.model} (num_classes={args.num_classes}, in_channels={args.in_channels})"
    report = count_macs(target, inputs)
    print(f"{what} at {height}x{width}, batch 1")
    print("MACs: the paper's 'FLOPs' (ptflops module-hook rules, EMCAD.md §6.1); FLOPs = 2 x MACs")
    print(f"{'module':<14}{'MACs':>16}")
    for name, macs in report.per_module.items():
        print(f"{name:<14}{macs:>16,}")
    print(f"{'total':<14}{report.macs:>16,}  ({report.macs / 1e9:.4f} GMACs, {report.flops / 1e9:.4f} GFLOPs)")
    print(f"parameters: {report.params:,} ({report.params / 1e6:.3f} M)")
    return 0


def _print_thop_flops(args: argparse.Namespace, model, height: int, width: int) -> int:
    """EGE-UNet and MALUNet are reported in their papers' convention (thop; EGE-UNet_MALUNet.md §4.1)."""
    import torch

    from emcad.flops_thop import count_macs_thop

    if args.decoder_only:
        print(f"error: --decoder-only applies to EMCAD models, not {args.model}", file=sys.stderr)
        return 2
    report = count_macs_thop(model, (torch.randn(1, args.in_channels, height, width),))
    print(f"{args.model} at {height}x{width}, batch 1")
    print("MACs in thop's convention (the EGE-UNet/MALUNet papers' 'FLOPs'); FLOPs = 2 x MACs")
    print(f"total MACs: {report.macs:,} ({report.macs / 1e9:.4f} G)")
    print(f"parameters: {report.total_params:,} (thop counts {report.params:,})")
    return 0


def model_name(value: str) -> str:
    """argparse type for ``--model``: a registered model name (a usage error otherwise)."""
    from emcad.models import list_models

    names = list_models()
    if value in names:
        return value
    import difflib
    close = difflib.get_close_matches(value, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise argparse.ArgumentTypeError(f"unknown model {value!r}{hint}; available: {', '.join(names)}")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``error: emcad train: ... (see: emcad train --help)``, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE_ERROR, f"error: {self.prog}: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emcad", description="EMCAD models on fused multi-scale depthwise kernels")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="versions, available backends and models")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("flops", help="parameters and MACs of a model in the paper's convention")
    p.add_argument("--model", default="emcad_b2", type=model_name,
                   help="a model name from `emcad info`, or egeunet / malunet (default: emcad_b2)")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                   help="input size, multiples of 32 (default: 224 224)")
    p.add_argument("--num-classes", type=int, default=1)
    p.add_argument("--in-channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--decoder-only", action="store_true", help="count the EMCAD decoder alone (paper: 0.381 G)")
    p.set_defaults(func=_cmd_flops)

    from emcad_kernels import selftest

    p = sub.add_parser("selftest", help="check every fused op on every usable backend against the reference")
    selftest.add_arguments(p)
    p.set_defaults(func=selftest.main)

    from emcad.training.commands import add_commands  # train, evaluate, predict, bench (lazy heavy imports)

    add_commands(sub)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a missing/unreadable file, not a bug: reported as one ``error:`` line."""
    from emcad.checkpoint import CheckpointError
    from emcad.data import DatasetError, ImageReadError
    from emcad.encoders.weights import EncoderWeightsError
    from emcad.io_safety import WriteError
    from emcad.training.checkpoint import CheckpointReadError
    from emcad.training.trainer import TrainError
    from emcad_kernels import BackendUnavailableError

    # ValueError: the library's argument checks (sizes, names, file formats) raise it with a full message
    return (DatasetError, ImageReadError, CheckpointError, CheckpointReadError, EncoderWeightsError, TrainError,
            WriteError, BackendUnavailableError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, ValueError)


def debug_enabled() -> bool:
    """EMCAD_DEBUG=1: show the traceback of expected errors too."""
    return os.environ.get("EMCAD_DEBUG", "") not in ("", "0")


def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (a multi-line message keeps its first line)."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"'{exc.filename}': {exc.strerror}"
    return "error: " + (text.splitlines()[0] if text else type(exc).__name__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 success, 1 a run-time failure, 2 a usage error, 130 interrupted (see also ``emcad train``).
    Expected failures print one ``error:`` line; EMCAD_DEBUG=1 shows their traceback too. Anything else (a bug)
    keeps its traceback."""
    args = build_parser().parse_args(argv)
    debug = debug_enabled()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except expected_errors() as e:
        if debug:
            raise
        print(error_line(e), file=sys.stderr)
        return EXIT_RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
