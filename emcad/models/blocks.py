"""EMCAD decoder building blocks (EMCAD.md §2), re-implemented from the specification.

Every block keeps its parameters as standard ``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules under the original
names and indices, so that state dicts (and original checkpoints) match key for key.

Every block has a ``backend`` attribute:

* ``"torch"``: the plain composition of the submodules (the verification path; module hooks see every
  submodule call, exactly like the original code);
* ``"auto"`` (default), ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``...: the fused ops of
  :mod:`emcad_kernels` are called on the same parameters (``backend=None`` for ``"auto"``, so that
  ``EMCAD_KERNELS_BACKEND`` and ``emcad_kernels.use_backend`` apply). No weight conversion is ever needed.

Fused paths:

* :class:`MSCB`: the MSDC branches + BN + activation + sum (or concat) + channel shuffle run as one
  ``multi_scale_dwconv`` call; ``pconv1`` / ``pconv2`` / the residual stay PyTorch modules.
* :class:`MSDC` called alone returns the branch list (``combine="concat"`` then split).
* :class:`EUCB`: ``up_dwc`` runs as one ``upsample_dwconv`` call, the identity shuffle is dropped, then ``pwc``.
* :class:`LGAG`: one ``grouped_attention_gate`` call (``aggregate=True`` returns ``g + x·ψ``).
* :class:`CAB`, :class:`SAB`: plain PyTorch when called alone (they return attention maps); the decoder's MSCAM
  stage applies both as one ``emcad_kernels.mscam`` call (``d · ca · sa``), see :func:`apply_mscam_attention`.
* Eval mode (issue 8): :class:`MSCB` folds BN into ``pconv1`` / ``pconv2`` and the shuffle into ``pconv2``'s
  input columns (cached folded weights, :class:`_FoldedPointwise`); EUCB's ``pwc`` uses the same GEMM dispatch.

Not fused (the torch composition runs instead, whatever ``backend`` says): MSDC series mode
(``dw_parallel=False``), EUCB with stride != 1, and any block whose BatchNorms disagree in train/eval mode,
``eps`` or ``track_running_stats`` (e.g. one BN frozen by hand). In training mode the fused path does the
``nn.BatchNorm2d`` bookkeeping itself: ``num_batches_tracked`` is incremented and the exponential-average factor
(``momentum``, or ``1 / num_batches_tracked`` for ``momentum=None``) is used for the running statistics.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

import emcad_kernels
from emcad_kernels import BatchNormParams
from emcad_kernels.batchnorm_act import INPLACE_ACTIVATIONS, batch_norm_act

__all__ = [
    "ACTIVATIONS", "BackendMixin", "CAB", "EUCB", "LGAG", "MSCB", "MSCBLayer", "MSDC", "SAB", "apply_mscam_attention",
    "channel_shuffle", "clear_fold_caches",
    "init_decoder_weights", "make_activation", "set_backend", "valid_backends",
]

# Parameter-free activations by name (EMCAD.md §2.1). "prelu" of the original code is not supported: it would
# add a learnable parameter that no EMCAD checkpoint has.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "relu6": lambda: nn.ReLU6(inplace=False),
    "leakyrelu": lambda: nn.LeakyReLU(0.2, inplace=False),
    "gelu": lambda: nn.GELU(),
    "hswish": lambda: nn.Hardswish(inplace=False),
}
_ACTIVATION_TYPES = {name: type(make()) for name, make in ACTIVATIONS.items()}


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name`` (``relu``, ``relu6``, ``leakyrelu`` (slope 0.2), ``gelu``,
    ``hswish``)."""
    try:
        return ACTIVATIONS[name.lower()]()
    except (KeyError, AttributeError):
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle (EMCAD.md §2.2): output channel ``o`` takes input ``(o mod g)·n + o div g``
    with ``n = C / g`` channels per group. ``groups == C`` is the identity."""
    b, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"channel_shuffle: groups={groups} does not divide {c} channels")
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------------
def valid_backends() -> list[str]:
    """Names accepted by :func:`set_backend`: ``"torch"``, ``"auto"`` and the registered kernel backends."""
    return ["torch", "auto", *emcad_kernels.registered_backends()]


def _check_backend(name: str) -> str:
    if not isinstance(name, str) or name not in valid_backends():
        raise ValueError(f"unknown backend {name!r}; expected one of {valid_backends()}")
    return name


class BackendMixin:
    """Gives a module a ``backend`` attribute (``"torch"``, ``"auto"`` or a kernel backend name)."""

    backend: str = "auto"

    def set_backend(self, name: str) -> "BackendMixin":
        """Set ``backend`` on this module and on all its submodules; returns ``self``."""
        set_backend(self, name)
        return self

    def _kernel_backend(self) -> Optional[str]:
        """The ``backend=`` argument of the fused functional: None for "auto"."""
        return None if self.backend == "auto" else self.backend

    def _use_torch(self) -> bool:
        return self.backend == "torch"


def set_backend(module: nn.Module, name: str) -> nn.Module:
    """Set ``backend = name`` on ``module`` and every submodule that has one; returns ``module``.

    ``name`` is ``"torch"`` (plain nn-module composition), ``"auto"`` (fused ops, automatic kernel choice) or
    a registered ``emcad_kernels`` backend (``"reference"``, ...). No weight conversion happens."""
    _check_backend(name)
    for m in module.modules():
        if isinstance(m, BackendMixin):
            m.backend = name
    return module


# --------------------------------------------------------------------------------------------------
# initialisation and BatchNorm bookkeeping
# --------------------------------------------------------------------------------------------------
def init_decoder_weights(module: nn.Module) -> None:
    """EMCAD.md §2.1: conv weights ~ N(0, 0.02²), conv biases 0, BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _FusedBN:
    """The BatchNorm arguments of one fused call that covers ``bns``, with nn.BatchNorm2d's bookkeeping.

    ``prepare`` returns None (without side effects) when the BNs cannot share one call; otherwise it increments
    ``num_batches_tracked`` as ``nn.BatchNorm2d.forward`` does and computes each BN's exponential-average factor.
    If the factors agree (the normal case) the modules themselves are passed and the functional updates their
    running statistics; otherwise copies are passed with momentum 1 (so they receive the batch mean and unbiased
    variance) and :meth:`finish` applies each BN's own factor with the same arithmetic.
    """

    def __init__(self, training: bool, eps: float, momentum: float, args: list, pending: list):
        self.training = training
        self.eps = eps
        self.momentum = momentum
        self.args = args
        self._pending = pending

    @staticmethod
    def prepare(bns: Sequence[nn.BatchNorm2d]) -> Optional["_FusedBN"]:
        first = bns[0]
        for bn in bns:
            if (bn.training != first.training or bn.eps != first.eps
                    or bn.track_running_stats != first.track_running_stats
                    or (bn.running_mean is None) != (first.running_mean is None)):
                return None
        factors = []
        for bn in bns:
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            factors.append(float(factor))
        updates_stats = first.training and first.running_mean is not None
        if not updates_stats or all(f == factors[0] for f in factors):
            return _FusedBN(first.training, first.eps, factors[0], list(bns), [])
        args, pending = [], []
        for bn, factor in zip(bns, factors):
            mean, var = bn.running_mean.detach().clone(), bn.running_var.detach().clone()
            args.append(BatchNormParams(bn.weight, bn.bias, mean, var))
            pending.append((bn, factor, mean, var))
        return _FusedBN(first.training, first.eps, 1.0, args, pending)

    def finish(self) -> None:
        with torch.no_grad():
            for bn, factor, batch_mean, batch_var in self._pending:
                bn.running_mean.mul_(1.0 - factor).add_(batch_mean, alpha=factor)
                bn.running_var.mul_(1.0 - factor).add_(batch_var, alpha=factor)


