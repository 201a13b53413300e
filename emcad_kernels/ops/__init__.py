"""The fused ops, one module each: public function, argument checks and descriptor (docs/op_layer.md).

Importing this package registers every op (``backends.register_op``), which defines its kernel ops for every
backend. The public functions are re-exported by ``emcad_kernels``.
"""

from . import lgag, mscam, msdc, multidilation, mutation_loss, token_dwconv_gelu, updw  # noqa: F401

__all__ = ["lgag", "mscam", "msdc", "multidilation", "mutation_loss", "token_dwconv_gelu", "updw"]
