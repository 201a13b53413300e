"""The ``emcad train``, ``evaluate``, ``predict``, ``export`` and ``bench`` subcommands (registered by
:mod:`emcad.cli`).

Exit codes: 0 success; 1 a run-time error (bad data, unreadable checkpoint, ...; one ``error:`` line on stderr);
2 a usage error (argparse); 130 / 143 when SIGINT / SIGTERM stopped training (a checkpoint was saved first).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from emcad.cli import model_name

__all__ = ["add_commands"]

EXIT_ERROR = 1
EXIT_USAGE = 2


def _error(problem) -> int:
    """One ``error:`` line for a message or an exception; exit code 1. Called while an exception is handled and
    with EMCAD_DEBUG=1, re-raises it instead (its traceback is then shown)."""
    from emcad.cli import debug_enabled, error_line
    if debug_enabled() and sys.exc_info()[1] is not None:
        raise
    print(error_line(problem) if isinstance(problem, BaseException) else f"error: {problem}", file=sys.stderr)
    return EXIT_ERROR


def _usage_error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _known_errors():
    from emcad.cli import expected_errors
    return expected_errors()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for on/off flags ("--no-overlay ... (default: True)" reads backwards: their help says
    in words what happens without the flag) and for None (the help says what happens then)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


DATA_DIR_KINDS = ("folder", "synapse", "synapse_volumes")


class _DataAction(argparse.Action):
    """``--data KIND`` or the shorthand ``--data KIND:DIR`` (= ``--data KIND --data-dir DIR``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        kind, sep, directory = value.partition(":")
        if kind not in self.choices_:
            parser.error(f"argument --data: invalid choice {kind!r} (choose from "
                         f"{', '.join(self.choices_)}; a directory may follow as KIND:DIR)")
        if sep:
            if kind not in DATA_DIR_KINDS:
                parser.error(f"argument --data: {kind} data takes no directory, got {value!r}")
            if not directory:
                parser.error(f"argument --data: no directory after '{kind}:'")
            _set_data_dir(parser, namespace, directory)
        setattr(namespace, self.dest, kind)

    def __init__(self, option_strings, dest, choices=(), **kwargs):
        self.choices_ = tuple(choices)
        kwargs.setdefault("metavar", "{" + ",".join(self.choices_) + "}[:DIR]")
        super().__init__(option_strings, dest, **kwargs)


class _DataDirAction(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        _set_data_dir(parser, namespace, value)


def _set_data_dir(parser, namespace, directory: str) -> None:
    before = getattr(namespace, "data_dir", None)
    if before is not None and before != directory:
        parser.error(f"the data directory is given twice ('{before}' and '{directory}'): use either "
                     f"--data KIND:DIR or --data KIND --data-dir DIR")
    namespace.data_dir = directory


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------
# flags that may change when resuming (everything else comes from the checkpoint)
_RESUME_OVERRIDES = {"steps", "epochs", "progress", "threads", "num_workers", "checkpoint_every", "log_every",
                     "val_every", "plots", "output"}


def _cmd_train(args: argparse.Namespace) -> int:
    from emcad.training.trainer import TrainConfig, TrainError, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "resume", "overwrite")}
    if "size" in given:
        given["size"] = tuple(given["size"])
    try:
        if args.resume:
            from emcad.training.checkpoint import load_training_checkpoint
            ckpt = load_training_checkpoint(args.resume)
            base = ckpt["config"]
            changed = sorted(k for k, v in given.items() if k not in _RESUME_OVERRIDES
                             and (list(v) if isinstance(v, tuple) else v) != base.get(k))
            if changed:
                raise TrainError(f"--resume continues the run with its saved settings; these flags differ from it: "
                                 f"{', '.join('--' + k.replace('_', '-') for k in changed)}")
            # outputs go to the checkpoint's own run folder or to an explicit -o, never to the stored -o
            cfg = TrainConfig.from_dict({**base, "output": None, **given})
            del ckpt
        else:
            if "size" not in given and given.get("data", "synthetic") != "synthetic":
                given["size"] = (224, 224)
            cfg = TrainConfig(**given)
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except _known_errors() as e:
        return _error(str(e))
    if result.interrupted:
        return 143 if result.stop_signal == signal.SIGTERM else 130
    return 0


