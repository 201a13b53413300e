"""emcad-kernels: fused multi-scale depthwise ops for EMCAD-style decoders.

Public API:

* ``multi_scale_dwconv``, ``upsample_dwconv``, ``grouped_attention_gate``, ``mscam``: the fused ops
  (``functional.py``);
* ``mutation_stats``, ``mutation_loss``: the fused MUTATION deep-supervision loss (``functional.py``);
* ``BatchNormParams``: BatchNorm state passed as explicit tensors;
* ``use_backend``, ``available_backends``, ``registered_backends``, ``explain``: backend control
  (``backends.py``; environment variable ``EMCAD_KERNELS_BACKEND``).
"""

from . import _reference_backend  # noqa: F401  (registers the reference backend)
from . import _cpu_backend  # noqa: F401  (registers the cpu backend; needs the built C++ extension)
from . import _cuda_backend  # noqa: F401  (registers the cuda backend; needs the built CUDA extension)
from . import _triton_backend  # noqa: F401  (registers the triton backend; imports triton lazily)
from .backends import (BackendUnavailableError, available_backends, registered_backends, use_backend)
from .functional import (ACTIVATIONS, BatchNormParams, dilated_dwconv_groupnorm, explain, grouped_attention_gate,
                         layernorm_dilated_dwconv, mscam, multi_scale_dwconv, mutation_loss, mutation_stats,
                         upsample_dwconv)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "BatchNormParams", "BackendUnavailableError", "available_backends", "dilated_dwconv_groupnorm",
    "explain", "layernorm_dilated_dwconv",
    "grouped_attention_gate", "mscam", "multi_scale_dwconv", "mutation_loss", "mutation_stats", "registered_backends",
    "upsample_dwconv", "use_backend",
]
