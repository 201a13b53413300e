"""Triton backend of the fused ops: one module per op (``msdc``, ``updw``, ``lgag``, and the EGE-UNet / MALUNet
multi-dilation ops ``lndw`` and ``dwgn``, ``mscam``, EMCAD's CAB · SAB attention, and ``mutation_loss``, the
statistics of the fused MUTATION loss), shared helpers in
``_utils`` (interpreter detection, autotuning policy, activations) and ``_reduce`` (deterministic reductions of
per-program partials: BatchNorm statistics, weight and parameter gradients).

Importing this package imports ``triton``; ``emcad_kernels._triton_backend`` does that lazily, the first time
the backend is considered, so ``import emcad_kernels`` works without triton. ``KERNELS`` implements the kernel
interface of ``emcad_kernels.library``.

On CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this package is
imported); ``INTERPRET`` says whether they were decorated for it.
"""

from __future__ import annotations

from ..library import Kernels
from . import dwgn, lgag, lndw, msdc, mscam, mutation_loss, updw
from ._utils import ACTIVATION_CODES, INTERPRET, SUPPORTED_DTYPES


KERNELS = Kernels(
    msdc_forward=msdc.msdc_forward, msdc_backward=msdc.msdc_backward,
    updw_forward=updw.updw_forward, updw_backward=updw.updw_backward,
    lgag_forward=lgag.lgag_forward, lgag_backward=lgag.lgag_backward,
    lndw_forward=lndw.lndw_forward, lndw_backward=lndw.lndw_backward,
    dwgn_forward=dwgn.dwgn_forward, dwgn_backward=dwgn.dwgn_backward,
    mscam_forward=mscam.mscam_forward, mscam_backward=mscam.mscam_backward,
    mutation_stats_forward=mutation_loss.mutation_stats_forward,
    mutation_stats_backward=mutation_loss.mutation_stats_backward,
)

IMPLEMENTED_OPS = ("multi_scale_dwconv", "upsample_dwconv", "grouped_attention_gate", "layernorm_dilated_dwconv",
                   "dilated_dwconv_groupnorm", "mscam", "mutation_stats")

__all__ = ["ACTIVATION_CODES", "IMPLEMENTED_OPS", "INTERPRET", "KERNELS", "SUPPORTED_DTYPES"]