def _like(w: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A conv weight/bias in the input's dtype (differentiable cast; a no-op normally)."""
    if w is None or w.dtype == x.dtype:
        return w
    return w.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# eval-mode pointwise folding (issue #8)
# --------------------------------------------------------------------------------------------------
# Module-level switch (benchmarks compare before/after in one run; False = the PR-7 fused path).
FOLD_EVAL_POINTWISE = True

def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


_CL_GEMM_MAX_HW = 196  # channels_last inputs up to this many pixels per image use the GEMM (see below)


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1×1 conv (stride 1, no groups) with a 2-D ``[C_out, C_in]`` weight, as the fastest CPU kernel for the
    layout. Measured (2 cores, fp32, EMCAD-B2 shapes, min of rounds): channels_last at H·W <= 196 an ``addmm`` on
    the ``(N·H·W, C)`` view beats mkldnn's conv (512ch 7×7: 0.94 vs 1.28 ms), above it conv wins (64ch 56×56: 1.06
    vs 1.30 ms); NCHW at H·W >= 196 a batched ``matmul`` beats conv by up to 4.6× (64ch 56×56: 1.20 vs 5.51 ms),
    below it conv wins (512ch 7×7: 1.02 vs 1.42 ms). Output in ``x``'s memory format."""
    n, ci, h, w = x.shape
    co = weight.shape[0]
    if x.device.type == "cpu":
        if _is_channels_last(x) and h * w <= _CL_GEMM_MAX_HW:
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, ci)  # a view: no copy
            out = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
            return out.view(n, h, w, co).permute(0, 3, 1, 2)
        if x.is_contiguous() and h * w >= 196:
            out = torch.matmul(weight, x.view(n, ci, h * w))
            if bias is not None:
                out = out.add_(bias.view(1, co, 1))
            return out.view(n, co, h, w)
    return nn.functional.conv2d(x, weight.view(co, ci, 1, 1), bias)


