"""Backends: which kernels run a call, and why the others cannot (docs/op_layer.md#choosing-a-backend).

A backend is a set of kernels plus the limits common to all its ops (devices, dtypes, whether it is usable on this
machine at all); what its kernels cover for each op is declared by the op's descriptor (``OpDescriptor.support``).
Selection order:

1. the ``backend=`` argument of a call (or of a module),
2. the innermost ``use_backend(...)`` context,
3. the ``EMCAD_KERNELS_BACKEND`` environment variable,
4. ``"auto"``: the usable backend with the highest priority whose kernels cover the call.

An explicitly requested backend that cannot run a call raises ``BackendUnavailableError`` with the reasons; ``auto``
always finds one because ``reference`` runs everything. ``explain(...)`` shows the decision, ``can_run(...)`` asks
it. Decisions are cached per call signature (op, device, dtype, the op's static attributes).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch

from . import _ext
from .descriptor import (AUTO_FALLBACK, NAMESPACE, Call, KernelOps, OpDescriptor, define_kernel_ops,
                         define_python_kernel_ops, is_kernel_failure, warn_fallback)

ENV_VAR = "EMCAD_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run a call; the message lists why."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(eq=False)
class Backend:
    """A set of kernels and the limits shared by all its ops.

    ``load`` raises ImportError/RuntimeError/OSError saying why the backend is unusable on this machine (extension
    not built, no triton, ...); it runs once, lazily. ``dispatch_key`` marks C++ kernels: the shared ops
    ``<namespace>::<kernel>_fwd`` implemented by an extension for that dispatch key. Otherwise the kernels are
    Python functions named by the descriptors' ``Support`` entries. ``support`` names the descriptors' ``Support``
    entry this backend uses (default: its own name); ``"reference"`` means the descriptors' reference kernels, which
    cover everything."""

    name: str
    priority: int
    description: str
    devices: Optional[tuple[str, ...]]  # device types it accepts; None: any
    dtypes: tuple[torch.dtype, ...]
    load: Callable[[], Any] = lambda: None
    dispatch_key: Optional[str] = None
    namespace: str = NAMESPACE
    support: str = ""
    device_hint: str = ""  # why a device is missing, appended to the device reason
    # why ``auto`` must not pick this backend for a call it could run when asked (e.g. the Triton interpreter on CPU)
    auto_skip: Callable[[Call], Optional[str]] = lambda call: None
    _load_error: Optional[str] = field(default=None, repr=False)
    _loaded: bool = field(default=False, repr=False)

    @property
    def support_name(self) -> str:
        return self.support or self.name

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run anything on this machine (None: it can)."""
        if not self._loaded:
            self._loaded = True
            try:
                self.load()
            except (ImportError, RuntimeError, OSError) as e:  # the reason becomes user-visible
                self._load_error = str(e) or type(e).__name__
        return self._load_error

    def reasons(self, call: Call) -> list[str]:
        """Why this backend cannot run ``call`` (empty: it can)."""
        missing = self.unavailable_reason()
        if missing:
            return [missing]
        if self.devices is not None and call.device not in self.devices:
            return [f"tensors are on {call.device}{self.device_hint}"]
        op = call.op
        covers_all = self.support_name == "reference"
        if not covers_all and self.support_name not in op.support:
            return [f"{op.name} is not implemented in the {self.name} backend"]
        reasons = []
        if call.dtype not in self.dtypes:
            reasons.append(f"dtype {dtype_name(call.dtype)} is not supported ("
                           + ", ".join(dtype_name(d) for d in self.dtypes) + ")")
        if self.dispatch_key is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"{self.namespace}::{op.op_name('fwd')}", self.dispatch_key):
            reasons.append(f"the compiled extension has no {self.dispatch_key} kernel for {op.name} (stale build?); "
                           f"{_ext.BUILD_HINT}")
        if not covers_all:
            reasons += op.support[self.support_name].check(call)
        failure = _failures.get((self.name, call.key))
        if failure is not None:
            reasons.append(f"its kernel failed on this call signature ({failure})")
        return reasons

    def kernel_ops(self, op: OpDescriptor) -> KernelOps:
        """The torch ops this backend runs for ``op``."""
        if self.dispatch_key is not None:
            return define_kernel_ops(op, namespace=self.namespace)
        return define_python_kernel_ops(op, self.support_name)


_REGISTRY: dict[str, Backend] = {}
_OPS: dict[str, OpDescriptor] = {}
_forced: list[str] = []
_decisions: dict[tuple, Backend] = {}
_failures: dict[tuple, str] = {}  # (backend, call key) -> why its kernel failed under ``auto``


