"""Atomic training checkpoints with everything an exact resume needs.

A training checkpoint (``checkpoints/last.pt``) is a ``torch.save`` dict of tensors and plain Python values only,
so it loads with ``torch.load(weights_only=True)``: the model and optimizer state, the LR scheduler, the step, the
sampler position, the RNG states of every process (torch CPU and CUDA, numpy, Python ``random``), the metric
history and the best validation score, and a sha256 of all of it that the loader verifies (flipped bits, a damaged
copy). Files are written to a temporary name in the same directory and moved into place with ``os.replace``, so a
crash, a signal or a full disk never leaves a half-written checkpoint or loses the previous one.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from emcad.io_safety import atomic_write, object_sha256

__all__ = ["FORMAT", "CheckpointReadError", "NotATrainingCheckpoint", "capture_rng_state", "load_training_checkpoint",
           "restore_rng_state", "save_training_checkpoint"]

FORMAT = "emcad-train-v1"
HASH_KEY = "sha256"


class CheckpointReadError(ValueError):
    """A training checkpoint cannot be used; the message names the file."""


class NotATrainingCheckpoint(CheckpointReadError):
    """The file is unreadable by ``torch.load`` or holds something other than a training checkpoint."""


def save_training_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` ``state`` with its sha256 (:func:`emcad.io_safety.object_sha256`, under the last key
    ``"sha256"``) atomically: the previous checkpoint stays in place until the new one is complete, also when the
    write fails (:class:`emcad.io_safety.WriteError`)."""
    state = {k: v for k, v in state.items() if k != HASH_KEY}
    state[HASH_KEY] = object_sha256(state)
    atomic_write(path, lambda f: torch.save(state, f), what="checkpoint")


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
    """Read a checkpoint written by the trainer and verify its sha256 (checkpoints written before the hash was
    recorded load without the check). Raises FileNotFoundError, :class:`NotATrainingCheckpoint` (unreadable, or
    some other file) or :class:`CheckpointReadError` (damaged), each naming the file."""
    from emcad.checkpoint import torch_load_failure

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training checkpoint '{path}' not found")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise NotATrainingCheckpoint(f"'{path}' is empty: not a training checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NotATrainingCheckpoint(torch_load_failure(path, head, e)) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise NotATrainingCheckpoint(f"'{path}' is not an emcad training checkpoint (format {FORMAT!r}); for model "
                                     f"weights use a save_pretrained directory or an original .pth checkpoint")
    expected = ckpt.pop(HASH_KEY, None)
    if expected is not None and object_sha256(ckpt) != expected:
        raise CheckpointReadError(f"'{path}' is corrupt: its content does not match the sha256 recorded when it was "
                                  f"written (a damaged file or copy); use another copy of the run")
    return ckpt