def _foldable(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> bool:
    """An eval-mode 1×1 conv (+ BN with running statistics) that one folded GEMM can replace."""
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (0, 0) \
            or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    return bn is None or (not bn.training and bn.running_mean is not None and bn.running_var is not None)


class _FoldedPointwise:
    """The folded eval weights of one ``conv (1×1) → BN``: ``W' = W·γ/√(var+eps)`` and ``b' = β + (b - mean)·γ/
    √(var+eps)``, as a 2-D ``[C_out, C_in]`` weight, optionally with permuted input columns: with
    ``shuffle_groups`` the conv consumes the *unshuffled* input, ``W'[:, perm[o]] = W[:, o]`` for the shuffle's
    ``perm`` (:func:`shuffle_permutation`), so ``W' @ d == W @ channel_shuffle(d)`` up to summation order.

    Cached while gradients are off (inference): the key holds each source tensor's ``data_ptr``, ``_version``,
    dtype and device, so in-place updates (optimizer steps, ``load_state_dict``'s ``copy_``) and ``.to()``
    invalidate it. BN running statistics updated by a training-mode forward are caught through
    ``num_batches_tracked`` (see :meth:`get`); code that updates them with ``F.batch_norm(training=True)`` outside
    the module must call :func:`clear_fold_caches`. The sources are pinned (detached aliases) so that a freed
    parameter's address cannot be reused by a new one with the same version. With gradients on, the fold is
    recomputed on every call (it is differentiable, a few tiny ops) so that gradients reach the conv and BN
    parameters."""

    def __init__(self):
        self._key = None
        self._pins: tuple = ()
        self._value: Optional[tuple[Tensor, Optional[Tensor]]] = None

    @staticmethod
    def compute(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], dtype: torch.dtype,
                shuffle_groups: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
        w = conv.weight.reshape(conv.weight.shape[0], -1)
        b = conv.bias
        if bn is not None:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = bn.weight * scale
            shift = -bn.running_mean * scale if b is None else (b - bn.running_mean) * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            w, b = w * scale.to(w.dtype).unsqueeze(1), shift
        if shuffle_groups is not None:
            w = w[:, torch.argsort(shuffle_permutation(w.shape[1], shuffle_groups).to(w.device))]
        return w.to(dtype).contiguous(), (None if b is None else b.to(dtype))

    def get(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], x: Tensor,
            shuffle_groups: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
        sources = [t for t in (conv.weight, conv.bias) if t is not None]
        if bn is not None:
            # num_batches_tracked: the running statistics are updated inside the batch_norm kernel without a
            # version bump, but every training-mode nn.BatchNorm2d forward (and the fused blocks) add_(1) to it
            sources += [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
                        if t is not None]
        # compiling first: Dynamo cannot trace is_inference() (the compiled graph folds the weights itself)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)) \
                or any(t.is_inference() for t in sources):
            return self.compute(conv, bn, x.dtype, shuffle_groups)
        key = (x.dtype, torch.is_inference_mode_enabled(), None if bn is None else bn.eps, shuffle_groups,
               tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources))
        if key != self._key:
            with torch.no_grad():
                self._value = self.compute(conv, bn, x.dtype, shuffle_groups)
            self._key, self._pins = key, tuple(t.detach() for t in sources)
        return self._value