def clear_decisions() -> None:
    """Forgets the cached backend choices (after anything they depend on changed)."""
    _decisions.clear()


def register_backend(backend: Backend) -> None:
    """Adds a backend (tests add their own)."""
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    clear_decisions()


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)
    clear_decisions()


def register_op(op: OpDescriptor) -> OpDescriptor:
    """Makes an op known to ``explain``/``can_run`` and defines its kernel ops for every registered backend: the
    shared C++ ops and the Python-implemented ones. All are defined at import, because ``FlopCounterMode`` copies
    the FLOP-formula registry when it is created."""
    _OPS[op.name] = op
    for backend in _REGISTRY.values():
        if backend.support_name == "reference" or backend.support_name in op.support:
            backend.kernel_ops(op)
    return op


def registered_ops() -> dict[str, OpDescriptor]:
    return dict(_OPS)


def kernel_ops(op: Union[str, Callable, OpDescriptor], backend: str) -> KernelOps:
    """The forward and backward torch ops ``backend`` runs for ``op`` (e.g. for ``torch.library.opcheck``)."""
    return get_backend(backend).kernel_ops(_descriptor(op))


def registered_backends() -> list[str]:
    """All backend names, highest priority first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def available_backends() -> list[str]:
    """Backends usable on this machine (they may still refuse particular calls)."""
    return [n for n in registered_backends() if _REGISTRY[n].unavailable_reason() is None]


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {registered_backends()}") from None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (or ``"auto"``) for the fused ops called inside the ``with`` block."""
    if name != "auto":
        get_backend(name)
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def requested_backend(explicit: Optional[str] = None) -> str:
    if explicit is not None:
        return explicit
    if _forced:
        return _forced[-1]
    return os.environ.get(ENV_VAR, "auto") or "auto"


def _choose(call: Call, name: str) -> Backend:
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.reasons(call)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run {call.op.name} on {call.device}/"
                                          f"{dtype_name(call.dtype)}: " + "; ".join(reasons))
        return backend
    for n in registered_backends():
        backend = _REGISTRY[n]
        if not backend.reasons(call) and backend.auto_skip(call) is None:
            return backend
    raise BackendUnavailableError(f"no backend can run {call.op.name}:\n" + explain_call(call))


def select(call: Call, explicit: Optional[str] = None) -> Backend:
    """The backend that runs ``call``; raises BackendUnavailableError for an explicit request it cannot honour."""
    return _REGISTRY[_selected_name(explicit, call.op.name, call.device, call.dtype, type(call.attrs),
                                    tuple(call.attrs))]


def _selected_name(explicit: Optional[str], op: str, device: str, dtype: torch.dtype, attrs_type: type,
                   attr_values: tuple) -> str:
    """The choice for one call signature, cached. Under ``torch.compile`` it is made once, while tracing, and the
    compiled graph calls the chosen kernel op directly (no graph break; changing the requested backend later does not
    recompile). The attributes travel as their type and values: Dynamo passes constants as plain tuples."""
    attrs = attrs_type(*attr_values)
    name = requested_backend(explicit)
    key = (name, op, device, dtype, attrs)
    backend = _decisions.get(key)
    if backend is None:
        backend = _decisions[key] = _choose(Call(_OPS[op], (), device, dtype, attrs), name)
    return backend.name


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo at package import (3 s, and it
# changes the exit status of a Ctrl-C'd script); tests/test_compile.py checks the marker still works.
_selected_name._dynamo_marked_constant = True


def run(call: Call, explicit: Optional[str] = None):
    """Runs ``call`` on the selected backend; returns the public result (``call.finish`` of the op's results).

    Safety net: when ``auto`` chose a fused backend and its kernel fails (a Triton compile error, an out-of-resources
    launch, ...), the backend is refused for this call signature from then on, with one warning saying why, and the
    call runs on the next backend. An explicitly requested backend raises. (Not while compiling: the compiled graph
    calls the chosen kernel op directly.)"""
    backend = select(call, explicit)
    forward = backend.kernel_ops(call.op).forward
    if torch.compiler.is_compiling() or backend.support_name == "reference" or requested_backend(explicit) != "auto":
        out = forward(*call.args)
    else:
        token = AUTO_FALLBACK.set(True)
        try:
            out = forward(*call.args)
        except Exception as e:  # noqa: BLE001 - classified by is_kernel_failure
            if not is_kernel_failure(e):
                raise
            _failures[(backend.name, call.key)] = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]
            clear_decisions()
            warn_fallback(f"the {backend.name} kernel of {call.op.name} on {call.device}/{dtype_name(call.dtype)}", e)
            return run(call, explicit)
        finally:
            AUTO_FALLBACK.reset(token)
    return out if call.finish is None else call.finish(out)


