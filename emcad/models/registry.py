"""Model registry (``create_model``, ``list_models``) and ``save_pretrained`` / ``from_pretrained``.

A saved model is a directory with ``config.json`` (the ``create_model`` arguments that rebuild it, and the
weights' sha256) and ``model.safetensors`` (the full state dict with the original key names; its metadata holds
the same sha256). The folder is written under a temporary name and swapped in whole, so a reader never sees a
half-written folder or a config of one save beside the weights of another; :func:`from_pretrained` verifies the
sha256 (folders saved before it was recorded load without the check).
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import shutil
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from emcad.io_safety import atomic_write_dir, folder_to_read, tensors_sha256

from .egeunet import EGEUNet
from .emcadnet import EMCADNet
from .malunet import MALUNet

__all__ = ["MODELS", "CONFIG_NAME", "WEIGHTS_NAME", "create_model", "list_models", "save_pretrained",
           "from_pretrained", "model_name_for_encoder"]

# model name -> encoder name
MODELS: dict[str, str] = {
    **{f"emcad_b{i}": f"pvt_v2_b{i}" for i in range(6)},
    **{f"emcad_resnet{d}": f"resnet{d}" for d in (18, 34, 50, 101, 152)},
}
# create_model overrides (EMCADNet arguments other than the explicit create_model ones)
OVERRIDES = ("kernel_sizes", "expansion_factor", "dw_parallel", "add", "lgag_ks", "activation")
# encoder-free lightweight skin-lesion U-Nets (docs/models.md#ege-unet-and-malunet): name -> (class, create_model
# overrides)
LIGHTWEIGHT_MODELS: dict[str, tuple[type, tuple[str, ...]]] = {
    "egeunet": (EGEUNet, ("c_list", "bridge", "gt_ds", "output")),
    "malunet": (MALUNet, ("c_list", "split_att", "bridge", "output")),
}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: config.json records the weights' sha256
READABLE_VERSIONS = (1, 2)


def list_models(include_lightweight: bool = True) -> list[str]:
    """Names of every model accepted by :func:`create_model`: the EMCADNet variants, then the encoder-free
    ``egeunet`` and ``malunet`` (left out with ``include_lightweight=False``)."""
    return list(MODELS) + (list(LIGHTWEIGHT_MODELS) if include_lightweight else [])


def _create_lightweight(name: str, num_classes: int, in_channels: int, encoder_weights, backend: str,
                        overrides: dict[str, Any]) -> nn.Module:
    cls, allowed = LIGHTWEIGHT_MODELS[name]
    if encoder_weights is not None:
        raise ValueError(f"{name} has no pretrained encoder: encoder_weights must be None")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"create_model got unknown arguments {unknown} for {name}; its overrides are {list(allowed)}")
    model = cls(num_classes=num_classes, input_channels=in_channels, backend=backend, **overrides)
    model.model_name = name
    return model


def model_name_for_encoder(encoder: str) -> str:
    for name, enc in MODELS.items():
        if enc == encoder:
            return name
    raise ValueError(f"no EMCAD model uses encoder {encoder!r}; known encoders: {sorted(set(MODELS.values()))}")


def create_model(name: str, num_classes: int = 1, in_channels: int = 3, encoder_weights: Optional[str] = None,
                 backend: str = "auto", **overrides: Any) -> EMCADNet:
    """Build an EMCAD network by name.

    Args:
        name: one of :func:`list_models`: ``emcad_b0`` … ``emcad_b5`` (PVTv2-b0 … b5 encoders),
            ``emcad_resnet18`` / ``34`` / ``50`` / ``101`` / ``152``.
        num_classes: classes of the prediction heads.
        in_channels: 1 or 3 (see :class:`EMCADNet`; the forward accepts both).
        encoder_weights: optional local file of pretrained encoder weights (nothing is downloaded).
        backend: ``"torch"``, ``"auto"`` or an ``emcad_kernels`` backend name.
        **overrides: decoder settings ``kernel_sizes``, ``expansion_factor``, ``dw_parallel``, ``add``,
            ``lgag_ks``, ``activation`` (defaults: the paper configuration).

    ``egeunet`` and ``malunet`` (:class:`~emcad.models.egeunet.EGEUNet`, :class:`~emcad.models.malunet.MALUNet`,
    default configurations) are built too: ``in_channels`` is their ``input_channels``, ``encoder_weights`` must
    be None, and their overrides are ``c_list``, ``bridge``, ``output`` (``"probs"``/``"logits"``) plus ``gt_ds``
    (EGE-UNet) or ``split_att`` (MALUNet).
    """
    if name in LIGHTWEIGHT_MODELS:
        return _create_lightweight(name, num_classes, in_channels, encoder_weights, backend, overrides)
    if name not in MODELS:
        names = [*MODELS, *LIGHTWEIGHT_MODELS]
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(names)}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"create_model got unknown arguments {unknown}; decoder overrides are {list(OVERRIDES)}")
    model = EMCADNet(num_classes=num_classes, in_channels=in_channels, encoder=MODELS[name],
                     encoder_weights=encoder_weights, backend=backend, **overrides)
    model.model_name = name
    return model


def _config_of(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, (EGEUNet, MALUNet)):
        return {"name": model.model_name, **model.config, "format_version": FORMAT_VERSION}
    if not isinstance(model, EMCADNet):
        raise TypeError(f"save_pretrained expects an EMCADNet, EGEUNet or MALUNet, got {type(model).__name__}")
    config = dict(model.config)
    encoder = config.pop("encoder")
    name = getattr(model, "model_name", None) or model_name_for_encoder(encoder)
    return {"name": name, **config, "format_version": FORMAT_VERSION}


def _tensors_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as CPU tensors that safetensors accepts: contiguous, no shared storage."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in model.state_dict().items():
        if value.device.type == "meta":
            raise ValueError(f"cannot save {key!r}: it is on the meta device (the model has no real weights)")
        t = value.detach().to("cpu")
        storage = t.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        shared = ident in seen or storage.nbytes() != t.numel() * t.element_size()
        seen.add(ident)
        if shared or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        tensors[key] = t
    return tensors


def _check_replaceable(target: str, keep: set[str]) -> list[str]:
    """The entries of an existing ``target`` to carry over into the new folder (files that save_pretrained
    does not write). Refuses targets that cannot be swapped safely as a whole."""
    if not os.path.lexists(target):
        return []
    if not os.path.isdir(target):
        raise ValueError(f"save_pretrained: '{target}' exists and is not a folder")
    cwd = os.path.realpath(os.getcwd())
    if cwd == target or cwd.startswith(target + os.sep):
        raise ValueError(f"save_pretrained: '{target}' is (or holds) the current directory; the folder is replaced "
                         f"as a whole, so save into a new or model-only folder")
    others = sorted(e for e in os.listdir(target) if e not in keep)
    folders = [e for e in others if os.path.isdir(os.path.join(target, e)) and
               not os.path.islink(os.path.join(target, e))]
    if folders:
        raise ValueError(f"save_pretrained: '{target}' holds folders ({', '.join(folders[:5])}) besides a saved "
                         f"model; the folder is replaced as a whole, so save into a new or model-only folder")
    return others


def _carry_over(source: str, destination: str, names: list[str]) -> None:
    for name in names:
        src, dst = os.path.join(source, name), os.path.join(destination, name)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                    extra_files: Optional[Mapping[str, bytes]] = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` (an :class:`EMCADNet`, ``EGEUNet`` or
    ``MALUNet``) into ``directory``, plus ``extra_files`` (name -> bytes).

    The folder is replaced as a whole and atomically (:func:`emcad.io_safety.atomic_write_dir`): a reader, a
    crash, a signal or a full disk leaves the previous complete version or the new one, never a mix. Other files
    already in the folder are kept; a folder that holds sub-folders (or the current directory) is refused. The
    weights' sha256 is recorded in config.json and in the safetensors metadata; :func:`from_pretrained` checks it."""
    from safetensors.torch import save

    config = _config_of(model)  # TypeError for other models, before anything is written
    tensors = _tensors_for_safetensors(model)
    digest = tensors_sha256(tensors)
    metadata = {"format": "pt", "emcad_config": json.dumps(config, sort_keys=True), "emcad_sha256": digest}
    files = {WEIGHTS_NAME: save(tensors, metadata=metadata),
             CONFIG_NAME: (json.dumps({**config, "weights_sha256": digest}, indent=2, sort_keys=True) + "\n").encode(),
             **dict(extra_files or {})}
    target = os.path.realpath(os.fspath(directory))
    keep = _check_replaceable(target, set(files))

    def write(tmp: str) -> None:
        for name, payload in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(payload)
        _carry_over(target, tmp, keep)

    atomic_write_dir(target, write, what="model")