def _fold_cache(module: nn.Module, name: str) -> _FoldedPointwise:
    """The module's cache ``name`` (created lazily: modules unpickled from older versions lack it)."""
    cache = module.__dict__.get(name)
    if cache is None:
        cache = module.__dict__[name] = _FoldedPointwise()
    return cache


def clear_fold_caches(module: nn.Module) -> None:
    """Drop every cached folded weight under ``module`` (see :class:`_FoldedPointwise` for when this is needed)."""
    for m in module.modules():
        for name in [k for k, v in m.__dict__.items() if isinstance(v, _FoldedPointwise)]:
            del m.__dict__[name]


def shuffle_permutation(channels: int, groups: int) -> Tensor:
    """``perm`` with ``channel_shuffle(x, groups)[:, o] == x[:, perm[o]]``."""
    o = torch.arange(channels)
    return (o % groups) * (channels // groups) + o // groups


# --------------------------------------------------------------------------------------------------
# MSDC / MSCB / MSCBLayer
# --------------------------------------------------------------------------------------------------
class MSDC(BackendMixin, nn.Module):
    """Multi-scale depthwise convolution (EMCAD.md §2.3): one ``Conv2d(k, groups=C, no bias) → BN → act``
    branch per kernel size in ``dwconvs``. ``forward`` returns the list of branch outputs.

    Series mode (``dw_parallel=False``, ablation only) always runs the torch composition."""

    def __init__(self, in_channels: int, kernel_sizes: Sequence[int], stride: int, activation: str = "relu6",
                 dw_parallel: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.kernel_sizes = list(kernel_sizes)
        self.stride = stride
        self.activation = activation
        self.dw_parallel = dw_parallel
        if not self.kernel_sizes:
            raise ValueError("MSDC needs at least one kernel size")
        self.dwconvs = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(in_channels, in_channels, k, stride, k // 2, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                make_activation(activation),
            )
            for k in self.kernel_sizes
        ])
        init_decoder_weights(self)

    def _torch_branches(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for dwconv in self.dwconvs:
            out = dwconv(x)
            outputs.append(out)
            if not self.dw_parallel:
                x = x + out
        return outputs

    def _fusable(self) -> bool:
        return self.dw_parallel and not self._use_torch()

    def _fused(self, x: Tensor, combine: str, shuffle_groups: Optional[int],
               backend: Optional[str]) -> Optional[Tensor]:
        bn = _FusedBN.prepare([branch[1] for branch in self.dwconvs])
        if bn is None:
            return None
        y = emcad_kernels.multi_scale_dwconv(
            x, [_like(branch[0].weight, x) for branch in self.dwconvs], bn.args, activation=self.activation,
            combine=combine, shuffle_groups=shuffle_groups, stride=self.stride, training=bn.training,
            momentum=bn.momentum, eps=bn.eps, backend=backend)
        bn.finish()
        return y

    def forward(self, x: Tensor) -> list[Tensor]:
        if self._fusable():
            y = self._fused(x, "concat", None, self._kernel_backend())
            if y is not None:
                fmt = torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) and \
                    not y.is_contiguous() else torch.contiguous_format
                return [part.contiguous(memory_format=fmt) for part in y.chunk(len(self.dwconvs), dim=1)]
        return self._torch_branches(x)

    def combined(self, x: Tensor, add: bool = True, shuffle_groups: Optional[int] = None,
                 backend: Optional[str] = None) -> Tensor:
        """The branches summed (``add``) or concatenated, then channel-shuffled with ``shuffle_groups`` groups,
        as one fused ``multi_scale_dwconv`` call (``backend``: kernel backend name, None = automatic).

        Series mode (and BNs in mixed train/eval mode) fall back to the torch composition."""
        if self.dw_parallel:
            y = self._fused(x, "sum" if add else "concat", shuffle_groups, backend)
            if y is not None:
                return y
        outputs = self._torch_branches(x)
        d = reduce(torch.add, outputs) if add else torch.cat(outputs, dim=1)
        if shuffle_groups is not None and shuffle_groups != d.shape[1]:
            d = channel_shuffle(d, shuffle_groups)
        return d


