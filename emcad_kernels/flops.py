"""FLOP accounting for the fused ops, so fused models count what the plain ones count.

* ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 × MACs, BatchNorm and activations not counted): every
  op descriptor registers a formula for its forward and backward kernel ops (``ops/<op>.py``, built on the helpers
  below). Both delegate to torch's own convolution formulas for the convolutions the op fuses, so fused and plain
  modules count the same, in forward and in backward (assuming, as in training, that input and weight gradients
  are both needed).
* fvcore (which counts MACs, through TorchScript tracing): ``fvcore_handles()`` maps the forward kernel ops to
  handles; pass it as ``FlopCountAnalysis(model, inputs).set_op_handle(**fvcore_handles())``. Only convolution MACs
  are counted, like fvcore does for the plain convolutions.
"""

from __future__ import annotations

from typing import Sequence

from torch.utils.flop_counter import conv_backward_flop, conv_flop_count


def prod(*xs: int) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


def conv_forward(x_shape, w_shape, out_shape) -> int:
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def conv_backward(x_shape, w_shape, out_shape, stride, groups) -> int:
    """What FlopCounterMode counts for the ``aten.convolution_backward`` of the plain module (input and weight
    gradients), computed by torch's own formula so that fused and plain counts agree exactly."""
    k = w_shape[-1]
    return conv_backward_flop(list(out_shape), list(x_shape), list(w_shape), None, [stride] * 2, [k // 2] * 2,
                              [1, 1], False, [0, 0], groups, [True, True, False],
                              out_val=(list(x_shape), list(w_shape), None))


def dilated_conv_backward(x_shape, w_shape, out_shape, dilation) -> int:
    """FlopCounterMode's count for ``aten.convolution_backward`` of a same-size depthwise conv with bias (input,
    weight and bias gradients requested, as the plain module does in training)."""
    pad = dilation * (w_shape[-1] // 2)
    return conv_backward_flop(list(out_shape), list(x_shape), list(w_shape), None, [1, 1], [pad, pad],
                              [dilation, dilation], False, [0, 0], w_shape[0], [True, True, True],
                              out_val=(list(x_shape), list(w_shape), [w_shape[0]]))


def conv_macs(out_shape: Sequence[int], w_shape: Sequence[int]) -> int:
    """MACs of a convolution: output elements × input channels per group × kernel taps (biases not counted)."""
    return prod(*out_shape, *w_shape[1:])


# --------------------------------------------------------------------------------------------------
# fvcore handles (MACs)
# --------------------------------------------------------------------------------------------------
def jit_shape(value) -> list[int]:
    return value.type().sizes()


def jit_list_shapes(value) -> list[list[int]]:
    """Shapes of the tensors of a traced ``Tensor[]`` argument."""
    return [jit_shape(v) for v in value.node().inputs()]


def fvcore_handles() -> dict:
    """``{qualified forward op name: handle}`` for every defined kernel op of every op with an fvcore handle."""
    from .backends import registered_ops

    handles = {}
    for op in registered_ops().values():
        if op.fvcore is None:
            continue
        for namespace, suffix in op._ops:
            handles[f"{namespace}::{op.op_name('fwd', suffix)}"] = op.fvcore
    return handles
