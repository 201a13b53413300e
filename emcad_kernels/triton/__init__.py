"""Triton backend of the fused ops: one module per op (``msdc``, ``updw``, ``lgag``, the EGE-UNet / MALUNet
multi-dilation ops ``lndw`` and ``dwgn``, ``mscam``, and ``mutation_loss``, the statistics of the fused MUTATION
loss). Each module's ``<op>_forward`` / ``<op>_backward`` implement the kernel-op schemas of the op's descriptor
(``emcad_kernels/ops/<op>.py``, whose ``Support`` entry names them). Shared helpers: ``_utils`` (interpreter
detection, autotuning policy, activations) and ``_reduce`` (deterministic reductions of per-program partials:
BatchNorm statistics, weight and parameter gradients).

Importing this package imports ``triton``; the op layer does that on the first Triton call, so
``import emcad_kernels`` works without triton. On CPU the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the kernel modules are imported); ``INTERPRET`` says whether they were
decorated for it.
"""

from ._utils import ACTIVATION_CODES, INTERPRET, SUPPORTED_DTYPES

__all__ = ["ACTIVATION_CODES", "INTERPRET", "SUPPORTED_DTYPES"]
