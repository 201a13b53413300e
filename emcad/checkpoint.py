"""Loading checkpoints written by the original SLDGroup/EMCAD training code
(docs/models.md#importing-original-checkpoints).

Original checkpoints (``best.pth``, ``last.pth``, ``epoch_N.pth``) are plain ``state_dict()``s of the full
``EMCADNet``. :func:`load_original_checkpoint` reads one safely (``torch.load(weights_only=True)``), unwraps the
usual ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers, strips the ``nn.DataParallel`` ``module.`` prefix,
renames the heads of checkpoints from before 2024-06-24 (detected by shape), infers the encoder and the number of
classes when no model is given, and loads strictly. Anything else raises :class:`CheckpointError` with a message
that names the file and what is wrong.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from emcad.models.emcadnet import EMCADNet

__all__ = ["ACTIVATION_NOTE", "CheckpointError", "ConversionReport", "LoadedCheckpoint", "infer_encoder",
           "load_original_checkpoint", "torch_load_failure"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
_PREFIX = "module."
_MAX_LISTED = 10

ACTIVATION_NOTE = (
    "EUCB and LGAG use ReLU, the definition since SLDGroup/EMCAD 8f18a7d (2024-09-12). A checkpoint trained "
    "before that with ReLU6 in MSCB had ReLU6 in EUCB and LGAG as well, so its outputs differ slightly under the "
    "current definition (parameters are unaffected).")

# encoder structure -> name (docs/models.md#encoders)
_PVT_VARIANTS = {
    ((32, 64, 160, 256), (2, 2, 2, 2), 8): "pvt_v2_b0",
    ((64, 128, 320, 512), (2, 2, 2, 2), 8): "pvt_v2_b1",
    ((64, 128, 320, 512), (3, 4, 6, 3), 8): "pvt_v2_b2",
    ((64, 128, 320, 512), (3, 4, 18, 3), 8): "pvt_v2_b3",
    ((64, 128, 320, 512), (3, 8, 27, 3), 8): "pvt_v2_b4",
    ((64, 128, 320, 512), (3, 6, 40, 3), 4): "pvt_v2_b5",
}
_RESNET_VARIANTS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model; the message names the file and the problem."""


@dataclass
class ConversionReport:
    """What :func:`load_original_checkpoint` did to the checkpoint."""

    path: str
    encoder: str
    num_classes: int
    unwrapped: list[str] = field(default_factory=list)  # wrapper keys descended into, outermost first
    stripped_prefix: Optional[str] = None  # "module." when a DataParallel prefix was removed
    renamed_heads: bool = False  # out_head{i} -> out_head{5-i} (pre-2024-06-24 naming)
    model_built: bool = False  # the model was built from the checkpoint (no model given)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"checkpoint '{self.path}': encoder {self.encoder}, {self.num_classes} classes"]
        if self.unwrapped:
            lines.append("  unwrapped: " + " -> ".join(repr(k) for k in self.unwrapped))
        if self.stripped_prefix:
            lines.append(f"  stripped key prefix {self.stripped_prefix!r}")
        if self.renamed_heads:
            lines.append("  renamed heads out_head{i} -> out_head{5-i} (naming before 2024-06-24)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class LoadedCheckpoint(NamedTuple):
    model: EMCADNet
    report: ConversionReport


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read(path: str) -> object:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: '{path}'")
    if os.path.isdir(path):
        raise CheckpointError(f"'{path}' is a directory, not a checkpoint file (for a save_pretrained directory "
                              f"use emcad.from_pretrained)")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"'{path}' is empty: not a checkpoint")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        from emcad.io_safety import tensors_sha256
        try:
            tensors = load_file(path, device="cpu")
            with safe_open(path, "pt") as f:
                digest = (f.metadata() or {}).get("emcad_sha256")
        except Exception as e:
            raise CheckpointError(f"'{path}' cannot be read as safetensors (truncated or corrupt file?): "
                                  f"{_first_line(e)}") from e
        if digest is not None and tensors_sha256(tensors) != digest:  # written by save_pretrained
            raise CheckpointError(f"'{path}' is corrupt: its tensors do not match the sha256 recorded when it was "
                                  f"saved (a damaged file or copy)")
        return tensors
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, KeyError... depending on the damage
        raise CheckpointError(torch_load_failure(path, head, e)) from e


