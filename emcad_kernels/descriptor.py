"""The op descriptor: everything the package knows about one fused op, in one place (docs/op_layer.md).

An ``OpDescriptor`` holds, for one op:

* the schemas of its two kernel ops, ``<kernel>_fwd`` and ``<kernel>_bwd`` (every backend implements exactly these:
  the C++ kernels of the cpu and cuda backends, the Triton kernels, the pure-PyTorch reference);
* ``prepare``: the public function's argument checks, turning user arguments into a ``Call`` (the kernel op's
  arguments, plus the static facts backends decide on);
* the fake (meta) functions, the autograd formula and the FLOP formulas of the kernel ops;
* per backend, what its kernels support (``Support.check`` returns the reasons a call cannot run there).

``define_kernel_ops`` turns a descriptor into torch ops. Every backend gets the same schema: the C++ backends share
``emcad_kernels::<kernel>_fwd`` (the extensions register CPU and CUDA kernels for it with ``TORCH_LIBRARY_IMPL``);
the Python-implemented backends get ``emcad_kernels::<kernel>_fwd_<backend>``. Registration, ``explain``,
``can_run`` and the models' choices all read the descriptors; nothing else describes an op.
"""

from __future__ import annotations

import contextvars
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.utils.flop_counter import register_flop_formula

NAMESPACE = "emcad_kernels"


@dataclass(frozen=True, eq=False)
class Call:
    """One validated call of an op: the forward kernel op's arguments and what backends decide on.

    ``attrs`` (a NamedTuple of the op) holds every static fact a backend's ``Support.check`` may read (kernel sizes,
    activation, ...); together with the device and dtype it is the key under which a backend choice is cached, so
    checks must not look at anything else. ``finish`` turns the forward op's results into the public result
    (e.g. updates BatchNorm running statistics and drops them)."""

    op: "OpDescriptor"
    args: tuple
    device: str
    dtype: torch.dtype
    attrs: tuple = ()
    finish: Optional[Callable[[Any], Any]] = None

    @property
    def key(self) -> tuple:
        return self.op.name, self.device, self.dtype, self.attrs


@dataclass(frozen=True)
class Support:
    """What one backend's kernels cover for an op.

    ``check(call)`` returns the reasons they cannot run ``call`` (empty: they can); device and dtype limits common
    to the whole backend are checked by the backend itself. ``kernels`` names Python kernels as ``(module,
    forward function, backward function)``, imported on first use; ``None`` means the C++ kernel ops."""

    check: Callable[[Call], list[str]] = lambda call: []
    kernels: Optional[tuple[str, str, str]] = None


class KernelOps(NamedTuple):
    """The torch ops of one implementation of an op."""

    forward: Any
    backward: Any


@dataclass(eq=False)
class OpDescriptor:
    name: str  # public function name, e.g. "multi_scale_dwconv"
    kernel: str  # stem of the kernel op names, e.g. "msdc" -> emcad_kernels::msdc_fwd
    forward_schema: str  # "(Tensor x, ...) -> (...)"
    backward_schema: str
    prepare: Callable[..., Call]  # the public function's arguments (without ``backend``) -> Call
    fake_forward: Callable
    fake_backward: Callable
    setup_context: Callable  # (ctx, inputs, output): what autograd keeps for the backward
    backward: Callable  # (backward_op, ctx, *grads) -> gradients of the forward op's inputs
    flops_forward: Callable  # FlopCounterMode formulas (FLOPs = 2 x MACs, like the plain modules)
    flops_backward: Callable
    reference: tuple[Callable, Callable]  # the pure-PyTorch kernels (oracle and fallback)
    support: dict[str, Support] = field(default_factory=dict)  # backend name -> what its kernels cover
    fvcore: Optional[Callable] = None  # fvcore handle (MACs) for the forward op
    # small public-function calls for checks: (device, dtype) -> [(args, kwargs), ...], odd shapes, deterministic
    # values (testing.ExampleInputs); the tensors whose gradients are checked require grad (emcad selftest, tests)
    examples: Optional[Callable[[Any, torch.dtype], list[tuple[tuple, dict]]]] = None
    _ops: dict = field(default_factory=dict, repr=False)

    def op_name(self, direction: str, suffix: str = "") -> str:
        return f"{self.kernel}_{direction}" + (f"_{suffix}" if suffix else "")

    def kernel_ops(self, suffix: str = "", namespace: str = NAMESPACE) -> KernelOps:
        """The torch ops of one implementation (defined on first use; see ``define_kernel_ops``)."""
        key = (namespace, suffix)
        if key not in self._ops:
            raise KeyError(f"{namespace}::{self.op_name('fwd', suffix)} is not defined")
        return self._ops[key]


