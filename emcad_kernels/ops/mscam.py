"""``mscam``: EMCAD's channel then spatial attention (CAB, SAB) applied as ``d · ca · sa`` in one op
(docs/kernels.md#mscam).

Read top to bottom: the public function, its argument checks, the op descriptor. Kernels:
``reference.mscam_forward/backward``, ``csrc/cpu/mscam.cpp``, ``triton/mscam.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import flops, reference
from ..backends import register_op, run
from ..descriptor import Call, OpDescriptor, Support
from ..testing import ExampleInputs
from ._args import check_activation, check_input, check_like, check_tensor, dense_grad, empty_like_output
from .msdc import CPU_ACTIVATIONS


def mscam(x: Tensor, cab_fc1: Tensor, cab_fc2: Tensor, sab_weight: Tensor, *, activation: str = "relu",
          backend: Optional[str] = None) -> Tensor:
    """EMCAD's channel then spatial attention applied to ``x`` (the attention part of MSCAM):
    ``ca = σ(fc2(act(fc1(avgpool(x)))) + fc2(act(fc1(maxpool(x)))))`` (CAB, ``(N, C, 1, 1)``),
    ``d1 = ca · x``, ``sa = σ(conv_k([mean_c(d1), max_c(d1)]))`` (SAB, ``(N, 1, H, W)``, padding ``k // 2``, no
    bias) and returns ``d1 · sa`` in ``x``'s memory format. ``cab_fc1`` is ``[R, C, 1, 1]``, ``cab_fc2``
    ``[C, R, 1, 1]`` (no biases), ``sab_weight`` ``[1, 2, k, k]`` with odd ``k``. Differentiable in ``x`` and
    all three weights."""
    return run(prepare(x, cab_fc1, cab_fc2, sab_weight, activation=activation), backend)


class MscamAttrs(NamedTuple):
    activation: str
    kernel_size: int


def prepare(x, cab_fc1, cab_fc2, sab_weight, *, activation="relu") -> Call:
    check_input("x", x)
    c = x.shape[1]
    check_activation(activation)
    for name, t in (("cab_fc1", cab_fc1), ("cab_fc2", cab_fc2), ("sab_weight", sab_weight)):
        check_tensor(name, t, 4)
        check_like(name, t, x)
    r = cab_fc1.shape[0]
    if tuple(cab_fc1.shape) != (r, c, 1, 1) or r < 1:
        raise ValueError(f"cab_fc1 must have shape [R, {c}, 1, 1] (a 1×1 conv from the {c} input channels), got "
                         f"{tuple(cab_fc1.shape)}")
    if tuple(cab_fc2.shape) != (c, r, 1, 1):
        raise ValueError(f"cab_fc2 must have shape [{c}, {r}, 1, 1] (back to the {c} input channels), got "
                         f"{tuple(cab_fc2.shape)}")
    k = sab_weight.shape[-1]
    if sab_weight.shape[:2] != (1, 2) or sab_weight.shape[2] != k or k % 2 == 0:
        raise ValueError(f"sab_weight must have shape [1, 2, k, k] with odd k, got {tuple(sab_weight.shape)}")
    return Call(MSCAM, (x, cab_fc1, cab_fc2, sab_weight, activation), x.device.type, x.dtype,
                MscamAttrs(activation, int(k)))


# --------------------------------------------------------------------------------------------------
# kernel ops: schema, fake, autograd, FLOPs
# --------------------------------------------------------------------------------------------------
FORWARD_SCHEMA = "(Tensor x, Tensor fc1, Tensor fc2, Tensor sab_weight, str activation) -> Tensor"
# returns (grad x, grad fc1, grad fc2, grad sab_weight)
BACKWARD_SCHEMA = ("(Tensor grad, Tensor x, Tensor fc1, Tensor fc2, Tensor sab_weight, str activation) "
                   "-> (Tensor, Tensor, Tensor, Tensor)")


def _fake_forward(x, fc1, fc2, sab_weight, activation):
    return empty_like_output(x, x.shape)


def _fake_backward(grad, x, fc1, fc2, sab_weight, activation):
    return (empty_like_output(x, x.shape), torch.empty_like(fc1), torch.empty_like(fc2), torch.empty_like(sab_weight))


def _setup_context(ctx, inputs, output):
    x, fc1, fc2, sab_weight, activation = inputs
    ctx.save_for_backward(x, fc1, fc2, sab_weight)  # the backward recomputes the attention maps
    ctx.activation = activation


def _backward(backward_op, ctx, grad):
    x, fc1, fc2, sab_weight = ctx.saved_tensors
    grads = backward_op(dense_grad(grad, x), x, fc1, fc2, sab_weight, ctx.activation)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) + (None,)


def _convs(x, fc1, fc2, sab_weight):
    """(input, weight, output) of the plain modules' convolutions: fc1 and fc2 on the average and the max pooled
    vectors (4 convs), then the SAB conv on the 2-channel map."""
    n, c, h, w = x
    r = fc1[0]
    return [([n, c, 1, 1], fc1, [n, r, 1, 1])] * 2 + [([n, r, 1, 1], fc2, [n, fc2[0], 1, 1])] * 2 + \
        [([n, 2, h, w], sab_weight, [n, 1, h, w])]


def _flops_forward(x, fc1, fc2, sab_weight, activation, out_shape=None, **kwargs):
    return sum(flops.conv_forward(*conv) for conv in _convs(x, fc1, fc2, sab_weight))


def _flops_backward(grad, x, fc1, fc2, sab_weight, activation, out_shape=None, **kwargs):
    return sum(flops.conv_backward(*conv, 1, 1) for conv in _convs(x, fc1, fc2, sab_weight))


# --------------------------------------------------------------------------------------------------
# what each backend's kernels cover (cuda: none)
# --------------------------------------------------------------------------------------------------
def _cpu(call: Call) -> list[str]:
    a = call.attrs
    reasons = [f"SAB kernel size {a.kernel_size} is not supported (odd sizes up to 9)"] if a.kernel_size > 9 else []
    if a.activation not in CPU_ACTIVATIONS:
        reasons.append(f"activation {a.activation} is not supported ({', '.join(CPU_ACTIVATIONS)})")
    return reasons


def _triton(call: Call) -> list[str]:
    # the SAB window's k columns are unrolled at compile time in three kernels; EMCAD uses k = 7
    k = call.attrs.kernel_size
    return [f"SAB kernel size {k} is not supported (odd sizes up to 11)"] if k > 11 else []


def _examples(device, dtype) -> list:
    """EMCAD's attention (reduction 4, SAB 7x7); channels_last with a 3x3 SAB and one hidden channel."""
    t = ExampleInputs(device, dtype, seed=13)
    return [((t.randn(2, 8, 7, 5), t.randn(2, 8, 1, 1, scale=0.5), t.randn(8, 2, 1, 1, scale=0.5),
              t.randn(1, 2, 7, 7, scale=0.2)), dict(activation="relu")),
            ((t.randn(1, 6, 5, 9, channels_last=True), t.randn(1, 6, 1, 1, scale=0.5), t.randn(6, 1, 1, 1, scale=0.5),
              t.randn(1, 2, 3, 3, scale=0.3)), dict(activation="relu"))]


MSCAM = register_op(OpDescriptor(
    name="mscam", kernel="mscam", forward_schema=FORWARD_SCHEMA, backward_schema=BACKWARD_SCHEMA, prepare=prepare,
    fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    flops_forward=_flops_forward, flops_backward=_flops_backward,
    reference=(reference.mscam_forward, reference.mscam_backward), examples=_examples,
    support={"cpu": Support(_cpu),
             "triton": Support(_triton, kernels=("emcad_kernels.triton.mscam", "mscam_forward", "mscam_backward"))}))
