"""The training loop behind ``emcad train``.

:class:`TrainConfig` holds every setting (the CLI flags map onto it one to one); :func:`train` (or
:class:`Trainer`) runs it and returns a :class:`TrainResult`.

Behaviour worth knowing:

* AdamW with the paper's defaults (lr 1e-4, weight decay 1e-4, PyTorch betas/eps); constant LR unless
  ``lr_schedule`` is ``poly`` (power 0.9) or ``cosine``, both with optional linear warm-up; optional gradient
  clipping by norm or by value (CASCADE's ±0.5 clamp).
* ``model.train()`` at the start of every epoch and after every validation (the original code trained in eval
  mode after epoch 1, quirk #1; ``reproduce_eval_mode_quirk=True`` brings that back for comparison studies).
* The best checkpoint is chosen by the mean foreground Dice on a **validation split** (the synthetic ``val`` split,
  ``val_dir``, or a seeded fraction of the training data, by case for Synapse), never on test data. A split whose
  masks hold no foreground at all (Dice undefined) is reported in a warning and selects on the validation loss.
* Checkpoints (``checkpoints/last.pt``) are written atomically every ``checkpoint_every`` steps, at the end and
  when SIGINT/SIGTERM arrives (the current step finishes first). ``resume`` continues exactly: the same batches
  (seeded, position-aware sampler; augmentation seeded per sample and epoch), the optimizer, scheduler and all RNG
  states, so the loss curve is bitwise identical to an uninterrupted run on the same machine and settings.
* DDP under ``torchrun``: gloo on CPU, nccl on GPU; each process takes its share of every global batch;
  logging, validation and checkpoints on rank 0; ``sync_bn`` synchronises BatchNorm statistics (the decoder then
  uses its torch path, because the fused kernels compute per-process statistics).
* bf16 autocast with ``amp=True`` (CUDA, and CPU, where it pays off only with native bf16 support); ``deterministic=True`` sets
  ``torch.use_deterministic_algorithms`` and the cuDNN flags for the run.
* Every file is written atomically and with umask permissions (:mod:`emcad.io_safety`); a write that fails
  (read-only folder, full disk) stops training with a one-line :class:`~emcad.io_safety.WriteError`, and the
  previous ``last.pt`` stays intact. A folder that holds a run is never mixed with another (see :class:`Trainer`).

Outputs in ``output`` (printed at the start): ``config.json``, ``train_log.csv``, ``val_log.csv``,
``metrics.json``, ``checkpoints/last.pt`` (full training state), ``checkpoints/best/`` and ``checkpoints/final/``
(``save_pretrained`` directories with ``preprocess.json``, for ``emcad evaluate`` / ``emcad predict``),
``curves.png`` and ``predictions.png``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from emcad.io_safety import WriteError, atomic_write_bytes, atomic_write_dir, makedirs
from emcad.losses import SegmentationLoss
from emcad.training import distributed as ddp
from emcad.training.checkpoint import (FORMAT, capture_rng_state, load_training_checkpoint, restore_rng_state,
                                       save_training_checkpoint)
from emcad.training.evaluation import HEADS, class_keys, evaluate_dataset, forward_head, per_class_values
from emcad.training.sampler import ResumableBatchSampler

__all__ = ["DATA_KINDS", "LR_SCHEDULES", "TrainConfig", "TrainError", "TrainResult", "Trainer", "build_datasets",
           "train"]

DATA_KINDS = ("synthetic", "folder", "synapse")
LR_SCHEDULES = ("constant", "poly", "cosine")
DEMO_DEFAULTS = {"steps": 200, "batch_size": 8, "lr": 2e-3, "lr_schedule": "cosine", "warmup_steps": 20}
PAPER_DEFAULTS = {"steps": 300, "batch_size": 16, "lr": 1e-4, "lr_schedule": "constant", "warmup_steps": 0}
PREPROCESS_NAME = "preprocess.json"


LOSS_IMPLS = ("auto", "fused", "plain")


# files whose presence means a folder holds a run; with --overwrite these and RUN_FILES_EXTRA are removed
RUN_FILES = ("checkpoints/last.pt", "checkpoints/best", "checkpoints/final", "train_log.csv", "metrics.json")
RUN_FILES_EXTRA = ("val_log.csv", "config.json", "curves.png", "predictions.png", "samples", "test_metrics.json",
                   "test_per_case.csv")  # the last two: `emcad evaluate` of this run's checkpoints


def run_files(folder: str) -> list[str]:
    """The files of :data:`RUN_FILES` that exist in ``folder``."""
    return [os.path.join(folder, name) for name in RUN_FILES if os.path.lexists(os.path.join(folder, name))]


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _has_foreground(dataset) -> bool:
    """Whether any mask of ``dataset`` has a foreground pixel (stops at the first one)."""
    return any(bool((dataset[i][1] > 0).any()) for i in range(len(dataset)))


def supports_lowres_heads(model: nn.Module) -> bool:
    """Whether ``model(x, heads="lowres")`` returns the head logits at their native resolution (EMCADNet)."""
    from emcad.models.emcadnet import HEADS as EMCAD_HEADS, EMCADNet

    return isinstance(model, EMCADNet) and "lowres" in EMCAD_HEADS


def training_loss(num_classes: int, loss_impl: str = "auto", **kwargs) -> SegmentationLoss:
    """The training criterion for ``loss_impl`` (see TrainConfig.loss_impl)."""
    fused = {"auto": "auto", "fused": True, "plain": False}[loss_impl]
    return SegmentationLoss(num_classes, fused=fused, **kwargs)


def training_forward_kwargs(model: nn.Module, loss_impl: str = "auto") -> dict:
    """Keyword arguments of the training forward: the low-resolution heads unless the plain loss is asked for
    (the loss upsamples them itself on its plain path, so this is also right for losses that cannot fuse)."""
    return {"heads": "lowres"} if loss_impl != "plain" and supports_lowres_heads(model) else {}


class TrainError(ValueError):
    """A training configuration or run cannot proceed; the message says why."""


@dataclass
class TrainConfig:
    # model
    model: str = "emcad_b0"
    encoder_weights: Optional[str] = None
    backend: str = "auto"
    # data
    data: str = "synthetic"
    data_dir: Optional[str] = None
    val_dir: Optional[str] = None
    list_file: Optional[str] = None
    size: tuple[int, int] = (64, 64)
    num_classes: Optional[int] = None
    train_samples: int = 1024
    val_samples: int = 64
    val_fraction: float = 0.1
    mask_suffix: str = ""
    normalize: str = "none"
    augment: bool = True
    num_workers: int = 0
    # loss
    supervision: str = "auto"
    criterion: str = "auto"
    structure_bce_reduction: str = "none"
    # "auto": the fused MUTATION loss on the low-resolution heads when the model and loss allow it (EMCADNet,
    # multi-class); "fused": require it; "plain": upsampled heads and the plain loss
    loss_impl: str = "auto"
    # optimisation
    # None = automatic: the paper's recipe (lr 1e-4, constant, batch 16 / Synapse 6) for real data; for the
    # synthetic demo (encoder trained from scratch) lr 2e-3 with 20 warm-up steps and a cosine decay, batch 8,
    # 200 steps (about 1-2 minutes on 2 CPU cores). See DEMO_DEFAULTS / PAPER_DEFAULTS.
    steps: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 1e-4
    lr_schedule: Optional[str] = None
    warmup_steps: Optional[int] = None
    drop_path: Optional[float] = None
    clip_grad_norm: Optional[float] = None
    clip_grad_value: Optional[float] = None
    amp: bool = False
    deterministic: bool = False
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    sync_bn: bool = False
    reproduce_eval_mode_quirk: bool = False
    # evaluation / output
    eval_head: str = "last"
    val_every: int = 50
    checkpoint_every: int = 100
    log_every: int = 10
    output: Optional[str] = None
    plots: bool = True
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with the automatic (None) settings filled in for the data kind."""
        auto = dict(DEMO_DEFAULTS if self.data == "synthetic" else PAPER_DEFAULTS)
        if self.data == "synapse":
            auto["batch_size"] = 6
        return dataclasses.replace(self, **{k: v for k, v in auto.items() if getattr(self, k) is None})

    def validate(self) -> None:
        if self.data not in DATA_KINDS:
            raise TrainError(f"data must be one of {DATA_KINDS}, got {self.data!r}")
        if self.data != "synthetic" and not self.data_dir:
            raise TrainError(f"data={self.data!r} needs a data directory (--data-dir)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise TrainError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.eval_head not in HEADS:
            raise TrainError(f"eval_head must be one of {HEADS}, got {self.eval_head!r}")
        if len(self.size) != 2 or any(int(s) % 32 or int(s) <= 0 for s in self.size):
            raise TrainError(f"size must be two positive multiples of 32 (EMCADNet's output stride), got "
                             f"{list(self.size)}")
        for name in ("steps", "batch_size", "val_every", "checkpoint_every", "log_every", "train_samples",
                     "val_samples"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise TrainError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise TrainError(f"drop_path must be in [0, 1), got {self.drop_path}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "size" in kwargs:
            kwargs["size"] = tuple(int(s) for s in kwargs["size"])
        return cls(**kwargs)


@dataclass
class TrainResult:
    output: str
    step: int
    total_steps: int
    interrupted: bool
    best_step: Optional[int]
    best_dice: float
    final_val: dict
    train_rows: list = field(default_factory=list)
    val_rows: list = field(default_factory=list)
    stop_signal: Optional[int] = None  # SIGINT / SIGTERM when a signal stopped the run


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
class _Subset(torch.utils.data.Dataset):
    """A subset that keeps the wrapped dataset's attributes (num_classes, in_channels, ...)."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)
        names = getattr(dataset, "names", None)
        self.names = [names[i] for i in self.indices] if names is not None else [str(i) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def __getattr__(self, name):
        if name in ("dataset", "indices", "names"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _split_by_case(names: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    from emcad.data import split_indices

    cases = sorted({n.split("_slice")[0] for n in names})
    if len(cases) < 2:
        return split_indices(len(names), fraction, seed)
    _, val_cases = split_indices(len(cases), fraction, seed)
    val_set = {cases[i] for i in val_cases}
    tr = [i for i, n in enumerate(names) if n.split("_slice")[0] not in val_set]
    va = [i for i, n in enumerate(names) if n.split("_slice")[0] in val_set]
    return tr, va


def build_datasets(cfg: TrainConfig):
    """``(train, val)`` datasets for ``cfg`` (val may be None when no validation split is possible)."""
    from emcad.data import ImageMaskFolder, SynapseSlices, SyntheticSegmentation, split_indices

    size = tuple(int(s) for s in cfg.size)
    if cfg.data == "synthetic":
        if cfg.num_classes not in (None, 3):
            raise TrainError(f"the synthetic dataset has 3 classes, not {cfg.num_classes}")
        return (SyntheticSegmentation(cfg.train_samples, size, seed=cfg.seed, split="train"),
                SyntheticSegmentation(cfg.val_samples, size, seed=cfg.seed, split="val"))
    if cfg.data == "folder":
        kw = dict(mask_suffix=cfg.mask_suffix, num_classes=cfg.num_classes, normalize=cfg.normalize)
        full = ImageMaskFolder(cfg.data_dir, size, **kw)
        if cfg.val_dir:
            val = ImageMaskFolder(cfg.val_dir, size, **{**kw, "num_classes": full.num_classes,
                                                        "channels": full.channels})
            return full, val
        tr, va = split_indices(len(full), cfg.val_fraction, cfg.seed)
        return _Subset(full, tr), (_Subset(full, va) if va else None)
    full = SynapseSlices(cfg.data_dir, size, list_file=cfg.list_file, num_classes=cfg.num_classes or 9)
    if cfg.val_dir:
        return full, SynapseSlices(cfg.val_dir, size, num_classes=full.num_classes)
    tr, va = _split_by_case(full.names, cfg.val_fraction, cfg.seed)
    return _Subset(full, tr), (_Subset(full, va) if va else None)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def logits_kwargs(model_name: str) -> dict:
    """``create_model`` arguments that make a model return logits (EGE-UNet / MALUNet return probabilities by
    default, like the originals; the losses here take logits)."""
    try:
        from emcad.models.registry import LIGHTWEIGHT_MODELS
    except ImportError:
        return {}
    return {"output": "logits"} if model_name in LIGHTWEIGHT_MODELS else {}


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        t = min(max(t, 0.0), 1.0)
        if cfg.lr_schedule == "poly":
            return (1.0 - t) ** 0.9
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def _write_csv(path: str, rows: Sequence[dict], what: str = "file") -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode(), what=what)


def _write_json(path: str, obj: Any, what: str = "file") -> None:
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    atomic_write_bytes(path, (json.dumps(clean(obj), indent=2) + "\n").encode(), what=what)


def _resolve_device(name: str, local_rank: int) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return name


@contextlib.contextmanager
def _deterministic(enabled: bool, device: str):
    if not enabled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


class _StopSignals:
    """SIGINT/SIGTERM set a flag (the step in flight finishes, a checkpoint is saved); a second SIGINT aborts."""

    def __init__(self, log: Callable[[str], None]):
        self.signum: Optional[int] = None
        self._log = log
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self._log(f"\n{signal.Signals(signum).name} received: finishing the current step and saving a checkpoint "
                  f"(press Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


# --------------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------------
class Trainer:
    """Runs a :class:`TrainConfig`. ``model``, ``train_set`` and ``val_set`` may be given instead of being built
    from the config (tests use tiny models). ``resume`` is a ``checkpoints/last.pt`` path.
    ``callback(trainer, step, loss)`` runs after every optimisation step on every rank; it may call
    :meth:`request_stop`.

    Output folder: ``config.output``; when resuming without one, the run folder that holds the checkpoint
    (``RUN`` for ``RUN/checkpoints/last.pt``, wherever that folder has moved), never the output stored in the
    checkpoint. A folder that already holds a run (see :data:`RUN_FILES`) is refused, unless it is the resumed
    run's own folder, or ``overwrite=True``: then that run's files are removed before the new run writes (other
    files in the folder are left alone). A finished run is resumed only when more steps are asked for."""

    def __init__(self, config: TrainConfig, *, model: Optional[nn.Module] = None, train_set=None, val_set=None,
                 resume: Optional[str] = None, callback: Optional[Callable] = None,
                 log: Optional[Callable[[str], None]] = None, overwrite: bool = False):
        self.cfg = config
        self._model_arg, self._train_arg, self._val_arg = model, train_set, val_set
        self.resume_path = resume
        self.overwrite = overwrite
        self.callback = callback
        self._log_fn = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._stop_requested = False
        self.dist = ddp.DistInfo()

    # -- small helpers -------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log_fn(msg)

    def request_stop(self) -> None:
        """Stop after the current step, saving a checkpoint (as SIGINT does)."""
        self._stop_requested = True

    def _save_model_dir(self, path: str) -> None:
        from emcad.models import save_pretrained

        model = ddp.unwrap(self.model)
        pre = dict(self.preprocess, num_classes=self.num_classes, class_names=self.class_names,
                   eval_head=self.cfg.eval_head)
        extra = {PREPROCESS_NAME: (json.dumps(pre, indent=2) + "\n").encode()}
        try:  # EMCADNet, EGE-UNet, MALUNet: config.json + model.safetensors, swapped in as a whole
            save_pretrained(model, path, extra_files=extra)
        except TypeError:  # a custom model: its state dict only

            def write(tmp: str) -> None:
                torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
                for name, payload in extra.items():
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(payload)

            atomic_write_dir(path, write, what="model")

    def _checkpoint_state(self, step: int) -> dict:
        rng = ddp.all_gather_objects(capture_rng_state())
        model = ddp.unwrap(self.model)
        return {
            "format": FORMAT, "config": self.cfg.to_dict(), "model_name": getattr(model, "model_name", None),
            "model_config": dict(getattr(model, "config", {}) or {}), "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": step, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "world_size": self.dist.world_size, "rng": rng, "train_rows": list(self.train_rows),
            "val_rows": list(self.val_rows), "best": dict(self.best), "preprocess": dict(self.preprocess),
            "num_classes": self.num_classes, "class_names": list(self.class_names),
        }

    def save_checkpoint(self, step: int) -> None:
        state = self._checkpoint_state(step)  # collective: every rank takes part

        def write() -> None:
            try:
                save_training_checkpoint(state, self.ckpt_path)
                self._saved_step = step
                self._write_logs()
            except WriteError as e:  # the previous checkpoint is untouched (atomic replace)
                if self._saved_step is not None:
                    e.message += f" (the checkpoint of step {self._saved_step} is intact: {self.ckpt_path})"
                raise

        self._on_main(write)
        ddp.barrier()

    @property
    def selection(self) -> str:
        return ("validation loss (the validation split has no foreground)" if self.select_on_loss else
                "mean foreground Dice on the validation split")

    def _write_logs(self) -> None:
        _write_csv(os.path.join(self.out_dir, "train_log.csv"), self.train_rows, what="log")
        if self.val_rows:
            _write_csv(os.path.join(self.out_dir, "val_log.csv"), self.val_rows, what="log")
        _write_json(os.path.join(self.out_dir, "metrics.json"), {
            "model": self.cfg.model, "data": self.cfg.data, "step": self.step, "total_steps": self.total_steps,
            "best": self.best, "last_val": self.val_rows[-1] if self.val_rows else None,
            "class_names": list(self.class_names), "selection": self.selection,
            "train": self.train_rows, "val": self.val_rows,
        }, what="log")

    # -- set-up --------------------------------------------------------------------------------------
    def _setup(self) -> None:
        self.cfg = cfg = self.cfg.resolved()
        cfg.validate()
        resume_ckpt = None
        if self.resume_path:
            resume_ckpt = load_training_checkpoint(self.resume_path)
        self.device = _resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = ddp.init_distributed(self.device)
        if self.dist.enabled and self.device.startswith("cuda"):
            self.device = f"cuda:{self.dist.local_rank}"
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        elif self.device == "cpu":
            self._fit_threads_to_load()
        if cfg.batch_size % self.dist.world_size:
            raise TrainError(f"batch size {cfg.batch_size} (global) is not divisible by the {self.dist.world_size} "
                             f"processes")
        self.amp = bool(cfg.amp)

        # output directory (rank 0 decides, everyone agrees)
        out = self._output_dir(resume_ckpt)
        self.out_dir = os.path.abspath(ddp.all_gather_objects(out)[0])
        self.ckpt_path = os.path.join(self.out_dir, "checkpoints", "last.pt")
        verdict: tuple[Optional[str], bool] = (None, False)
        if self.dist.is_main:  # one process looks, before any writes
            try:
                verdict = (None, self._check_output_dir(resume_ckpt))
            except TrainError as e:
                verdict = (str(e), False)
        refusal, self._clear_old_run = ddp.all_gather_objects(verdict)[0]
        if refusal:
            raise TrainError(refusal)
        self.cfg = cfg = dataclasses.replace(cfg, output=self.out_dir)  # what config.json and last.pt record
        self._saved_step = int(resume_ckpt["step"]) if resume_ckpt is not None else None

        torch.manual_seed(cfg.seed)  # model initialisation: identical on every rank
        import random

        import numpy as np
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2 ** 32))

        # data
        if self._train_arg is not None:
            self.train_set, self.val_set = self._train_arg, self._val_arg
        else:
            self.train_set, self.val_set = build_datasets(cfg)
        self.num_classes = int(getattr(self.train_set, "num_classes", cfg.num_classes or 1))
        self.in_channels = int(getattr(self.train_set, "in_channels", 1))
        names = getattr(self.train_set, "class_names", None)
        self.class_names = list(names) if names else (["background", "foreground"] if self.num_classes == 1 else
                                                      ["background"] + [f"class {c}" for c in
                                                                        range(1, self.num_classes)])
        pre = getattr(self.train_set, "preprocess_config", None)
        self.preprocess = pre() if callable(pre) else {"in_channels": self.in_channels}
        self.preprocess["size"] = list(cfg.size)
        self.select_on_loss, self._val_criterion = False, None
        if self.dist.is_main and self.val_set is not None and not _has_foreground(self.val_set):
            self.select_on_loss = True
            self.log(f"warning: the validation split ({self._describe_val_split()}) has no foreground in its "
                     f"masks: Dice is undefined there, so checkpoints/best is selected on the validation loss")
        if cfg.augment:
            from emcad.data import Augmented
            self.train_set = Augmented(self.train_set, seed=cfg.seed)
        self.sampler = ResumableBatchSampler(len(self.train_set), cfg.batch_size, seed=cfg.seed, shuffle=True,
                                             num_replicas=self.dist.world_size, rank=self.dist.rank)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.epochs * self.steps_per_epoch if cfg.epochs else cfg.steps
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=cfg.num_workers,
            pin_memory=self.device.startswith("cuda"),
            generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG out of the loader

        # model
        if self._model_arg is not None:
            model = self._model_arg
        else:
            from emcad.models import create_model
            model = create_model(cfg.model, num_classes=self.num_classes, in_channels=self.in_channels,
                                 encoder_weights=cfg.encoder_weights, backend=cfg.backend, **logits_kwargs(cfg.model))
        if cfg.drop_path is not None:  # PVTv2 stochastic depth (default 0.1): rescale the per-block rates
            blocks = [m for m in model.modules() if type(m).__name__ == "DropPath" and hasattr(m, "drop_prob")]
            top = max([m.drop_prob for m in blocks], default=0.0)
            for m in blocks:
                m.drop_prob = m.drop_prob / top * cfg.drop_path if top > 0 else 0.0
        if self.in_channels == 3 and type(model).__name__ == "EMCADNet" and isinstance(getattr(model, "conv", None),
                                                                                         nn.Module):
            model.conv.requires_grad_(False)  # the 1->3 stem is unused with RGB input (and would stall DDP)
        if cfg.sync_bn and self.dist.enabled:
            from emcad.models import set_backend
            if hasattr(model, "backend") and model.backend != "torch":
                self.log("note: --sync-bn runs the decoder blocks on backend 'torch' (the fused kernels compute "
                         "per-process BatchNorm statistics)")
                set_backend(model, "torch")
            model = ddp.convert_sync_batchnorm(model, self.device)
        model.to(self.device)
        self.raw_model = model
        self.model = (nn.parallel.DistributedDataParallel(
            model, device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None)
            if self.dist.enabled else model)

        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, self.total_steps))
        self.criterion = training_loss(self.num_classes, cfg.loss_impl, supervision=cfg.supervision,
                                       criterion=cfg.criterion, structure_bce_reduction=cfg.structure_bce_reduction,
                                       distributed=self.dist.enabled)
        self.forward_kwargs = training_forward_kwargs(model, cfg.loss_impl)
        if cfg.loss_impl == "fused" and not self.forward_kwargs:
            raise TrainError(f"loss_impl 'fused' needs a model with low-resolution heads (EMCADNet), got "
                             f"{type(model).__name__}")
        if cfg.loss_impl == "fused" and (self.criterion.supervision, self.criterion.criterion) != ("mutation",
                                                                                                  "ce_dice"):
            raise TrainError(f"loss_impl 'fused' computes the multi-class MUTATION loss (supervision 'mutation', "
                             f"criterion 'ce_dice'), got {self.criterion.supervision!r} / "
                             f"{self.criterion.criterion!r} for {self.num_classes} class(es)")

        self.step = 0
        self.loss_path: Optional[str] = None  # "fused" or "plain", set by the first training step
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.best: dict = {"step": None, "dice_mean": -math.inf}
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self._on_main(lambda: self._start_output_dir(resumed=resume_ckpt is not None))
        ddp.barrier()

    def _start_output_dir(self, resumed: bool) -> None:
        if self._clear_old_run:
            self._remove_run_files()
        makedirs(os.path.join(self.out_dir, "checkpoints"), what="run folder")
        _write_json(os.path.join(self.out_dir, "config.json"), self.cfg.to_dict(), what="run config")
        if resumed:
            self._write_logs()  # drop rows logged after the checkpoint by the interrupted run

    def _checkpoint_run_dir(self) -> Optional[str]:
        """``RUN`` when the resumed checkpoint lies in ``RUN/checkpoints/``, else None."""
        folder = os.path.dirname(os.path.abspath(self.resume_path))
        return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None

    def _output_dir(self, resume_ckpt: Optional[dict]) -> str:
        if self.cfg.output is not None:
            return self.cfg.output
        if resume_ckpt is None:
            return os.path.join("runs", f"{self.cfg.model}-{self.cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
        run = self._checkpoint_run_dir()
        if run is None:
            raise TrainError(f"'{self.resume_path}' is not in a run folder (RUN/checkpoints/last.pt): give the "
                             f"folder for the resumed run with -o/--output")
        return run

    def _check_output_dir(self, resume_ckpt: Optional[dict]) -> bool:
        """Refuse to mix runs in one folder; True when an old run's files must be removed first (overwrite)."""
        found = run_files(self.out_dir)
        if resume_ckpt is not None:
            run = self._checkpoint_run_dir()
            if run is not None and _same_path(run, self.out_dir):  # the resumed run's own folder
                if (os.path.exists(self.ckpt_path) and not _same_path(self.ckpt_path, self.resume_path)
                        and not self.overwrite):
                    raise TrainError(f"resuming from '{self.resume_path}' would replace '{self.ckpt_path}' "
                                     f"(another state of this run); resume from that one, or pass --overwrite")
                return False
            if found and not self.overwrite:
                raise TrainError(f"'{self.out_dir}' already holds another run ({found[0]}); resume into the "
                                 f"checkpoint's own run folder, a new folder, or pass --overwrite to replace that run")
            return bool(found)
        if found and not self.overwrite:
            hint = (f"continue it with --resume {self.ckpt_path}, " if os.path.exists(self.ckpt_path) else "")
            raise TrainError(f"'{self.out_dir}' already holds a run ({found[0]}); {hint}choose another --output, or "
                             f"pass --overwrite to replace it")
        return bool(found)

    def _remove_run_files(self) -> None:
        import shutil

        self.log(f"--overwrite: removing the previous run's files from {self.out_dir}")
        for name in RUN_FILES + RUN_FILES_EXTRA:
            path = os.path.join(self.out_dir, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
            except OSError as e:
                raise WriteError("run folder", path, e) from e

    def _describe_val_split(self) -> str:
        cfg, n = self.cfg, len(self.val_set)
        if self._val_arg is not None:
            return f"the given validation set, {n} images"
        if cfg.val_dir:
            return f"--val-dir {cfg.val_dir}, {n} images"
        if cfg.data == "synthetic":
            return f"the synthetic val split, {n} images"
        return f"--val-fraction {cfg.val_fraction:g} of {cfg.data_dir}, {n} images"

    def _fit_threads_to_load(self) -> None:
        """On a busy CPU, more intra-op threads than idle cores makes every step wait for descheduled threads (10x
        slower measured on 2 shared cores). Without --threads, use at most the idle cores (at least 1)."""
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            return
        cores = os.cpu_count() or 1
        threads = torch.get_num_threads()
        idle = max(1, int(cores - load + 1.0))  # +1: this process is part of the load
        if idle < threads:
            torch.set_num_threads(idle)
            self.log(f"note: the machine is busy (load {load:.1f} on {cores} cores): {idle} CPU thread(s) instead of "
                     f"{threads}; set --threads to override")

    def _restore(self, ckpt: dict) -> None:
        step, saved_total = int(ckpt["step"]), int(ckpt.get("total_steps", ckpt["step"]))
        if step >= self.total_steps:
            if self.total_steps == saved_total:
                raise TrainError(f"'{self.resume_path}' is a finished run ({step}/{saved_total} steps); to train "
                                 f"it further ask for more steps (--steps N with N > {step}, or more --epochs)")
            raise TrainError(f"this configuration trains {self.total_steps} steps, but '{self.resume_path}' is "
                             f"already at step {step}; ask for more than {step} steps to continue it")
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            raise TrainError(f"cannot resume from '{self.resume_path}': it has {ckpt['steps_per_epoch']} steps per "
                             f"epoch, this configuration {self.steps_per_epoch} (dataset or batch size changed)")
        ddp.unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.train_rows, self.val_rows = list(ckpt["train_rows"]), list(ckpt["val_rows"])
        self.best = dict(ckpt["best"])
        rng = ckpt["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            self.log(f"note: the checkpoint was written by {len(rng)} processes, this run has "
                     f"{self.dist.world_size}: RNG streams (DropPath) restart, the resume is not bitwise exact")
            restore_rng_state(rng[0])
        self.log(f"resumed from '{self.resume_path}' at step {self.step}/{self.total_steps}")

    # -- validation ----------------------------------------------------------------------------------
    def validate(self, keep: int = 0, sync: bool = True):
        """Validation metrics on rank 0 (Dice/IoU per class; no HD95 during training). Returns
        ``(row, kept)``; the model is switched back to train mode unless the quirk flag is set."""
        row, kept = None, []
        if self.dist.is_main and self.val_set is not None:
            model = ddp.unwrap(self.model)
            summary, _, kept = evaluate_dataset(
                model, self.val_set, self.num_classes, batch_size=max(self.cfg.batch_size, 16), device=self.device,
                head=self.cfg.eval_head, compute_hd95=False, keep=keep,
                autocast_dtype=torch.bfloat16 if self.amp else None)
            row = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                   "dice_mean": summary["mean"]["dice"], "iou_mean": summary["mean"]["iou"]}
            keys = class_keys(list(summary["per_class"]), self.class_names)  # dice_lesion, not dice_1
            for c, vals in summary["per_class"].items():
                row[f"dice_{keys[c]}"] = vals["dice"]
            for c, vals in summary["per_class"].items():
                row[f"iou_{keys[c]}"] = vals["iou"]
        if not self.cfg.reproduce_eval_mode_quirk:
            self.model.train()
        if sync:
            ddp.barrier()
        return row, kept

    # -- main loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        threads = torch.get_num_threads()
        try:
            return self._fit_deterministic()
        finally:
            torch.set_num_threads(threads)

    def _fit_deterministic(self) -> TrainResult:
        with _deterministic(self.cfg.deterministic, self.cfg.device if self.cfg.device != "auto" else
                            ("cuda" if torch.cuda.is_available() else "cpu")):
            return self._fit()

    def _fit(self) -> TrainResult:
        signals = _StopSignals(self._log_fn)
        with signals:  # installed before the set-up: a signal during it stops after the first step, with a checkpoint
            self._setup()
            return self._run(signals)

    def _run(self, signals: "_StopSignals") -> TrainResult:
        cfg = self.cfg
        self.log(f"emcad train: {cfg.model} on {getattr(self.train_set, 'describe', lambda: 'custom data')()}, "
                 f"{self.num_classes} classes, {self.total_steps} steps, global batch {cfg.batch_size}"
                 f"{f' over {self.dist.world_size} processes' if self.dist.enabled else ''}, device {self.device}")
        self.log(f"AdamW lr {cfg.lr:g} (weight decay {cfg.weight_decay:g}), {cfg.lr_schedule} schedule"
                 f"{f' after {cfg.warmup_steps} warm-up steps' if cfg.warmup_steps else ''}, loss: "
                 f"{self.criterion.supervision} supervision of {self.criterion.criterion}, backend {cfg.backend}"
                 f"{', demo defaults for the synthetic data' if cfg.data == 'synthetic' else ''}")
        self.log(f"outputs: {self.out_dir}")
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, smoothing=0.1,
                   disable=not (self.dist.is_main and cfg.progress), file=sys.stderr)
        interrupted = False
        loss_sum = torch.zeros((), device=self.device)
        n_logged, t_last = 0, time.perf_counter()
        t_start = t_last
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(start)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            if not self.cfg.reproduce_eval_mode_quirk or self.step == 0:
                self.model.train()
            for images, labels in self.loader:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.amp):
                    outputs = self.model(images, **self.forward_kwargs)
                loss = self.criterion(outputs, labels)
                if self.loss_path is None:
                    self.loss_path = self.criterion.last_path
                    self.log(f"loss path: {self.loss_path} (loss_impl {cfg.loss_impl}"
                             f"{', low-resolution heads' if self.forward_kwargs else ''})")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad_value is not None:
                    torch.nn.utils.clip_grad_value_(self.raw_model.parameters(), cfg.clip_grad_value)
                if cfg.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.clip_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                loss_sum += loss.detach()
                n_logged += 1
                if self.callback is not None:
                    self.callback(self, self.step, loss)

                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    mean = loss_sum / n_logged
                    if self.dist.enabled:
                        torch.distributed.all_reduce(mean)
                        mean = mean / self.dist.world_size
                    now = time.perf_counter()
                    row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": mean.item(),
                           "lr": self.optimizer.param_groups[0]["lr"],
                           "images_per_s": n_logged * cfg.batch_size / max(now - t_last, 1e-9),
                           "elapsed_s": now - t_start}
                    self.train_rows.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}",
                                    refresh=False)
                    loss_sum.zero_()
                    n_logged, t_last = 0, now
                bar.update(1)

                if self.step % cfg.val_every == 0 or self.step == self.total_steps:
                    self._validate_and_select()
                    t_last = time.perf_counter()  # validation time is not training throughput
                stop = ddp.any_flag(self._stop_requested or signals.signum is not None, self.device)
                if stop and self.step < self.total_steps:
                    self.save_checkpoint(self.step)
                    interrupted = True
                    break
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint(self.step)
                if self.step >= self.total_steps:
                    break
            if interrupted:
                break
        bar.close()
        if interrupted:
            self.log(f"stopped at step {self.step}/{self.total_steps}; checkpoint saved: {self.ckpt_path}\n"
                     f"continue with: emcad train --resume {self.ckpt_path}")
        else:
            self.save_checkpoint(self.step)
            self._on_main(self._finish)
            ddp.barrier()
        result = TrainResult(self.out_dir, self.step, self.total_steps, interrupted, self.best.get("step"),
                             float(self.best.get("dice_mean", math.nan)), self.val_rows[-1] if self.val_rows else {},
                             list(self.train_rows), list(self.val_rows), signals.signum)
        if self.dist.enabled and self._owns_group:
            ddp.cleanup()
        return result

    @property
    def _owns_group(self) -> bool:
        return self.dist.enabled and os.environ.get("EMCAD_KEEP_PROCESS_GROUP") != "1"

    def _validate_and_select(self) -> None:
        row, _ = self.validate(sync=False)
        self._on_main(lambda: self._select(row) if row is not None else None)
        ddp.barrier()

    def _select(self, row: dict) -> None:
        """Log a validation row and save checkpoints/best when it is the best so far: the highest mean
        foreground Dice, or the lowest validation loss when the split has no foreground."""
        if self.select_on_loss:
            row["val_loss"] = self._validation_loss()
        self.val_rows.append(row)
        msg = (f"step {self.step}: val Dice {row['dice_mean']:.4f} ("
               + ", ".join(f"{k} {v:.3f}" for k, v in per_class_values(row, "dice", self.class_names).items())
               + ")")
        if self.select_on_loss:
            msg += f", val loss {row['val_loss']:.4f}"
            score, better = row["val_loss"], row["val_loss"] < self.best.get("val_loss", math.inf)
        else:
            score, better = row["dice_mean"], row["dice_mean"] > self.best["dice_mean"]
        if (better or self.best["step"] is None) and math.isfinite(score):
            self.best = {"step": self.step, "dice_mean": row["dice_mean"],
                         **{k: v for k, v in row.items() if k.startswith("dice_") or k == "val_loss"}}
            self._save_model_dir(os.path.join(self.out_dir, "checkpoints", "best"))
            msg += "  [best]"
        from tqdm.auto import tqdm
        if self.cfg.progress:
            tqdm.write(msg, file=sys.stderr)
        else:
            self.log(msg)
        self._write_logs()

    @torch.no_grad()
    def _validation_loss(self) -> float:
        """The training loss over the validation split, in eval mode (for a split without foreground)."""
        model = ddp.unwrap(self.model)
        was_training = model.training
        model.eval()
        if self._val_criterion is None:  # not distributed: only rank 0 validates
            self._val_criterion = training_loss(self.num_classes, self.cfg.loss_impl,
                                                supervision=self.cfg.supervision, criterion=self.cfg.criterion,
                                                structure_bce_reduction=self.cfg.structure_bce_reduction)
        total, count, n = 0.0, 0, len(self.val_set)
        batch = max(self.cfg.batch_size, 16)
        for start in range(0, n, batch):
            pairs = [self.val_set[i] for i in range(start, min(start + batch, n))]
            images = torch.stack([p[0] for p in pairs]).to(self.device)
            labels = torch.stack([p[1] for p in pairs]).to(self.device)
            with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.amp):
                outputs = model(images, **self.forward_kwargs)
            total += float(self._val_criterion(outputs, labels)) * len(pairs)
            count += len(pairs)
        model.train(was_training)
        return total / max(count, 1)

    def _on_main(self, write: Callable[[], None]) -> None:
        """Run ``write`` on rank 0; when it fails (WriteError), every rank stops instead of waiting in a barrier."""
        error: Optional[WriteError] = None
        if self.dist.is_main:
            try:
                write()
            except WriteError as e:
                error = e
        if ddp.any_flag(error is not None, self.device):
            raise error or TrainError("rank 0 could not write the run's files (see its error)")

    def _finish(self) -> None:
        from emcad.training.plotting import plot_curves, save_overlay_grid

        self._save_model_dir(os.path.join(self.out_dir, "checkpoints", "final"))
        files = []
        if self.cfg.plots:
            plot_curves(os.path.join(self.out_dir, "curves.png"), self.train_rows, self.val_rows, self.class_names)
            files.append("curves.png")
            if self.val_set is not None:
                _, kept = self.validate(keep=8, sync=False)
                if kept:
                    save_overlay_grid(os.path.join(self.out_dir, "predictions.png"), [k[0] for k in kept],
                                      [k[1] for k in kept], [k[2] for k in kept], class_names=self.class_names)
                    files.append("predictions.png")
        if self.cfg.data == "synthetic" and self._train_arg is None:
            from emcad.data import SyntheticSegmentation
            SyntheticSegmentation(8, tuple(self.cfg.size), seed=self.cfg.seed, split="test").export_png(
                os.path.join(self.out_dir, "samples"))
            files.append("samples/ (8 test images and masks for emcad predict)")
        self._write_logs()
        if self.best.get("step") is None:
            best = "no validation split" if self.val_set is None else "no best checkpoint (no finite score)"
        elif self.select_on_loss:
            best = f"best val loss {self.best['val_loss']:.4f} at step {self.best['step']} (checkpoints/best)"
        else:
            best = f"best val Dice {self.best['dice_mean']:.4f} at step {self.best['step']} (checkpoints/best)"
        self.log(f"done: {self.step} steps; {best}\noutputs in {self.out_dir}: " + ", ".join(
            ["config.json", "train_log.csv", "val_log.csv", "metrics.json", "checkpoints/"] + files))


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """Run ``config`` (see :class:`Trainer` for the keyword arguments)."""
    return Trainer(config, **kwargs).fit()
