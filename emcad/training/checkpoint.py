"""Atomic training checkpoints with everything an exact resume needs.

A training checkpoint (``checkpoints/last.pt``) is a ``torch.save`` dict of tensors and plain Python values only,
so it loads with ``torch.load(weights_only=True)``: the model and optimizer state, the LR scheduler, the step, the
sampler position, the RNG states of every process (torch CPU and CUDA, numpy, Python ``random``), the metric
history and the best validation score. Files are written to a temporary name in the same directory and moved into
place with ``os.replace``, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["FORMAT", "CheckpointReadError", "atomic_save", "atomic_write_dir", "capture_rng_state",
           "load_training_checkpoint", "restore_rng_state"]

FORMAT = "emcad-train-v1"


class CheckpointReadError(ValueError):
    """A training checkpoint cannot be used; the message names the file."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_dir(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Fill a fresh temporary directory with ``write(tmpdir)`` and swap it in place of ``path``."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    old = None
    try:
        write(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.exists(old) and not os.path.exists(path):
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def capture_rng_state() -> dict[str, Any]:
    """All RNG states of this process, as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by the trainer; raises FileNotFoundError / CheckpointReadError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointReadError(f"'{path}' cannot be read as a training checkpoint (truncated or corrupt?): "
                                  f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                  ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointReadError(f"'{path}' is not an emcad training checkpoint (format {FORMAT!r}); for model "
                                  f"weights use a save_pretrained directory or an original .pth checkpoint")
    return ckpt
