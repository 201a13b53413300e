"""MAC and parameter counting in thop's convention (the EGE-UNet / MALUNet papers; docs/models.md#counting-conventions).

The two papers report ``thop.profile`` (thop 0.1.1) numbers at batch 1, 3×256×256: "GFLOPs" = thop MACs / 1e9
(no factor 2). thop hooks only **leaf** modules of known types, counting each call, and differs from the EMCAD
paper's ptflops-style rules (:mod:`emcad.flops`) in ways that matter for these models:

* Conv1d / Conv2d / Conv3d (and transposed): ``out_numel · (C_in / groups) · prod(kernel)`` per call; the
  **bias is not counted**.
* Linear: ``in_features · out_numel`` (bias not counted).
* AvgPool*: ``out_numel``; AdaptiveAvgPool*: ``(prod(in_size // out_size) + 1) · out_numel``.
* Upsample (the ``nn.Upsample`` module only): per output element nearest 0, linear 5, bilinear 11, bicubic 259,
  trilinear 31.
* BatchNorm* / InstanceNorm* / ``nn.LayerNorm``: ``2 · in_numel``, doubled when affine.
* ReLU, ReLU6, LeakyReLU, PReLU, ELU, Dropout, MaxPool*, AdaptiveMaxPool*, Identity, ZeroPad2d: 0 (known modules,
  their parameters are counted).
* Anything else: **GroupNorm**, GELU, Sigmoid, Softmax, custom leaf modules (EGE-UNet's channels-first LayerNorm),
  bare ``nn.Parameter``s and functional calls (``F.interpolate``, ``torch.mean``, elementwise ops, matmul): 0, and
  their parameters are not counted.

``params`` follows thop too: only the parameters of leaf modules with a rule are counted (EGE-UNet 45,806,
MALUNet 175,031), next to ``total_params`` = ``sum(p.numel())`` (53,374 and 177,943), which is the number the
papers quote as "Params" (docs/models.md#counting-conventions). The conv, linear and zero rules are the ones these
two models exercise; their totals reproduce the published 72,096,256 and 82,972,800 MACs exactly. The other rows follow
thop's documented hooks and are not exercised here.

Counting runs the model with ``backend="torch"`` (the plain composition: fused blocks do not call their ``nn``
submodules), in eval mode, without gradients; backends and the training flag are restored afterwards.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch.nn as nn
from torch import Tensor

__all__ = ["CONVENTIONS", "ThopReport", "count_macs", "count_macs_thop", "thop_module_macs"]

CONVENTIONS = ("thop", "paper")

_ZERO = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.ZeroPad2d,
         nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
          nn.LayerNorm)
_UPSAMPLE_OPS = {"nearest": 0, "linear": 5, "bilinear": 11, "bicubic": 259, "trilinear": 31}


@dataclass
class ThopReport:
    """MACs of one forward (thop convention) in total and per direct child module, with thop's parameter count
    and the plain ``sum(numel)``."""

    macs: int
    params: int
    total_params: int
    per_module: "OrderedDict[str, int]" = field(default_factory=OrderedDict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def thop_module_macs(module: nn.Module, inputs: Sequence, output) -> Optional[int]:
    """MACs of one call of a leaf ``module`` under thop's rules, or None when thop has no rule for its type (then
    neither its MACs nor its parameters are counted)."""
    x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
    y = output if isinstance(output, Tensor) else None
    if isinstance(module, nn.modules.conv._ConvNd):
        if y is None or x is None:
            return 0
        return y.numel() * (x.shape[1] // module.groups) * _prod(module.weight.shape[2:])
    if isinstance(module, nn.Linear):
        return module.in_features * y.numel() if y is not None else 0
    if isinstance(module, _NORMS):
        if x is None:
            return 0
        affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
        return 2 * x.numel() * (2 if affine else 1)
    if isinstance(module, _AVG):
        return y.numel() if y is not None else 0
    if isinstance(module, _ADAPTIVE_AVG):
        if x is None or y is None:
            return 0
        spatial = y.dim() - 2 if y.dim() > 2 else 1
        kernel = _prod(i // o for i, o in zip(x.shape[-spatial:], y.shape[-spatial:]))
        return (kernel + 1) * y.numel()
    if isinstance(module, nn.Upsample):
        return _UPSAMPLE_OPS.get(module.mode, 0) * y.numel() if y is not None else 0
    if isinstance(module, _ZERO):
        return 0
    return None


def count_macs_thop(model: nn.Module, inputs: Sequence,
                    custom_rules: Optional[dict[type, Callable[[nn.Module, Sequence, object], int]]] = None
                    ) -> ThopReport:
    """Counts ``model(*inputs)`` with thop's rules (see the module docstring; use batch 1 for the papers'
    numbers). ``custom_rules`` maps module types to ``rule(module, inputs, output) -> MACs`` (like thop's
    ``custom_ops``); a type with a custom rule also has its parameters counted."""
    from .flops import plain_forward_calls, sum_per_child

    rules = dict(custom_rules or {})

    def rule(mod, inp, out):
        custom = next((r for t, r in rules.items() if isinstance(mod, t)), None)
        return custom(mod, inp, out) if custom is not None else thop_module_macs(mod, inp, out)

    calls = plain_forward_calls(model, inputs, rule)
    total, per_module = sum_per_child(model, calls)
    counted = {mod for _, mod, _ in calls}
    params = sum(p.numel() for m in counted for p in m.parameters(recurse=False))
    total_params = sum(p.numel() for p in model.parameters())
    return ThopReport(total, params, total_params, per_module)


def count_macs(model: nn.Module, inputs: Sequence, convention: str = "thop"):
    """MACs of ``model(*inputs)`` in a paper's convention: ``"thop"`` (EGE-UNet, MALUNet; returns a
    :class:`ThopReport`) or ``"paper"`` (EMCAD's ptflops-style rules, :func:`emcad.flops.count_macs`; returns its
    ``MacReport``)."""
    if convention == "thop":
        return count_macs_thop(model, inputs)
    if convention == "paper":
        from .flops import count_macs as count_paper

        return count_paper(model, inputs)
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