class MSCB(BackendMixin, nn.Module):
    """Multi-scale convolution block (EMCAD.md §2.4):
    ``pconv1 (1×1 + BN + act) → MSDC → sum/concat → shuffle(gcd(combined, out_c)) → pconv2 (1×1 + BN)``,
    plus the residual when ``stride == 1`` (through ``conv1x1`` when ``in_c != out_c``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_sizes: Sequence[int] = (1, 3, 5),
                 expansion_factor: float = 2, dw_parallel: bool = True, add: bool = True, activation: str = "relu6"):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MSCB stride must be 1 or 2, got {stride}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.kernel_sizes = list(kernel_sizes)
        self.expansion_factor = expansion_factor
        self.dw_parallel = dw_parallel
        self.add = add
        self.activation = activation
        self.n_scales = len(self.kernel_sizes)
        self.use_skip_connection = stride == 1
        self.ex_channels = int(in_channels * expansion_factor)
        self.pconv1 = nn.Sequential(
            nn.Conv2d(in_channels, self.ex_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(self.ex_channels),
            make_activation(activation),
        )
        self.msdc = MSDC(self.ex_channels, self.kernel_sizes, stride, activation, dw_parallel)
        self.combined_channels = self.ex_channels if add else self.ex_channels * self.n_scales
        self.pconv2 = nn.Sequential(
            nn.Conv2d(self.combined_channels, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if self.use_skip_connection and in_channels != out_channels:
            self.conv1x1 = nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False)
        self.shuffle_groups = math.gcd(self.combined_channels, out_channels)
        init_decoder_weights(self)

    def _fold_eval(self) -> bool:
        """Eval-mode folding applies: fused backend, both pointwise convs foldable (see :class:`_FoldedPointwise`)
        and a known activation."""
        return (FOLD_EVAL_POINTWISE and not self._use_torch() and self.activation in INPLACE_ACTIVATIONS
                and _foldable(self.pconv1[0], self.pconv1[1]) and _foldable(self.pconv2[0], self.pconv2[1]))

    def _forward_folded(self, x: Tensor) -> Tensor:
        """Eval mode: pconv1 / pconv2 with BN folded into the weights, the channel shuffle folded into pconv2's
        input columns (MSDC runs without shuffle), the activation and the residual add in place.

        Measured against leaving each step separate (B2 shapes, 2 cores, min of rounds): BN folding removes one
        full pass per conv (pconv1 64ch 56×56 channels_last 1.80 → 1.06 ms); MSDC without shuffle is up to 10%
        faster (128ch 28×28 NCHW 1.98 → 1.79 ms, ties in channels_last); putting the residual into the GEMM
        (``addmm``/``baddbmm`` with the residual as input, then the bias) did not win (within ±5%, both signs), so
        the residual stays a separate in-place add."""
        w1, b1 = _fold_cache(self, "_fold_pconv1").get(self.pconv1[0], self.pconv1[1], x)
        p = INPLACE_ACTIVATIONS[self.activation](pointwise_conv(x, w1, b1))  # in place on a fresh output
        groups = None if self.shuffle_groups == self.combined_channels else self.shuffle_groups
        w2, b2 = _fold_cache(self, "_fold_pconv2").get(self.pconv2[0], self.pconv2[1], x, groups)
        d = self.msdc.combined(p, self.add, None, backend=self._kernel_backend())
        out = pointwise_conv(d, w2, b2)
        if self.use_skip_connection:
            res = x
            if hasattr(self, "conv1x1"):
                w, _ = _fold_cache(self, "_fold_conv1x1").get(self.conv1x1, None, x) \
                    if _foldable(self.conv1x1, None) else (None, None)
                res = self.conv1x1(x) if w is None else pointwise_conv(x, w, None)
            out = out.add_(res)
        return out

    def _pconv1_train(self, x: Tensor) -> Tensor:
        """Training-mode pconv1 whose BN + activation keeps only the conv output for backward (the activation
        output is kept by the MSDC op anyway): one expanded-channel tensor less per MSCB in the saved activations.
        Plain ``pconv1`` when it is not the stock conv → BatchNorm2d → activation (e.g. SyncBatchNorm)."""
        conv, bn, act = self.pconv1
        if type(bn) is not nn.BatchNorm2d or type(act) is not _ACTIVATION_TYPES.get(self.activation):
            return self.pconv1(x)
        fused = _FusedBN.prepare([bn])
        return batch_norm_act(conv(x), bn.weight, bn.bias, bn.running_mean, bn.running_var, fused.momentum, bn.eps,
                              self.activation)

    def forward(self, x: Tensor) -> Tensor:
        if self._fold_eval():
            return self._forward_folded(x)
        if self._use_torch() or not self.pconv1[1].training:
            p = self.pconv1(x)
        else:
            p = self._pconv1_train(x)
        groups = None if self.shuffle_groups == self.combined_channels else self.shuffle_groups
        if self._use_torch():
            outputs = self.msdc(p)
            d = reduce(torch.add, outputs) if self.add else torch.cat(outputs, dim=1)
            d = channel_shuffle(d, self.shuffle_groups)
        else:
            d = self.msdc.combined(p, self.add, groups, backend=self._kernel_backend())
        out = self.pconv2(d)
        if self.use_skip_connection:
            if hasattr(self, "conv1x1"):
                x = self.conv1x1(x)
            return x + out
        return out


class MSCBLayer(BackendMixin, nn.Sequential):
    """``n`` MSCBs in a ``Sequential`` (keys ``{i}.*``); blocks after the first are stride 1, ``out → out``."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, stride: int = 1,
                 kernel_sizes: Sequence[int] = (1, 3, 5), expansion_factor: float = 2, dw_parallel: bool = True,
                 add: bool = True, activation: str = "relu6"):
        if n < 1:
            raise ValueError(f"MSCBLayer needs n >= 1, got {n}")
        blocks = [MSCB(in_channels, out_channels, stride, kernel_sizes, expansion_factor, dw_parallel, add,
                       activation)]
        blocks += [MSCB(out_channels, out_channels, 1, kernel_sizes, expansion_factor, dw_parallel, add, activation)
                   for _ in range(1, n)]
        super().__init__(*blocks)


