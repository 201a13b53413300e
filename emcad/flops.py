"""Parameter and MAC counting in the EMCAD paper's convention.

The paper's "FLOPs" are multiply-accumulates counted with ptflops-style *module hooks* (EMCAD.md §6.1):

| module                                   | MACs per call                                           |
|------------------------------------------|---------------------------------------------------------|
| Conv2d                                   | out_numel · (C_in / groups) · kH · kW, + out_numel if bias |
| Linear                                   | in_numel · out_features, + out_features if bias          |
| BatchNorm / LayerNorm / GroupNorm        | numel, ×2 if affine                                      |
| ReLU, ReLU6, LeakyReLU, PReLU, ELU       | out_numel                                                |
| adaptive / plain avg and max pooling     | in_numel                                                 |
| Upsample                                 | out_numel                                                |
| everything else (sigmoid, GELU, tensor ops, F.interpolate, matmul) | 0                             |

A module called several times is counted at every call (the shared SAB four times). Fused blocks do not call
their ``nn`` submodules, so the count runs the model with ``backend="torch"`` (the plain composition); the
architecture, and so the count, is the same. True FLOPs are 2 × MACs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
_NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class MacReport:
    """MACs of one forward at batch 1, in total and per direct child module."""

    macs: int
    params: int
    per_module: "OrderedDict[str, int]" = field(default_factory=OrderedDict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _module_macs(module: nn.Module, inputs: Sequence, output) -> int:
    x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
    out = output if isinstance(output, Tensor) else None
    if isinstance(module, nn.Conv2d) and out is not None:
        kh, kw = module.kernel_size
        macs = out.numel() * (module.in_channels // module.groups) * kh * kw
        return macs + (out.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Linear) and x is not None:
        return x.numel() * module.out_features + (module.out_features if module.bias is not None else 0)
    if isinstance(module, _NORMS) and x is not None:
        affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
        return x.numel() * (2 if affine else 1)
    if isinstance(module, _ACTIVATIONS) and out is not None:
        return out.numel()
    if isinstance(module, _POOLS) and x is not None:
        return x.numel()
    if isinstance(module, nn.Upsample) and out is not None:
        return out.numel()
    return 0


def count_macs(model: nn.Module, inputs: Sequence) -> MacReport:
    """Counts MACs of ``model(*inputs)`` (use batch 1 for the paper's numbers) with the plain PyTorch path."""
    from .models.blocks import set_backend  # local: models import emcad_kernels, keep this module light

    per_call: list[tuple[str, int]] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, i, o: per_call.append((names[mod], _module_macs(mod, i, o))))
             for m in model.modules()]
    backends = {m: getattr(m, "backend", None) for m in model.modules()}
    was_training = model.training
    try:
        set_backend(model, "torch")
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, b in backends.items():
            if b is not None:
                m.backend = b
        model.train(was_training)
    per_module: "OrderedDict[str, int]" = OrderedDict()
    for child, _ in model.named_children():
        per_module[child] = 0
    total = 0
    for name, macs in per_call:
        total += macs
        top = name.split(".")[0] if name else ""
        if top in per_module:
            per_module[top] += macs
    params = sum(p.numel() for p in model.parameters())
    return MacReport(total, params, per_module)


def decoder_inputs(channels: Sequence[int], height: int, width: int, batch: int = 1,
                   device: torch.device | str = "cpu") -> tuple[Tensor, list[Tensor]]:
    """Random encoder features for an EMCAD decoder with ``channels`` (deep → shallow) at an image size."""
    strides = (32, 16, 8, 4)
    feats = [torch.randn(batch, c, height // s, width // s, device=device) for c, s in zip(channels, strides)]
    return feats[0], feats[1:]