# True while ``auto`` runs a fused kernel (set by ``backends.run``): a failing kernel may then fall back to the reference
# kernels, in the forward (``backends.run``) and in the backward (the autograd formula below). Explicit requests raise.
AUTO_FALLBACK = contextvars.ContextVar("emcad_kernels_auto_fallback", default=False)
_failed_backwards: set = set()  # (namespace, kernel op) whose backward failed once: go straight to the reference


def is_kernel_failure(error: BaseException) -> bool:
    """Whether an exception from a fused kernel means "this kernel cannot run here" (a compile error, a launch
    failure) rather than something no other backend would fix."""
    return isinstance(error, Exception) and not isinstance(error, torch.OutOfMemoryError)


def warn_fallback(what: str, error: BaseException) -> None:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    warnings.warn(f"emcad_kernels: {what} failed ({type(error).__name__}: {first_line}); falling back to another "
                  f"backend for this call signature", RuntimeWarning, stacklevel=4)


# One FRAGMENT library per namespace for every definition; kept alive for the life of the process.
_LIBRARIES: dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def _lazy(module: str, function: str) -> Callable:
    """A kernel imported on first call (Triton kernels import triton, a large package)."""
    resolved: list[Callable] = []

    def kernel(*args):
        if not resolved:
            resolved.append(getattr(importlib.import_module(module), function))
        return resolved[0](*args)

    kernel.__name__ = function
    return kernel


def define_kernel_ops(op: OpDescriptor, suffix: str = "", kernels: Optional[tuple[Callable, Callable]] = None,
                      namespace: str = NAMESPACE) -> KernelOps:
    """Defines ``<namespace>::<kernel>_fwd[_<suffix>]`` and ``..._bwd[...]`` from the descriptor's schemas, with
    fake functions, autograd and FLOP formulas. ``kernels``: the Python forward/backward implementing them (for
    every device); ``None``: the kernels are C++ (registered by a compiled extension for its dispatch keys)."""
    key = (namespace, suffix)
    if key in op._ops:
        return op._ops[key]
    lib = _library(namespace)
    names = op.op_name("fwd", suffix), op.op_name("bwd", suffix)
    for name, schema in zip(names, (op.forward_schema, op.backward_schema)):
        lib.define(name + schema)
    if kernels is not None:
        for name, kernel in zip(names, kernels):
            lib.impl(name, kernel, "CompositeExplicitAutograd")
    qualified = [f"{namespace}::{name}" for name in names]
    torch.library.register_fake(qualified[0], op.fake_forward, lib=lib)
    torch.library.register_fake(qualified[1], op.fake_backward, lib=lib)
    packets = getattr(torch.ops, namespace)
    forward, backward = getattr(packets, names[0]), getattr(packets, names[1])

    fallback_possible = suffix != "reference"

    def setup_context(ctx, inputs, output):
        op.setup_context(ctx, inputs, output)
        ctx.fallback = fallback_possible and AUTO_FALLBACK.get()

    def autograd_backward(ctx, *grads):
        if not ctx.fallback:
            return op.backward(backward, ctx, *grads)
        reference = define_kernel_ops(op, "reference", op.reference).backward
        if qualified[1] in _failed_backwards:
            return op.backward(reference, ctx, *grads)
        try:
            return op.backward(backward, ctx, *grads)
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_kernel_failure(e):
                raise
            _failed_backwards.add(qualified[1])
            warn_fallback(f"the backward kernel {qualified[1]}", e)
            return op.backward(reference, ctx, *grads)

    torch.library.register_autograd(qualified[0], autograd_backward, setup_context=setup_context, lib=lib)
    register_flop_formula(forward)(op.flops_forward)
    register_flop_formula(backward)(op.flops_backward)
    op._ops[key] = KernelOps(forward, backward)
    return op._ops[key]


def define_python_kernel_ops(op: OpDescriptor, backend: str) -> KernelOps:
    """The ops of a Python-implemented backend: the descriptor's reference kernels for ``"reference"``, else the
    kernels its ``Support`` entry names (imported on first call)."""
    if backend == "reference":
        return define_kernel_ops(op, "reference", op.reference)
    module, forward, backward = op.support[backend].kernels
    return define_kernel_ops(op, backend, (_lazy(module, forward), _lazy(module, backward)))
