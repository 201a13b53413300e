"""Backend registry and selection.

Each backend says whether it can run a given call and, if not, why (NATTEN/xformers style). Selection order:

1. the ``backend=`` argument of a functional call (or of a module),
2. the innermost ``use_backend(...)`` context,
3. the ``EMCAD_KERNELS_BACKEND`` environment variable,
4. ``"auto"``: the available backend with the highest priority that supports the call.

An explicitly requested backend that cannot run the call raises ``BackendUnavailableError`` listing the reasons;
``auto`` never fails because the ``reference`` backend runs everything. ``explain(...)`` shows the decision.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .library import OpSet

ENV_VAR = "EMCAD_KERNELS_BACKEND"
OPS = ("multi_scale_dwconv", "upsample_dwconv", "grouped_attention_gate", "layernorm_dilated_dwconv",
       "dilated_dwconv_groupnorm", "mscam", "mutation_stats")
# ops a backend may leave out: op name -> OpSet field. A backend whose OpSet has None there refuses the call with
# "<op> not implemented in the <backend> backend" before its own ``check`` runs (so older backends need no edit).
OPTIONAL_OPS = {"layernorm_dilated_dwconv": "lndw", "dilated_dwconv_groupnorm": "dwgn", "mscam": "mscam",
                "mutation_stats": "mutation_stats"}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run a call; the message lists why."""


@dataclass(frozen=True)
class OpCall:
    """What a backend needs to know to accept or refuse one call."""

    op: str
    device: str  # device type: "cpu", "cuda", ...
    dtype: torch.dtype
    activation: str
    kernel_sizes: tuple[int, ...] = ()
    stride: int = 1
    mode: str = ""  # upsample mode
    scale: int = 1
    groups: int = 1
    dilations: tuple[int, ...] = ()  # per channel group (layernorm_dilated_dwconv, dilated_dwconv_groupnorm)


@dataclass
class Backend:
    """A set of kernels plus the rules for when they apply.

    ``load`` returns the backend's ``OpSet`` or raises ImportError/RuntimeError explaining why it is unavailable
    (not built, no triton, no GPU, ...); it is called once, lazily. ``check`` returns the reasons why a call is
    not supported (empty list: supported).
    """

    name: str
    priority: int
    load: Callable[[], OpSet]
    check: Callable[[OpCall], list[str]]
    description: str = ""
    # reason why ``auto`` must not pick this backend for a call it could run when asked explicitly
    # (e.g. the Triton interpreter on CPU: correct, but for tests only); None = no objection
    auto_skip: Callable[[OpCall], Optional[str]] = lambda call: None
    _ops: Optional[OpSet] = field(default=None, repr=False)
    _load_error: Optional[str] = field(default=None, repr=False)

    def unavailable_reason(self) -> Optional[str]:
        if self._ops is None and self._load_error is None:
            try:
                self._ops = self.load()
            except (ImportError, RuntimeError, OSError) as e:  # the reason becomes user-visible
                self._load_error = str(e) or type(e).__name__
        return self._load_error

    def reasons(self, call: OpCall) -> list[str]:
        missing = self.unavailable_reason()
        if missing:
            return [missing]
        field_name = OPTIONAL_OPS.get(call.op)
        if field_name is not None and getattr(self._ops, field_name, None) is None:
            return [f"{call.op} not implemented in the {self.name} backend"]
        return self.check(call)

    @property
    def ops(self) -> OpSet:
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {reason}")
        return self._ops


_REGISTRY: dict[str, Backend] = {}
_forced: list[str] = []


def register_backend(backend: Backend, *, load_now: bool = False) -> None:
    """Adds a backend. ``load_now`` loads it immediately; do that when loading is cheap, because
    ``FlopCounterMode`` copies the FLOP-formula registry when it is created, so ops defined later are not counted
    by counters that already exist."""
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    if load_now:
        backend.unavailable_reason()


def registered_backends() -> list[str]:
    """All backend names, highest priority first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def available_backends() -> list[str]:
    """Backends that loaded on this machine (they may still refuse particular calls)."""
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


def select(call: OpCall, explicit: Optional[str] = None) -> Backend:
    """The backend that runs ``call``; raises BackendUnavailableError for an explicit request it cannot honour."""
    name = requested_backend(explicit)
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.reasons(call)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run {call.op} on {call.device}/{call.dtype}: " + "; ".join(reasons))
        return backend
    for n in registered_backends():
        backend = _REGISTRY[n]
        if not backend.reasons(call) and backend.auto_skip(call) is None:
            return backend
    raise BackendUnavailableError(f"no backend can run {call.op}: " + explain_call(call))


def explain_call(call: OpCall, explicit: Optional[str] = None) -> str:
    lines = [f"{call.op} on {call.device}, {call.dtype} (requested backend: {requested_backend(explicit)})"]
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
