"""EMCAD (Rahman et al., CVPR 2024) re-implemented on top of the ``emcad_kernels`` fused ops.

Public API: :func:`create_model`, :func:`list_models`, :class:`EMCAD` (decoder), :class:`EMCADNet` (full network),
:func:`save_pretrained` / :func:`from_pretrained`, :func:`load_original_checkpoint` (SLDGroup/EMCAD ``.pth``
files), :func:`export_model` (ONNX / AOTInductor ``.pt2``) and :func:`set_backend` (``"torch"``, ``"auto"`` or an
``emcad_kernels`` backend on every block).
"""

from .checkpoint import CheckpointError, ConversionReport, load_original_checkpoint
from .export import export_model
from .models import EMCAD, EMCADNet, create_model, from_pretrained, list_models, save_pretrained, set_backend

__all__ = [
    "CheckpointError", "ConversionReport", "EMCAD", "EMCADNet", "create_model", "export_model", "from_pretrained",
    "list_models", "load_original_checkpoint", "save_pretrained", "set_backend",
]
