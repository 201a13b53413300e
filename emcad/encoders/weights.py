"""Loading encoder weights from local checkpoint files, with key-format conversion.

Supported key formats (detected from the key names, never from the file name):

``pvt_v2_official``
    whai362/PVT names (``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``,
    ``norm1.weight`` ...), the names of :class:`PyramidVisionTransformerV2`.
``pvt_v2_timm``
    timm ``pvt_v2_b*`` names (``patch_embed.proj.weight``,
    ``stages.1.downsample.proj.weight``, ``stages.0.blocks.0.mlp.dwconv.weight``,
    ``stages.0.norm.weight`` ...); ``stages_0`` (timm ``features_only``) is accepted too.
``resnet_torchvision``
    torchvision ResNet names (``conv1.weight``, ``layer1.0.conv1.weight``, ``fc.weight``),
    the names of :class:`ResNet`; timm ResNets use the same names.

The timm <-> official mapping is the inverse of the renames in
``timm/models/pvt_v2.py::_checkpoint_filter_fn`` (huggingface/pytorch-image-models,
Apache-2.0); it is implemented here independently.

Nothing is ever downloaded: weights come from an explicit local path.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn

from .pvtv2 import PyramidVisionTransformerV2
from .resnet import ResNet

__all__ = [
    "EncoderWeightsError",
    "PVT_OFFICIAL",
    "PVT_TIMM",
    "RESNET_TORCHVISION",
    "read_state_dict",
    "detect_key_format",
    "convert_timm_pvt_to_official",
    "convert_official_pvt_to_timm",
    "load_encoder_weights",
]

logger = logging.getLogger(__name__)

PVT_OFFICIAL = "pvt_v2_official"
PVT_TIMM = "pvt_v2_timm"
RESNET_TORCHVISION = "resnet_torchvision"

# Wrapper keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_DATA_PARALLEL_PREFIX = "module."
# ImageNet classifier of the PVTv2 classification checkpoints (official and timm).
_PVT_CLASSIFIER_KEYS = ("head.weight", "head.bias")
_RESNET_CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
# How many keys an error message lists per category before summarising the rest.
_MAX_LISTED_KEYS = 10

# One pattern per format; a format is detected when it explains most keys.
_FORMAT_PATTERNS = {
    PVT_OFFICIAL: re.compile(r"^(patch_embed[1-4]\.|block[1-4]\.\d+\.|norm[1-4]\.)"),
    PVT_TIMM: re.compile(r"^(patch_embed\.|stages[._]\d+\.(downsample|blocks|norm)\.)"),
    RESNET_TORCHVISION: re.compile(r"^(conv1\.|bn1\.|layer[1-4]\.\d+\.|fc\.)"),
}
_FORMAT_FAMILY = {PVT_OFFICIAL: "PVTv2", PVT_TIMM: "PVTv2", RESNET_TORCHVISION: "ResNet"}


class EncoderWeightsError(ValueError):
    """A weights file cannot be read, or its contents do not fit the encoder."""


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local checkpoint into a flat ``{name: tensor}`` dict.

    ``.safetensors`` files are read with safetensors; anything else (``.pth``,
    ``.pt``, ``.bin``, ``.ckpt`` ...) with ``torch.load(weights_only=True)``,
    which refuses pickled code. A ``state_dict`` / ``model`` /
    ``model_state_dict`` wrapper is unwrapped and a DataParallel ``module.``
    prefix is stripped. Raises :class:`FileNotFoundError` for a missing file
    and :class:`EncoderWeightsError` for an unreadable or non-tensor file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder weights file not found: '{path}'")

    if path.endswith(".safetensors"):
        loaded = _read_safetensors(path)
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
            raise EncoderWeightsError(
                f"cannot read encoder weights file '{path}': not a valid PyTorch checkpoint "
                f"(truncated or corrupt file, or one that needs arbitrary-code unpickling, "
                f"which is refused). {type(exc).__name__}: {_first_line(exc)}"
            ) from exc

    state_dict = _unwrap(loaded, path)
    return _strip_prefix(state_dict, _DATA_PARALLEL_PREFIX)


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - safetensors is a core dependency
        raise ImportError(f"reading '{path}' needs the 'safetensors' package") from exc
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # SafetensorError for truncated / malformed headers
        raise EncoderWeightsError(
            f"cannot read encoder weights file '{path}': not a valid safetensors file "
            f"(truncated or corrupt?). {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _unwrap(loaded: object, path: str) -> dict[str, torch.Tensor]:
    while isinstance(loaded, Mapping):
        wrapped = [key for key in _WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)]
        if not wrapped:
            break
        loaded = loaded[wrapped[0]]
    if not isinstance(loaded, Mapping) or not loaded:
        raise EncoderWeightsError(
            f"encoder weights file '{path}' does not contain a state dict "
            f"(found {type(loaded).__name__}{' (empty)' if isinstance(loaded, Mapping) else ''})"
        )
    not_tensors = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise EncoderWeightsError(
            f"encoder weights file '{path}' is not a plain state dict: entries without tensors: "
            f"{_format_keys(not_tensors)}"
        )
    return dict(loaded)


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


# --------------------------------------------------------------------------- formats


def detect_key_format(state_dict: Mapping[str, object]) -> str | None:
    """Return the key format that explains most keys, or ``None`` if none explains any."""
    scores = {
        name: sum(1 for key in state_dict if pattern.match(key)) for name, pattern in _FORMAT_PATTERNS.items()
    }
    # The patterns are disjoint: a mixed file goes to its majority format and
    # the rest is reported as unexpected keys.
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


_TIMM_TO_OFFICIAL = [
    (re.compile(r"^patch_embed\."), lambda m: "patch_embed1."),
    (re.compile(r"^stages[._](\d+)\.downsample\."), lambda m: f"patch_embed{int(m[1]) + 1}."),
    (re.compile(r"^stages[._](\d+)\.blocks\.(\d+)\."), lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (re.compile(r"^stages[._](\d+)\.norm\."), lambda m: f"norm{int(m[1]) + 1}."),
]
_OFFICIAL_TO_TIMM = [
    (re.compile(r"^patch_embed1\."), lambda m: "patch_embed."),
    (re.compile(r"^patch_embed([2-9])\."), lambda m: f"stages.{int(m[1]) - 1}.downsample."),
    (re.compile(r"^block(\d+)\.(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (re.compile(r"^norm(\d+)\."), lambda m: f"stages.{int(m[1]) - 1}.norm."),
]


def _rename_prefix(key: str, rules) -> str:
    for pattern, replacement in rules:
        match = pattern.match(key)
        if match:
            return replacement(match) + key[match.end() :]
    return key


def convert_timm_pvt_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm ``pvt_v2_b*`` keys to the official whai362 names.

    Keys that are not PVT stage keys (``head.*``) pass through unchanged.
    """
    converted = {}
    for key, value in state_dict.items():
        new_key = _rename_prefix(key, _TIMM_TO_OFFICIAL)
        if new_key != key:
            # timm flattened the official DWConv wrapper (`mlp.dwconv.dwconv` -> `mlp.dwconv`).
            new_key = re.sub(r"\.mlp\.dwconv\.(weight|bias)$", r".mlp.dwconv.dwconv.\1", new_key)
        converted[new_key] = value
    return converted