# --------------------------------------------------------------------------------------------------
# CAB / SAB
# --------------------------------------------------------------------------------------------------
class CAB(BackendMixin, nn.Module):
    """Channel attention (EMCAD.md §2.5). Returns the map ``sigmoid(mlp(avg) + mlp(max))`` of shape
    ``(B, out_channels, 1, 1)``; the caller multiplies. Plain PyTorch in every backend."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, ratio: int = 16,
                 activation: str = "relu"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        if in_channels < ratio:
            ratio = in_channels
        self.ratio = ratio
        self.reduced_channels = in_channels // ratio
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.activation_name = activation
        self.activation = make_activation(activation)
        self.fc1 = nn.Conv2d(in_channels, self.reduced_channels, 1, bias=False)
        self.fc2 = nn.Conv2d(self.reduced_channels, self.out_channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()
        init_decoder_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        avg_out = self.fc2(self.activation(self.fc1(self.avg_pool(x))))
        max_out = self.fc2(self.activation(self.fc1(self.max_pool(x))))
        return self.sigmoid(avg_out + max_out)


class SAB(BackendMixin, nn.Module):
    """Spatial attention (EMCAD.md §2.6): ``sigmoid(conv([mean_c(x), max_c(x)]))``, a ``(B, 1, H, W)`` map.
    Plain PyTorch in every backend."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if kernel_size not in (3, 7, 11):
            raise ValueError(f"SAB kernel_size must be 3, 7 or 11, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.sigmoid = nn.Sigmoid()
        init_decoder_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        return self.sigmoid(self.conv(torch.cat([avg_out, max_out], dim=1)))


def _backend_has_mscam(explicit: Optional[str], d: Tensor, cab: "CAB", sab: "SAB") -> bool:
    """False when the requested kernel backend (argument, ``use_backend`` or environment) cannot run this ``mscam``
    call (e.g. ``"cuda"``, which has no mscam kernel, or ``"cpu"`` with a GELU CAB): the attention then runs as the
    plain composition instead of failing. ``"auto"`` always can."""
    return emcad_kernels.can_run("mscam", d, _like(cab.fc1.weight, d), _like(cab.fc2.weight, d),
                                 _like(sab.conv.weight, d), activation=cab.activation_name, backend=explicit)


def apply_mscam_attention(d: Tensor, cab: CAB, sab: SAB) -> Tensor:
    """MSCAM's attention ``d · CAB(d) · SAB(d · CAB(d))``: the plain composition for ``backend="torch"`` (hooks see
    every submodule), otherwise one ``emcad_kernels.mscam`` call on the same weights (forward and analytic
    backward; on CPU tensors ``auto`` picks the cpu backend's fused kernel, csrc/cpu/mscam.cpp)."""
    if cab._use_torch() or sab._use_torch() or cab.out_channels != cab.in_channels or cab.fc1.bias is not None \
            or cab.fc2.bias is not None or sab.conv.bias is not None \
            or not _backend_has_mscam(cab._kernel_backend(), d, cab, sab):
        d = cab(d) * d
        return sab(d) * d
    return emcad_kernels.mscam(d, _like(cab.fc1.weight, d), _like(cab.fc2.weight, d), _like(sab.conv.weight, d),
                               activation=cab.activation_name, backend=cab._kernel_backend())


# --------------------------------------------------------------------------------------------------
# LGAG / EUCB
# --------------------------------------------------------------------------------------------------
class LGAG(BackendMixin, nn.Module):
    """Large-kernel grouped attention gate (EMCAD.md §2.8).

    ``forward(g, x)`` returns ``x · ψ`` with ``ψ = psi(act(W_g(g) + W_x(x)))`` (the original return value);
    ``forward(g, x, aggregate=True)`` returns EMCAD's aggregation ``g + x · ψ`` (fused: ``add_gate_input``)."""

    def __init__(self, F_g: int, F_l: int, F_int: int, kernel_size: int = 3, groups: int = 1,
                 activation: str = "relu"):
        super().__init__()
        if kernel_size == 1:
            groups = 1
        self.F_g, self.F_l, self.F_int = F_g, F_l, F_int
        self.kernel_size = kernel_size
        self.groups = groups
        self.activation_name = activation
        self.W_g = nn.Sequential(
            nn.Conv2d(F_g, F_int, kernel_size, 1, kernel_size // 2, groups=groups, bias=True),
            nn.BatchNorm2d(F_int),
        )
        self.W_x = nn.Sequential(
            nn.Conv2d(F_l, F_int, kernel_size, 1, kernel_size // 2, groups=groups, bias=True),
            nn.BatchNorm2d(F_int),
        )
        self.psi = nn.Sequential(
            nn.Conv2d(F_int, 1, 1, 1, 0, bias=True),
            nn.BatchNorm2d(1),
            nn.Sigmoid(),
        )
        self.activation = make_activation(activation)
        init_decoder_weights(self)

    def _torch(self, g: Tensor, x: Tensor) -> Tensor:
        psi = self.psi(self.activation(self.W_g(g) + self.W_x(x)))
        return x * psi

    def forward(self, g: Tensor, x: Tensor, aggregate: bool = False) -> Tensor:
        if not self._use_torch() and (not aggregate or g.shape[1] == x.shape[1]):
            bn = _FusedBN.prepare([self.W_g[1], self.W_x[1], self.psi[1]])
            if bn is not None:
                conv_g, conv_x, conv_psi = self.W_g[0], self.W_x[0], self.psi[0]
                out = emcad_kernels.grouped_attention_gate(
                    g, x, _like(conv_g.weight, x), _like(conv_g.bias, x), bn.args[0],
                    _like(conv_x.weight, x), _like(conv_x.bias, x), bn.args[1],
                    _like(conv_psi.weight, x), _like(conv_psi.bias, x), bn.args[2],
                    groups=self.groups, add_gate_input=aggregate, activation=self.activation_name,
                    training=bn.training, momentum=bn.momentum, eps=bn.eps, backend=self._kernel_backend())
                bn.finish()
                return out
        out = self._torch(g, x)
        return g + out if aggregate else out


class EUCB(BackendMixin, nn.Module):
    """Efficient up-convolution block (EMCAD.md §2.9):
    ``up_dwc = [Upsample(×2, nearest), depthwise k×k (no bias), BN, act]`` → identity shuffle →
    ``pwc = [1×1 + bias]``.

    Stride 1 and padding ``k // 2`` (the original's ``stride = k // 2`` is not reproduced). The fused path runs
    ``up_dwc`` as one ``upsample_dwconv`` call and drops the identity shuffle."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 activation: str = "relu"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.activation = activation
        self.up_dwc = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, in_channels, kernel_size, stride, kernel_size // 2, groups=in_channels,
                      bias=False),
            nn.BatchNorm2d(in_channels),
            make_activation(activation),
        )
        self.pwc = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=True))
        init_decoder_weights(self)

    def _fusable(self) -> bool:
        up = self.up_dwc[0]
        scale = up.scale_factor
        return (not self._use_torch() and self.stride == 1 and up.size is None and up.mode in ("nearest", "bilinear")
                and not (up.mode == "bilinear" and up.align_corners) and float(scale) == int(scale))

    def forward(self, x: Tensor) -> Tensor:
        if self._fusable():
            bn = _FusedBN.prepare([self.up_dwc[2]])
            if bn is not None:
                up = self.up_dwc[0]
                y = emcad_kernels.upsample_dwconv(
                    x, _like(self.up_dwc[1].weight, x), bn.args[0], scale=int(up.scale_factor), mode=up.mode,
                    activation=self.activation, training=bn.training, momentum=bn.momentum, eps=bn.eps,
                    backend=self._kernel_backend())
                bn.finish()
                pwc = self.pwc[0]
                if FOLD_EVAL_POINTWISE and not self.training and _foldable(pwc, None):
                    # no BN to fold: only the faster GEMM form of the 1×1 conv (see pointwise_conv)
                    w, b = _fold_cache(self, "_fold_pwc").get(pwc, None, y)
                    return pointwise_conv(y, w, b)
                return self.pwc(y)
        x = self.up_dwc(x)
        x = channel_shuffle(x, self.in_channels)
        return self.pwc(x)

