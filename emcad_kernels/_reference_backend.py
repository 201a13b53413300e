"""Registers the pure-PyTorch reference backend: runs every call, on every device and dtype."""

from __future__ import annotations

from . import reference
from .backends import Backend, OpCall, register_backend
from .library import Kernels, define_op_set

REFERENCE_KERNELS = Kernels(
    msdc_forward=reference.msdc_forward, msdc_backward=reference.msdc_backward,
    updw_forward=reference.updw_forward, updw_backward=reference.updw_backward,
    lgag_forward=reference.lgag_forward, lgag_backward=reference.lgag_backward,
    lndw_forward=reference.lndw_forward, lndw_backward=reference.lndw_backward,
    dwgn_forward=reference.dwgn_forward, dwgn_backward=reference.dwgn_backward,
    mscam_forward=reference.mscam_forward, mscam_backward=reference.mscam_backward,
    mutation_stats_forward=reference.mutation_stats_forward,
    mutation_stats_backward=reference.mutation_stats_backward,
)


def _supports_everything(call: OpCall) -> list[str]:
    return []


register_backend(Backend(
    name="reference", priority=0, load=lambda: define_op_set("reference", REFERENCE_KERNELS),
    check=_supports_everything, description="pure PyTorch compositions (oracle and fallback)"), load_now=True)