def convert_official_pvt_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official whai362 PVTv2 keys to timm ``pvt_v2_b*`` names (inverse of the above)."""
    converted = {}
    for key, value in state_dict.items():
        new_key = _rename_prefix(key, _OFFICIAL_TO_TIMM)
        if new_key != key:
            new_key = new_key.replace(".mlp.dwconv.dwconv.", ".mlp.dwconv.")
        converted[new_key] = value
    return converted


def _encoder_family(encoder: nn.Module) -> str | None:
    if isinstance(encoder, PyramidVisionTransformerV2):
        return "PVTv2"
    if isinstance(encoder, ResNet):
        return "ResNet"
    return None


# --------------------------------------------------------------------------- loading


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load a local checkpoint into ``encoder`` (in place), converting key formats.

    The file may hold official whai362 PVTv2, timm PVTv2 or torchvision ResNet
    keys (see the module docstring), optionally wrapped in ``state_dict`` /
    ``model`` and prefixed ``module.``. Conversion rules:

    * PVTv2: the ImageNet classifier ``head.weight`` / ``head.bias`` is dropped.
    * ResNet: ``fc.*`` is loaded when present. A file without any ``fc.*`` key
      (e.g. saved from a feature extractor) still loads under ``strict=True``:
      ``fc`` is never used by ``forward``, so the encoder keeps its current
      ``fc`` and a note is logged at INFO level.
    * BatchNorm ``num_batches_tracked`` buffers may be absent (old torchvision
      files); the encoder keeps its own.
    * Any other module is loaded under its own key names, without conversion.

    With ``strict=True`` (default) every remaining encoder key must be present
    with the right shape and no key may be left over; otherwise an
    :class:`EncoderWeightsError` (a ``ValueError``) names the file, the detected
    format, the missing and unexpected keys and the shape mismatches, and the
    encoder is left unchanged. With ``strict=False`` the matching tensors are
    loaded and the same report is issued as a ``UserWarning``; a file of which
    no tensor fits still raises, so a wrong file can never load silently.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        EncoderWeightsError: unreadable file, unknown key format, a format for
            another encoder family, or (strict) any key / shape mismatch.
    """
    path = os.fspath(path)
    state_dict = read_state_dict(path)
    key_format = detect_key_format(state_dict)
    family = _encoder_family(encoder)
    encoder_name = type(encoder).__name__

    if key_format is None and family is not None:
        hint = ""
        if any(key.startswith("backbone.") for key in state_dict):
            hint = (
                " (keys start with 'backbone.': this looks like a full-network checkpoint, "
                "not encoder weights)"
            )
        raise EncoderWeightsError(
            f"cannot load '{path}' into {encoder_name}: unrecognised key format "
            f"(expected {', '.join(_FORMAT_PATTERNS)}){hint}; first keys: {_format_keys(list(state_dict))}"
        )
    if key_format is not None and family is not None and _FORMAT_FAMILY[key_format] != family:
        raise EncoderWeightsError(
            f"cannot load '{path}' into {encoder_name}: the file holds {_FORMAT_FAMILY[key_format]} "
            f"weights (detected key format: {key_format}), the encoder is a {family}"
        )

    if key_format == PVT_TIMM:
        state_dict = convert_timm_pvt_to_official(state_dict)
    if family == "PVTv2":
        for key in _PVT_CLASSIFIER_KEYS:
            state_dict.pop(key, None)

    expected = encoder.state_dict()
    # Entries the file may omit; the encoder then keeps its current values.
    optional = {key for key in expected if key.endswith(".num_batches_tracked")}
    if family == "ResNet" and not any(key in state_dict for key in _RESNET_CLASSIFIER_KEYS):
        optional.update(_RESNET_CLASSIFIER_KEYS)
        logger.info("'%s' has no fc.* keys; %s keeps its current (unused) fc", path, encoder_name)

    missing = [key for key in expected if key not in state_dict and key not in optional]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: file {list(state_dict[key].shape)} vs encoder {list(expected[key].shape)}"
        for key in state_dict
        if key in expected and state_dict[key].shape != expected[key].shape
    ]
    loadable = {
        key: value
        for key, value in state_dict.items()
        if key in expected and value.shape == expected[key].shape
    }

    if missing or unexpected or mismatched:
        report = _mismatch_report(path, encoder_name, key_format, missing, unexpected, mismatched)
        if strict or not loadable:
            raise EncoderWeightsError(report)
        warnings.warn(report + "\nloaded the matching tensors only (strict=False)", UserWarning, stacklevel=2)

    # Fill optional entries from the encoder itself so `load_state_dict` stays strict.
    for key in optional:
        loadable.setdefault(key, expected[key])
    encoder.load_state_dict(loadable, strict=strict)


def _mismatch_report(
    path: str,
    encoder_name: str,
    key_format: str | None,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    lines = [f"cannot load '{path}' into {encoder_name} (detected key format: {key_format}):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_format_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {_format_keys(mismatched)}")
        lines.append("  (shape mismatches usually mean weights of another variant, e.g. b2 weights for b0)")
    return "\n".join(lines)


def _format_keys(keys: list[str]) -> str:
    listed = ", ".join(keys[:_MAX_LISTED_KEYS])
    if len(keys) > _MAX_LISTED_KEYS:
        listed += f", ... (+{len(keys) - _MAX_LISTED_KEYS} more)"
    return listed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