def _add_train(sub) -> None:
    S = argparse.SUPPRESS
    p = sub.add_parser(
        "train", help="train a model (default: EMCAD-B0 on the built-in synthetic data)",
        description="Train an EMCAD model. With no arguments: EMCAD-B0 on the built-in synthetic dataset (64x64, "
                    "3 classes), 200 steps (about half a minute on 2 CPU cores); outputs (checkpoints, CSV/JSON "
                    "metrics, PNG curves and overlays) go to runs/<model>-<data>-<time>/ (printed). Distributed: "
                    "torchrun --nproc_per_node N -m emcad.cli train ...",
        argument_default=S, formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", type=model_name, help="a name from `emcad info` [emcad_b0]")
    g.add_argument("--encoder-weights", metavar="FILE", help="local pretrained encoder weights")
    g.add_argument("--backend", help="torch, auto or an emcad_kernels backend for the decoder blocks [auto]")
    g = p.add_argument_group("data")
    g.add_argument("--data", action=_DataAction, choices=("synthetic", "folder", "synapse"),
                   help="dataset kind [synthetic]; folder:DIR and synapse:DIR are short for --data KIND --data-dir "
                        "DIR")
    g.add_argument("--data-dir", action=_DataDirAction, metavar="DIR",
                   help="folder: DIR/images + DIR/masks; synapse: the .npz slices")
    g.add_argument("--val-dir", metavar="DIR", help="a separate validation set (default: a split of the training "
                                                    "data; never the test set)")
    g.add_argument("--list-file", metavar="FILE", help="synapse: names of the training slices (train.txt)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="training size, multiples of 32 [64 64 synthetic, 224 224 otherwise]")
    g.add_argument("--num-classes", type=int, help="classes (default: from the data; binary masks give 1)")
    g.add_argument("--train-samples", type=int, help="synthetic training images [1024]")
    g.add_argument("--val-samples", type=int, help="synthetic validation images [64]")
    g.add_argument("--val-fraction", type=float, help="validation share carved from the training data [0.1]")
    g.add_argument("--mask-suffix", help="folder: mask of NAME.png is NAME<suffix>.png ['']")
    g.add_argument("--normalize", choices=("none", "imagenet"), help="folder: input normalisation [none]")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no flips/rotations")
    g.add_argument("--workers", dest="num_workers", type=int, help="DataLoader workers [0]")
    g = p.add_argument_group("loss")
    g.add_argument("--supervision", choices=("auto", "mutation", "heads_and_sum", "deep_supervision", "last_layer"),
                   help="how the 4 heads are supervised [auto: mutation multi-class, heads_and_sum binary]")
    g.add_argument("--criterion", choices=("auto", "ce_dice", "structure"),
                   help="per-head loss [auto: 0.3 CE + 0.7 Dice multi-class, structure loss binary]")
    g.add_argument("--structure-bce-reduction", choices=("none", "mean"),
                   help="structure loss BCE: none = weighted (intended), mean = the original code's collapsed "
                        "unweighted BCE (reproduction only) [none]")
    g.add_argument("--loss-impl", choices=("auto", "fused", "plain"),
                   help="MUTATION loss implementation: fused (emcad_kernels.mutation_loss on the low-resolution "
                        "heads, never building the upsampled logits), plain (upsampled heads, 15 softmaxes), auto = "
                        "fused where the model and loss allow it [auto]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimisation steps [synthetic: 200, otherwise 300]")
    g.add_argument("--epochs", type=int, help="epochs instead of --steps")
    g.add_argument("--batch-size", type=int, help="global batch size [synthetic: 8, synapse: 6 (paper), folder: 16]")
    g.add_argument("--lr", type=float, help="AdamW learning rate [the paper's 1e-4; synthetic demo (encoder from "
                                           "scratch): 2e-3]")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay [1e-4]")
    g.add_argument("--lr-schedule", choices=("constant", "poly", "cosine"),
                   help="[constant, as the paper; synthetic demo: cosine]")
    g.add_argument("--warmup-steps", type=int, help="linear LR warm-up steps [0; synthetic demo: 20]")
    g.add_argument("--drop-path", type=float, help="PVTv2 stochastic-depth rate [the encoder's 0.1]")
    g.add_argument("--clip-grad-norm", type=float, metavar="MAX", help="clip the gradient norm")
    g.add_argument("--clip-grad-value", type=float, metavar="V", help="clamp gradients to [-V, V] (CASCADE: 0.5)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA; also CPU, useful on CPUs with native bf16)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    g.add_argument("--seed", type=int, help="[0]")
    g.add_argument("--device", help="auto, cpu or cuda [auto]")
    g.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--sync-bn", action="store_true", help="DDP: synchronise BatchNorm statistics")
    g.add_argument("--reproduce-eval-mode-quirk", action="store_true",
                   help="reproduce the original code's training in eval mode after the first validation "
                        "(comparison studies only)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-head", choices=("last", "sum"), help="prediction: last head (p1) or sum of heads [last]")
    g.add_argument("--val-every", type=int, help="validate every N steps [50]")
    g.add_argument("--checkpoint-every", type=int, help="write checkpoints/last.pt every N steps [100]")
    g.add_argument("--log-every", type=int, help="log the loss every N steps [10]")
    g.add_argument("-o", "--output", metavar="DIR", help="output directory [runs/<model>-<data>-<time>]")
    g.add_argument("--resume", metavar="CKPT", default=None,
                   help="continue a run exactly from its checkpoints/last.pt; outputs go to that run folder "
                        "(or to -o); a finished run continues only with more --steps")
    g.add_argument("--overwrite", action="store_true", default=False,
                   help="replace the run already in the output folder (refused otherwise)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG figures")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------
def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    import torch

    from emcad.training.evaluation import evaluate_dataset, evaluate_volumes, format_summary
    from emcad.training.inference import load_for_inference

    if args.data != "synthetic" and not args.data_dir:
        return _usage_error(f"--data {args.data} needs a directory: --data {args.data}:DIR or --data-dir DIR")
    try:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, pre = load_for_inference(args.checkpoint, backend=args.backend, device=device,
                                        model_name=args.model, num_classes=args.num_classes)
        num_classes = int(pre.get("num_classes") or model.num_classes)
        size = tuple(args.size) if args.size else tuple(pre.get("size") or (224, 224))
        head = args.head or pre.get("eval_head", "last")
        class_names = pre.get("class_names")
        t0 = time.perf_counter()
        if args.data == "synapse_volumes":
            from emcad.data import SynapseVolumes
            from emcad.data.synapse import SYNAPSE_CLASSES
            vols = SynapseVolumes(args.data_dir, list_file=args.list_file, num_classes=num_classes)
            summary, cases = evaluate_volumes(model, vols, num_classes, size, device=device, head=head,
                                              convention=args.convention, batch_size=args.batch_size,
                                              spacing=args.spacing)
            class_names = class_names or list(SYNAPSE_CLASSES)
            what = f"{len(vols)} Synapse volumes"
        else:
            if args.data == "synthetic":
                from emcad.data import SyntheticSegmentation
                ds = SyntheticSegmentation(args.samples, size, seed=args.seed, split="test")
            elif args.data == "folder":
                from emcad.data import ImageMaskFolder
                ds = ImageMaskFolder(args.data_dir, size, mask_suffix=args.mask_suffix,
                                     num_classes=num_classes if num_classes > 1 else None,
                                     channels=int(pre.get("in_channels") or 1),
                                     normalize=pre.get("normalize", "none"))
                if pre.get("value_range"):
                    from emcad.training.inference import _ValueRange
                    ds = _ValueRange(ds, pre["value_range"])
            else:
                from emcad.data import SynapseSlices
                ds = SynapseSlices(args.data_dir, size, list_file=args.list_file, num_classes=num_classes)
            summary, cases, _ = evaluate_dataset(model, ds, num_classes, batch_size=args.batch_size, device=device,
                                                 head=head, convention=args.convention, spacing=args.spacing)
            class_names = class_names or getattr(ds, "class_names", None)
            what = f"{len(ds)} images ({args.data})"
    except _known_errors() as e:
        return _error(e)
    print(f"evaluated {args.checkpoint} on {what} in {time.perf_counter() - t0:.1f} s "
          f"(convention: {args.convention}; HD95 in pixels{' x spacing' if args.spacing else ''})")
    print(format_summary(summary, class_names))
    out = args.output or _run_folder(args.checkpoint) or os.path.join(
        "runs", f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics_path, cases_path = _write_test_metrics(out, args, summary, cases, class_names, head)
    print(f"test metrics: {metrics_path}; per case: {cases_path}")
    return 0


def _run_folder(checkpoint: str):
    """``RUN`` for a checkpoint inside ``RUN/checkpoints/`` (best/, final/, last.pt), else None."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def _write_test_metrics(out: str, args: argparse.Namespace, summary: dict, cases, class_names, head: str):
    """``test_metrics.json`` (means per class, keyed by class name) and ``test_per_case.csv`` in ``out``."""
    from emcad.training.evaluation import class_keys
    from emcad.training.trainer import _write_csv, _write_json

    keys = class_keys(sorted({c for case in cases for c in case.per_class} | set(summary["per_class"])),
                      class_names)
    os.makedirs(out, exist_ok=True)
    rows = [{"case": case.name, "class": keys[c], "class_index": c, **v}
            for case in cases for c, v in case.per_class.items()]
    cases_path = os.path.join(out, "test_per_case.csv")
    _write_csv(cases_path, rows)
    metrics_path = os.path.join(out, "test_metrics.json")
    _write_json(metrics_path, {
        "checkpoint": os.path.abspath(args.checkpoint), "data": args.data,
        "data_dir": os.path.abspath(args.data_dir) if args.data_dir else None, "convention": args.convention,
        "head": head, "hd95_unit": "pixels x spacing" if args.spacing else "pixels", "cases": summary["cases"],
        "class_names": list(class_names) if class_names else None,
        "class_index": {keys[c]: c for c in summary["per_class"]},
        "mean": summary["mean"],  # over the foreground classes
        "per_class": {keys[c]: v for c, v in summary["per_class"].items()},
    })
    return metrics_path, cases_path


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, IoU and HD95 per class and per case",
                       description="Evaluate a checkpoint (a checkpoints/best or final directory, a "
                                   "checkpoints/last.pt, or an original .pth) on test data.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="save_pretrained directory, last.pt or original .pth")
    p.add_argument("--data", default="synthetic", action=_DataAction,
                   choices=("synthetic", "folder", "synapse", "synapse_volumes"),
                   help="test data kind (synthetic: its held-out test split); KIND:DIR is short for --data KIND "
                        "--data-dir DIR")
    p.add_argument("--data-dir", action=_DataDirAction, metavar="DIR",
                   help="folder: DIR/images + DIR/masks; synapse: .npz slices; synapse_volumes: .npy.h5 (needs "
                        "h5py) or .npz volumes")
    p.add_argument("--list-file", help="synapse: list of names")
    p.add_argument("--mask-suffix", default="")
    p.add_argument("--samples", type=int, default=64, help="synthetic test images")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="model input size (default: training)")
    p.add_argument("--convention", default="standard", choices=("standard", "transunet"),
                   help="empty-mask convention (see emcad.metrics); transunet = the original code's, for "
                        "comparisons only")
    p.add_argument("--spacing", type=float, nargs="+", help="pixel/voxel spacing for HD95 (e.g. 1 1 or 3 1 1)")
    p.add_argument("--head", choices=("last", "sum"), help="prediction head (default: as trained)")
    p.add_argument("--model", type=model_name,
                   help="original .pth only: the model name if it cannot be inferred")
    p.add_argument("--num-classes", type=int, help="original .pth only: expected classes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="where test_metrics.json and test_per_case.csv go (default: the checkpoint's run folder "
                        "when it is inside RUN/checkpoints/, else runs/evaluate-<time>)")
    p.set_defaults(func=_with_threads(_cmd_evaluate))


# --------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------
def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from emcad.data.io import IMAGE_EXTENSIONS, read_image, write_png
    from emcad.training.evaluation import labels_from_logits, predict_logits
    from emcad.training.inference import load_for_inference, prepare_image
    from emcad.training.plotting import colorize, overlay

    try:
        files = []
        for item in args.inputs:
            if os.path.isdir(item):
                found = sorted(os.path.join(item, f) for f in os.listdir(item)
                               if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith("."))
                sub = os.path.join(item, "images")
                if not found and os.path.isdir(sub):
                    found = sorted(os.path.join(sub, f) for f in os.listdir(sub)
                                   if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
                if not found:
                    return _error(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in '{item}'")
                files += found
            elif os.path.isfile(item):
                files.append(item)
            else:
                return _error(f"'{item}' is neither an image file nor a directory")
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, pre = load_for_inference(args.checkpoint, backend=args.backend, device=device)
        size = tuple(args.size) if args.size else tuple(pre.get("size") or (224, 224))
        head = args.head or pre.get("eval_head", "last")
        out = args.output or os.path.join("runs", f"predict-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(out, exist_ok=True)
        num_classes = int(pre.get("num_classes") or model.num_classes)
        stems: set[str] = set()
        for path in files:
            arr = read_image(path)
            x = prepare_image(arr, pre)[None].to(device)
            logits = predict_logits(model, x, mode=args.mode, size=size if args.mode != "pad" else None,
                                    overlap=args.overlap, head=head)
            labels = labels_from_logits(logits.float())[0].cpu().numpy().astype(np.uint8)
            stem = os.path.splitext(os.path.basename(path))[0]
            while stem in stems:
                stem += "_"
            stems.add(stem)
            mask = labels * 255 if num_classes == 1 else labels
            write_png(os.path.join(out, f"{stem}_mask.png"), mask.astype(np.uint8))
            write_png(os.path.join(out, f"{stem}_mask_color.png"), colorize(labels))
            if args.overlay:
                write_png(os.path.join(out, f"{stem}_overlay.png"), overlay(x[0].cpu(), labels))
            print(f"{path}: {arr.shape[1]}x{arr.shape[0]} -> {stem}_mask.png "
                  f"(classes present: {sorted(int(v) for v in np.unique(labels))})")
    except _known_errors() as e:
        return _error(e)
    print(f"{len(files)} image(s) -> {os.path.abspath(out)}")
    print("  NAME_mask.png: " + ("0/255 (foreground = 255)" if num_classes == 1 else
                                 "class index per pixel (0 = background; for programs, looks black in a viewer)"))
    print("  NAME_mask_color.png: the same mask in colour (one palette colour per class, background black)")
    if args.overlay:
        print("  NAME_overlay.png: the image with the predicted classes blended in")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images or folders; write masks (class indices and colour) and "
                                       "overlay PNGs",
                       description="Segment images (PNG/JPG/TIFF) with a trained checkpoint. Sizes that are not "
                                   "multiples of 32 are handled by --mode: resize (to the training size and back), "
                                   "pad (reflect-pad to a multiple of 32) or sliding (windows of the training size). "
                                   "Per image NAME: NAME_mask.png (class indices; 0/255 for binary models), "
                                   "NAME_mask_color.png (the mask in palette colours) and NAME_overlay.png.",
                       formatter_class=_HelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or directories")
    p.add_argument("--checkpoint", required=True, help="save_pretrained directory, last.pt or original .pth")
    p.add_argument("-o", "--output", help="output directory [runs/predict-<time>]")
    p.add_argument("--mode", default="resize", choices=("resize", "pad", "sliding"))
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="model input / window size "
                                                                       "(default: the training size)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    p.add_argument("--head", choices=("last", "sum"))
    p.add_argument("--no-overlay", dest="overlay", action="store_false",
                   help="do not write the NAME_overlay.png files (written by default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.set_defaults(func=_with_threads(_cmd_predict))


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    from emcad.export import ExportCheckError, export_model
    from emcad.training.inference import load_for_inference

    try:
        model, pre = load_for_inference(args.checkpoint, backend="auto", device="cpu", model_name=args.model,
                                        num_classes=args.num_classes)
        size = tuple(args.size) if args.size else tuple(pre.get("size") or (224, 224))
        report = export_model(model, args.output, format=args.format, size=size,
                              in_channels=int(pre.get("in_channels") or 0) or None, batch_size=args.batch_size,
                              dynamic_batch=not args.static_batch, outputs=args.outputs, opset=args.opset,
                              check=args.check)
    except (*_known_errors(), ExportCheckError, ImportError) as e:
        return _error(str(e))
    print(f"exported {args.checkpoint}: {report.summary()}")
    keys = ("in_channels", "normalize", "value_range", "num_classes", "class_names")
    print("preprocessing the exported model expects: " + ", ".join(f"{k}={pre[k]}" for k in keys if pre.get(k)))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX or an AOTInductor .pt2 package",
                       description="Export a checkpoint (save_pretrained directory, checkpoints/last.pt or an "
                                   "original .pth) for deployment: ONNX (onnxruntime; needs the [export] extra) "
                                   "or a .pt2 AOTInductor package (torch._inductor.aoti_load_package). The "
                                   "plain composition of the same weights is exported (no emcad_kernels needed to "
                                   "run it); dynamic batch, fixed height and width; checked against the eager "
                                   "model unless --no-check.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="save_pretrained directory, last.pt or original .pth")
    p.add_argument("-o", "--output", required=True, help="the file to write (*.onnx or *.pt2)")
    p.add_argument("--format", choices=("onnx", "pt2"), help="default: from the file name")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input height and width, multiples of 32 (default: the training size)")
    p.add_argument("--outputs", choices=("prediction", "all"), default="prediction",
                   help="the prediction only, or every output of the model")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the traced example input")
    p.add_argument("--static-batch", action="store_true", help="fix the batch at --batch-size")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the exported file against the eager model")
    p.add_argument("--model", help="original .pth only: the model name if it cannot be inferred")
    p.add_argument("--num-classes", type=int, help="original .pth only: expected classes")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.set_defaults(func=_with_threads(_cmd_export))


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------
def _cmd_bench(args: argparse.Namespace) -> int:
    from emcad.training.bench import format_table, plan_configs, run_bench

    try:
        import torch
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        configs, skipped = plan_configs(args.backends, args.compile, device)
        if skipped:
            print("skipped: " + "; ".join(skipped), flush=True)
        rows = run_bench(args.model, size=tuple(args.size), batch_size=args.batch_size,
                         num_classes=args.num_classes, in_channels=args.in_channels, configs=configs,
                         iters=args.iters, warmup=args.warmup, device=device,
                         train_step=not args.forward_only, log=lambda s: print(s, file=sys.stderr, flush=True),
                         loss_impl=args.loss_impl)
    except _known_errors() as e:
        return _error(e)
    print(format_table(rows))
    if args.output:
        from emcad.training.trainer import _write_csv
        _write_csv(args.output, rows)
        print(f"written: {args.output}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="forward and training-step time/memory per backend (and torch.compile)",
                       description="Time the forward pass and the training step of one model with each backend "
                                   "that can run here; backends that cannot (and, without --compile, the "
                                   "torch.compile rows) are listed as skipped with the reason.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--model", default="emcad_b0", type=model_name, help="a model name from `emcad info`")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=9)
    p.add_argument("--in-channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--backends", nargs="+",
                   help="torch, auto and kernel backend names (default: torch, every kernel backend that can run "
                        "here, auto)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile rows (torch+compile, auto+compile); off by default: compiling "
                        "takes minutes on CPU")
    p.add_argument("--forward-only", action="store_true", help="skip the training-step measurements")
    p.add_argument("--loss-impl", choices=("auto", "fused", "plain"), default="auto",
                   help="training-step loss of the kernel-backend rows, as in `emcad train` (the torch rows always "
                        "use the plain loss: the PyTorch baseline)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("-o", "--output", help="also write the table as CSV")
    p.set_defaults(func=_with_threads(_cmd_bench))


def _with_threads(fn):
    """Apply ``--threads`` for the duration of a command."""
    def run(args: argparse.Namespace) -> int:
        threads = getattr(args, "threads", None)
        if not threads:
            return fn(args)
        import torch
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn(args)
        finally:
            torch.set_num_threads(before)
    run.__name__ = fn.__name__
    return run


def add_commands(sub) -> None:
    """Register train, evaluate, predict, export and bench on an argparse subparsers object."""
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_bench(sub)