def from_pretrained(directory: str | os.PathLike, backend: str = "auto") -> EMCADNet:
    """Rebuild a model saved by :func:`save_pretrained` and load its weights strictly. Returns it in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = folder_to_read(directory)  # the previous version if a save was cut off mid-swap
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"from_pretrained: '{path}' not found (expected a directory written by "
                                    f"save_pretrained with {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"from_pretrained: cannot read '{config_path}': {e}") from e
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"from_pretrained: '{config_path}' has no model 'name'")
    config = dict(config)
    version = config.pop("format_version", FORMAT_VERSION)
    if version not in READABLE_VERSIONS:
        raise ValueError(f"from_pretrained: '{config_path}' has format_version {version}, this version reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    config_digest = config.pop("weights_sha256", None)
    name = config.pop("name")
    with torch.device("meta"):
        model = create_model(name, backend=backend, **config)
    try:
        state_dict = load_file(weights_path, device="cpu")
        with safe_open(weights_path, "pt") as f:
            weights_digest = (f.metadata() or {}).get("emcad_sha256")
    except Exception as e:  # SafetensorError for truncated / corrupt files
        raise ValueError(f"from_pretrained: cannot read '{weights_path}' (truncated or corrupt?): {e}") from e
    if config_digest is not None or weights_digest is not None:
        digest = tensors_sha256(state_dict)
        if weights_digest is not None and digest != weights_digest:
            raise ValueError(f"from_pretrained: '{weights_path}' is corrupt: its tensors do not match the sha256 "
                             f"recorded when it was saved (a damaged file or copy)")
        if config_digest is not None and digest != config_digest:
            raise ValueError(f"from_pretrained: '{config_path}' does not belong to '{weights_path}': it records "
                             f"other weights (the two files come from different saves, or the weights are damaged)")
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"from_pretrained: '{weights_path}' does not fit {name}: {e}") from e
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        # a tensor outside the state dict (non-persistent buffer) has no value yet: build for real
        model = create_model(name, backend=backend, **config)
        model.load_state_dict(state_dict, strict=True)
    return model.eval()