_PICKLED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+) (?:was not an allowed|whose module)")


def torch_load_failure(path: str, head: bytes, e: BaseException) -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` failed: a pickle that names code (a class or
    function outside the tensor allow-list: refused for safety), a damaged zip archive or pickle, or bytes that
    are no checkpoint at all. The weights-only unpickler reports random bytes with the same "Weights only load
    failed ... arbitrary code execution" text as real pickled code; only a GLOBAL with a dotted name is the latter."""
    text = str(e)
    detail = f"{type(e).__name__}: {_first_line(e)}"
    if "Weights only load failed" in text:
        found = _PICKLED_GLOBAL.search(text)
        if found:
            return (f"'{path}' contains pickled objects other than tensors and plain containers ({found.group(1)}); "
                    f"loading it would run arbitrary code, which is refused (weights_only=True). Re-save it as a "
                    f"plain state_dict.")
        reason = [line.strip() for line in text.splitlines() if "Unsupported operand" in line or "error:" in line]
        detail = f"{type(e).__name__}: {reason[-1] if reason else 'unreadable pickle'}"
    if head.startswith(b"PK\x03\x04"):
        return (f"'{path}' is a truncated or corrupt PyTorch checkpoint: its zip archive cannot be read "
                f"({detail})")
    if head[:1] == b"\x80":
        return f"'{path}' is a truncated or corrupt PyTorch checkpoint (legacy format) ({detail})"
    return (f"'{path}' is not a PyTorch checkpoint: it is neither a torch.save zip archive nor a pickle (random or "
            f"unrelated bytes?) ({detail})")


def _unwrap(obj: object, path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    trail: list[str] = []
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not inner:
            break
        trail.append(inner[0])
        obj = obj[inner[0]]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{path}' does not contain a state dict (found a {type(obj).__name__})")
    if not obj:
        raise CheckpointError(f"'{path}' contains an empty state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"'{path}' is not a plain state dict: entries that are not tensors: {_listing(bad)}"
                              f" (known wrapper keys: {list(_WRAPPER_KEYS)})")
    return dict(obj), trail


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return f"[{shown}{f', ... ({len(keys) - _MAX_LISTED} more)' if len(keys) > _MAX_LISTED else ''}]"


# --------------------------------------------------------------------------------------------------
# architecture inference
# --------------------------------------------------------------------------------------------------
def _block_counts(keys: list[str], pattern: str) -> tuple[int, ...]:
    counts = []
    for stage in range(1, 5):
        regex = re.compile(pattern.format(stage=stage))
        indices = {int(m.group(1)) for k in keys if (m := regex.match(k))}
        counts.append(max(indices) + 1 if indices else 0)
    return tuple(counts)


def infer_encoder(state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> str:
    """The encoder name whose structure the ``prefix``-ed keys describe; raises CheckpointError if none."""
    bb = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    keys = list(bb)
    if not bb:
        raise CheckpointError(f"no '{prefix}*' keys: cannot tell which encoder the checkpoint has")
    if "patch_embed1.proj.weight" in bb:
        try:
            dims = tuple(int(bb[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5))
            mlp_ratio = int(bb["block1.0.mlp.fc1.weight"].shape[0]) // dims[0]
        except KeyError as e:
            raise CheckpointError(f"PVTv2-like encoder keys are incomplete (missing '{prefix}{e.args[0]}')") from None
        depths = _block_counts(keys, r"^block{stage}\.(\d+)\.")
        name = _PVT_VARIANTS.get((dims, depths, mlp_ratio))
        if name is None:
            raise CheckpointError(f"unknown architecture: PVTv2-like encoder with dims {list(dims)}, depths "
                                  f"{list(depths)}, mlp ratio {mlp_ratio} matches none of pvt_v2_b0..b5")
        return name
    if "conv1.weight" in bb and "layer1.0.conv1.weight" in bb:
        bottleneck = "layer1.0.conv3.weight" in bb
        layers = _block_counts(keys, r"^layer{stage}\.(\d+)\.")
        name = _RESNET_VARIANTS.get((bottleneck, layers))
        if name is None:
            kind = "bottleneck" if bottleneck else "basic"
            raise CheckpointError(f"unknown architecture: ResNet-like encoder with {kind} blocks {list(layers)} "
                                  f"matches none of resnet18/34/50/101/152")
        return name
    raise CheckpointError(f"unknown architecture: the encoder keys (e.g. {_listing(keys[:3])}) are neither PVTv2 "
                          f"(official names) nor torchvision ResNet")


def _decoder_settings(sd: Mapping[str, torch.Tensor]) -> dict:
    """Decoder settings that the checkpoint's shapes reveal (expansion factor, kernel sizes, add, lgag_ks)."""
    settings: dict = {}
    p1 = sd.get("decoder.mscb4.0.pconv1.0.weight")
    if p1 is None or p1.dim() != 4:
        return settings
    ex, c0 = int(p1.shape[0]), int(p1.shape[1])
    settings["expansion_factor"] = ex // c0 if ex % c0 == 0 else ex / c0
    kernel_sizes = []
    while (w := sd.get(f"decoder.mscb4.0.msdc.dwconvs.{len(kernel_sizes)}.0.weight")) is not None:
        kernel_sizes.append(int(w.shape[-1]))
    if kernel_sizes:
        settings["kernel_sizes"] = kernel_sizes
        p2 = sd.get("decoder.mscb4.0.pconv2.0.weight")
        if p2 is not None and len(kernel_sizes) > 1 and int(p2.shape[1]) == ex * len(kernel_sizes):
            settings["add"] = False
    wg = sd.get("decoder.lgag3.W_g.0.weight")
    if wg is not None and wg.dim() == 4:
        settings["lgag_ks"] = int(wg.shape[-1])
    return settings


def _fix_head_names(sd: dict[str, torch.Tensor], channels: list[int]) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename ``out_head{i}`` -> ``out_head{5-i}`` when the heads use the pre-2024-06-24 naming, detected by the
    input width of ``out_head1`` (C0 in old checkpoints, C3 now)."""
    c0, c3 = channels[0], channels[-1]
    heads = [sd.get(f"out_head{i}.weight") for i in range(1, 5)]
    if c0 == c3 or any(h is None or h.dim() != 4 for h in heads):
        return sd, False
    old_widths = [int(h.shape[1]) for h in heads]
    if old_widths != list(channels):  # current naming has [C3, C2, C1, C0]
        return sd, False
    renamed = {}
    for key, value in sd.items():
        m = re.match(r"^out_head([1-4])\.(.*)$", key)
        renamed[f"out_head{5 - int(m.group(1))}.{m.group(2)}" if m else key] = value
    return renamed, True


def _compare(path: str, sd: Mapping[str, torch.Tensor], model: EMCADNet, hint: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(expected[k].shape)}"
                  for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches {_listing(mismatched)}")
    raise CheckpointError(f"'{path}' does not fit EMCADNet(encoder={model.encoder_name!r}, "
                          f"num_classes={model.num_classes}): " + "; ".join(parts) + hint)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def load_original_checkpoint(path: str | os.PathLike, model: Optional[EMCADNet] = None, *,
                             num_classes: Optional[int] = None, encoder: Optional[str] = None) -> LoadedCheckpoint:
    """Load an SLDGroup/EMCAD ``.pth`` checkpoint (a full ``EMCADNet`` state dict) strictly.

    Args:
        path: the checkpoint file (``.pth``/``.pt``; ``.safetensors`` is read too).
        model: the :class:`EMCADNet` to load into (it keeps its train/eval mode). If None, one is built from the
            checkpoint: encoder (``encoder`` or inferred from the ``backbone.*`` keys), ``num_classes`` (or inferred
            from the heads), expansion factor, kernel sizes, ``add`` and LGAG kernel from the decoder shapes. The
            MSCB activation and the MSDC mode are not stored in checkpoints: ReLU6 and parallel (the paper) are
            assumed. A model built here is returned in eval mode.
        num_classes, encoder: expected values, checked against the checkpoint (and the model, if given).

    Returns:
        ``LoadedCheckpoint(model, report)``; ``report`` (:class:`ConversionReport`) says whether a wrapper was
        unwrapped, the ``module.`` prefix stripped, old head names converted, and carries the activation note of
        docs/models.md#importing-original-checkpoints.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a checkpoint, truncated/corrupt, refused pickled code, not an EMCADNet state dict,
            unknown encoder structure, class-count mismatch, missing / unexpected keys or shape mismatches.
    """
    path = os.fspath(path)
    sd, trail = _unwrap(_read(path), path)
    report_prefix = None
    if any(k.startswith(_PREFIX) for k in sd):
        report_prefix = _PREFIX
        sd = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in sd.items()}

    if not any(k.startswith("decoder.") for k in sd):
        try:
            from emcad.encoders import detect_key_format
            fmt = detect_key_format(sd)
        except Exception:  # pragma: no cover - detection is only a hint
            fmt = None
        what = f"a bare encoder checkpoint ({fmt} keys); load it with create_model(..., encoder_weights=path)" \
            if fmt else f"keys like {_listing(list(sd)[:5])}"
        raise CheckpointError(f"'{path}' is not an EMCADNet checkpoint (unknown architecture): it has no "
                              f"'decoder.*' keys, {what}")

    try:
        inferred = infer_encoder(sd)
    except CheckpointError as e:
        if model is None and encoder is None:
            raise CheckpointError(f"'{path}': {e}") from None
        inferred = None
    if encoder is not None and inferred is not None and encoder != inferred:
        raise CheckpointError(f"'{path}' has a {inferred} encoder, but encoder={encoder!r} was requested")
    if model is not None and not isinstance(model, EMCADNet):
        raise TypeError(f"model must be an EMCADNet, got {type(model).__name__}")
    if model is not None and encoder is not None and model.encoder_name != encoder:
        raise CheckpointError(f"encoder={encoder!r} but the given model has {model.encoder_name!r}")

    head_classes = {int(v.shape[0]) for k, v in sd.items() if re.match(r"^out_head[1-4]\.(weight|bias)$", k)}
    if len(head_classes) > 1:
        raise CheckpointError(f"'{path}': the heads disagree on the number of classes: {sorted(head_classes)}")
    ckpt_classes = head_classes.pop() if head_classes else None
    for what, value in (("num_classes", num_classes), ("the given model", model.num_classes if model else None)):
        if value is not None and ckpt_classes is not None and value != ckpt_classes:
            raise CheckpointError(f"'{path}' has {ckpt_classes} output classes (heads), but {what} has {value}")

    report = ConversionReport(path=path, encoder="", num_classes=0, unwrapped=trail, stripped_prefix=report_prefix)
    if model is None:
        if ckpt_classes is None and num_classes is None:
            raise CheckpointError(f"'{path}' has no out_head*.weight keys: cannot infer num_classes")
        enc = encoder or inferred
        settings = _decoder_settings(sd)
        with torch.device("meta"):
            model = EMCADNet(num_classes=ckpt_classes or num_classes, encoder=enc, **settings)
        report.model_built = True
        report.notes.append("the MSCB activation and MSDC mode are not stored in checkpoints: assumed ReLU6 and "
                            "parallel branches (the paper configuration)")

    sd, renamed = _fix_head_names(sd, model.channels)
    report.renamed_heads = renamed
    report.encoder, report.num_classes = model.encoder_name, model.num_classes
    hint = ""
    if inferred is not None and inferred != model.encoder_name:
        hint = f" (the checkpoint's encoder looks like {inferred}, the model has {model.encoder_name})"
    _compare(path, sd, model, hint)

    if report.model_built:
        dtype = torch.get_default_dtype()
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:  # tensors outside the state dict: build for real and copy instead
            model = EMCADNet(**model.config)
            model.load_state_dict(sd, strict=True)
        model.eval()
    else:
        model.load_state_dict(sd, strict=True)

    if renamed:
        report.notes.append("head names predate SLDGroup/EMCAD b27fea6 (2024-06-24), so the checkpoint also "
                            "predates the activation change of 2024-09-12: see the next note")
    report.notes.append(ACTIVATION_NOTE)
    return LoadedCheckpoint(model, report)
