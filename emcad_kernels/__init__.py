"""emcad-kernels: fused multi-scale depthwise ops for EMCAD-style decoders.

Public API:

* ``multi_scale_dwconv``, ``upsample_dwconv``, ``grouped_attention_gate``, ``mscam``, ``mutation_stats``,
  ``mutation_loss``, ``layernorm_dilated_dwconv``, ``dilated_dwconv_groupnorm``, ``token_dwconv_gelu`` (PVTv2's
  Mix-FFN middle): the fused ops (``ops/``, one file each);
* ``BatchNormParams``: BatchNorm state passed as explicit tensors;
* ``use_backend``, ``available_backends``, ``registered_backends``, ``explain``, ``can_run``: backend control
  (``backends.py``; environment variable ``EMCAD_KERNELS_BACKEND``).

How an op is put together: docs/op_layer.md.
"""

from .backends import (BackendUnavailableError, available_backends, can_run, explain, registered_backends,
                       use_backend)
from .ops.lgag import grouped_attention_gate
from .ops.mscam import mscam
from .ops.msdc import multi_scale_dwconv
from .ops.multidilation import dilated_dwconv_groupnorm, layernorm_dilated_dwconv
from .ops.mutation_loss import mutation_loss, mutation_stats
from .ops.token_dwconv_gelu import token_dwconv_gelu
from .ops.updw import upsample_dwconv
from .ops._args import ACTIVATIONS, BatchNormParams

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "BatchNormParams", "BackendUnavailableError", "available_backends", "can_run",
    "dilated_dwconv_groupnorm", "explain", "grouped_attention_gate", "layernorm_dilated_dwconv", "mscam",
    "multi_scale_dwconv", "mutation_loss", "mutation_stats", "registered_backends", "token_dwconv_gelu",
    "upsample_dwconv", "use_backend",
]
