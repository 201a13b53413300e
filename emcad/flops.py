"""Parameter and MAC counting in the EMCAD paper's convention.

The paper's "FLOPs" are multiply-accumulates counted with ptflops-style *module hooks*
(docs/models.md#counting-conventions):

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
from typing import Callable, Optional, Sequence

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


def plain_forward_calls(model: nn.Module, inputs: Sequence,
                        rule: Callable[[nn.Module, Sequence, object], Optional[int]]) -> list[tuple[str, nn.Module, int]]:
    """Runs ``model(*inputs)`` once on the plain PyTorch path (``backend="torch"``, eval mode, no gradients) with
    a forward hook on every leaf module, and returns ``(name, module, rule(module, inputs, output))`` for each
    call whose rule gave a number (None: the module is not counted). Backends and training flags are restored."""
    from .models.blocks import set_backend  # local: models import emcad_kernels, keep this module light

    calls: list[tuple[str, nn.Module, int]] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        macs = rule(mod, inp, out)
        if macs is not None:
            calls.append((names[mod], mod, int(macs)))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if next(m.children(), None) is None]
    backends = {m: getattr(m, "backend", None) for m in model.modules()}
    was_training = {m: m.training for m in model.modules()}
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
        for m, mode in was_training.items():
            m.training = mode
    return calls


def sum_per_child(model: nn.Module, calls: Sequence[tuple[str, nn.Module, int]]) -> tuple[int, "OrderedDict[str, int]"]:
    """Total MACs and MACs per direct child module of ``model``."""
    per_module: "OrderedDict[str, int]" = OrderedDict((child, 0) for child, _ in model.named_children())
    for name, _, macs in calls:
        top = name.split(".")[0]
        if top in per_module:
            per_module[top] += macs
    return sum(macs for _, _, macs in calls), per_module


def count_macs(model: nn.Module, inputs: Sequence) -> MacReport:
    """Counts MACs of ``model(*inputs)`` (use batch 1 for the paper's numbers) with the plain PyTorch path."""
    total, per_module = sum_per_child(model, plain_forward_calls(model, inputs, _module_macs))
    return MacReport(total, sum(p.numel() for p in model.parameters()), per_module)


def decoder_inputs(channels: Sequence[int], height: int, width: int, batch: int = 1,
                   device: torch.device | str = "cpu") -> tuple[Tensor, list[Tensor]]:
    """Random encoder features for an EMCAD decoder with ``channels`` (deep → shallow) at an image size."""
    strides = (32, 16, 8, 4)
    feats = [torch.randn(batch, c, height // s, width // s, device=device) for c, s in zip(channels, strides)]
    return feats[0], feats[1:]
