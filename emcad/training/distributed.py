"""DDP helpers: process-group set-up from the ``torchrun`` environment, rank-0 helpers and SyncBatchNorm.

``torchrun --nproc_per_node N -m emcad.cli train ...`` (or the ``emcad`` script) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the group with
``nccl`` on CUDA and ``gloo`` on CPU.

PyTorch's ``nn.SyncBatchNorm`` runs only on GPUs. :class:`GlobalBatchNorm2d` is a SyncBatchNorm for any device
(CPU/gloo included): in training mode it all-reduces the per-channel sum, sum of squares and count with a
differentiable all-reduce, so the statistics and their gradients are those of the global batch. It keeps the
``BatchNorm2d`` state-dict keys. :func:`convert_sync_batchnorm` uses PyTorch's implementation on CUDA and this
one elsewhere.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistInfo", "GlobalBatchNorm2d", "all_gather_objects", "any_flag", "barrier", "cleanup",
           "convert_sync_batchnorm", "init_distributed", "is_distributed", "unwrap"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str = "cpu", backend: Optional[str] = None, timeout_s: float = 1800) -> DistInfo:
    """Join the process group described by the environment (``WORLD_SIZE`` > 1), or return a single-process
    :class:`DistInfo`. Already-initialised groups are reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_flag(flag: bool, device: str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a stop request that reached one process)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / torch.compile wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of all DDP processes (works on CPU with gloo).

    Outside a process group, or in eval mode, it is an ordinary BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(x.numel() // c), dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        stats = all_reduce(stats)  # differentiable: the backward all-reduces the gradients too
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: str = "cpu") -> nn.Module:
    """Replace every ``BatchNorm2d`` by a synchronised one (PyTorch's on CUDA, :class:`GlobalBatchNorm2d`
    otherwise), keeping parameters, buffers and state-dict keys."""
    if device.startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats, device=None, dtype=None)
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            for attr in ("backend",):  # decoder blocks read their own attributes, not the BN's; keep any hint
                if hasattr(module, attr):
                    setattr(new, attr, getattr(module, attr))
            return new.to(next(module.parameters(), torch.empty(0)).device)
        for name, child in module.named_children():
            new_child = convert(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    return convert(model)

