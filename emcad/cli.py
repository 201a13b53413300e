"""The ``emcad`` command line.

    emcad info                         versions, backends (and why one is unavailable), models
    emcad flops --model emcad_b2       parameters and MACs in the paper's convention (EMCAD.md §6)
    emcad train                        train (default: EMCAD-B0 on the built-in synthetic data, ~1-2 min on CPU)
    emcad evaluate --checkpoint DIR    Dice, IoU and HD95 per class and per case
    emcad predict IMAGES --checkpoint DIR   masks and overlay PNGs
    emcad bench --model emcad_b0       forward / training-step time and memory per backend and torch.compile
    emcad selftest                     every fused op on every usable backend vs the reference (exit 1 on a failure)
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional, Sequence


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
        reason = backends.get_backend(name).unavailable_reason()
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print("models: " + ", ".join(emcad.list_models()))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emcad", description="EMCAD models on fused multi-scale depthwise kernels")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="versions, available backends and models")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("flops", help="parameters and MACs of a model in the paper's convention")
    p.add_argument("--model", default="emcad_b2",
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