def explain_call(call: Call, explicit: Optional[str] = None) -> str:
    lines = [f"{call.op.name} on {call.device}, {dtype_name(call.dtype)} "
             f"(requested backend: {requested_backend(explicit)})"]
    chosen = None
    try:
        chosen = select(call, explicit).name
    except BackendUnavailableError:
        pass
    for n in registered_backends():
        reasons = _REGISTRY[n].reasons(call)
        skip = _REGISTRY[n].auto_skip(call) if not reasons and n != chosen else None
        if skip is not None:
            reasons = [f"only when requested explicitly: {skip}"]
        mark = "->" if n == chosen else "  "
        lines.append(f" {mark} {n:<10} " + ("ok" if not reasons else "no: " + "; ".join(reasons)))
    if chosen is None:
        lines.append(" no backend selected")
    return "\n".join(lines)


def _descriptor(op: Union[str, Callable, OpDescriptor]) -> OpDescriptor:
    if isinstance(op, OpDescriptor):
        return op
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    if name not in _OPS:
        raise ValueError(f"op must be one of {tuple(_OPS)}, got {name!r}")
    return _OPS[name]


def explain(op: Union[str, Callable], *args, backend: Optional[str] = None, **kwargs) -> str:
    """Which backend would run ``op(*args, **kwargs)`` and why the others would not. Nothing is computed.

    ``op`` is a public op (``"multi_scale_dwconv"`` or the function itself) and the arguments are that function's,
    e.g. ``explain("multi_scale_dwconv", x, weights, bn, training=True)``."""
    return explain_call(_descriptor(op).prepare(*args, **kwargs), backend)


def reasons(op: Union[str, Callable], *args, backend: Optional[str] = None, **kwargs) -> list[str]:
    """Why ``op(*args, **kwargs)`` cannot run on ``backend`` (the requested one if None; ``"auto"`` always can, so
    its arguments are not even checked)."""
    name = requested_backend(backend)
    if name == "auto":
        return []
    return get_backend(name).reasons(_descriptor(op).prepare(*args, **kwargs))


def can_run(op: Union[str, Callable], *args, backend: Optional[str] = None, **kwargs) -> bool:
    """Whether ``op(*args, **kwargs)`` can run on ``backend`` (the requested one if None); for a named backend the
    arguments are checked as by the call itself (bad arguments raise)."""
    return not reasons(op, *args, backend=backend, **kwargs)


# --------------------------------------------------------------------------------------------------
# the built-in backends
# --------------------------------------------------------------------------------------------------
def _load_triton() -> None:
    """Only looks for triton: importing it (a large package) waits for the first Triton kernel call."""
    import importlib.util

    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken installation or import hook
        found = False
    if not found:
        raise ImportError("triton is not installed")


def _triton_interpreting() -> bool:
    """The Triton kernels run on CPU tensors only under the interpreter; ``TRITON_INTERPRET`` is read when the
    kernels are decorated, i.e. when the package's Triton modules are imported (tests set it first)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_auto_skip(call: Call) -> Optional[str]:
    if call.device == "cpu":
        return "the Triton interpreter on CPU is for tests, far slower than the other CPU backends"
    return None


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

register_backend(Backend(
    name="reference", priority=0, description="pure PyTorch compositions (oracle and fallback)", devices=None,
    dtypes=FLOAT_DTYPES))
register_backend(Backend(
    name="cpu", priority=10, description="fused C++/OpenMP kernels (emcad_kernels._C, csrc/cpu)", devices=("cpu",),
    dtypes=(torch.float32, torch.float64, torch.bfloat16), load=_ext.require_cpu_ext, dispatch_key="CPU"))
register_backend(Backend(
    name="cuda", priority=20, description="CUDA C++ kernels (emcad_kernels._C_cuda, csrc/cuda)", devices=("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), load=_ext.require_cuda_ext,
    dispatch_key="CUDA"))
register_backend(Backend(
    name="triton", priority=30, description="fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)",
    devices=("cuda", "cpu") if _triton_interpreting() else ("cuda",),
    device_hint="" if _triton_interpreting() else " (the triton backend runs CPU tensors only under "
                                                   "TRITON_INTERPRET=1)",
    dtypes=(torch.float32, torch.float16, torch.bfloat16), load=_load_triton, auto_skip=_triton_auto_skip))
