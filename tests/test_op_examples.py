"""The op descriptors' ``examples`` (the calls ``emcad selftest`` checks): every registered op has them, they are
valid and deterministic calls with odd shapes, and ``torch.library.opcheck`` passes on the forward kernel op of
every usable backend for each of them (schema, fake tensors, autograd registration, AOT dispatch)."""

from __future__ import annotations

import pytest
import torch

from emcad_kernels import backends
from emcad_kernels.selftest import _walk

OPS = backends.registered_ops()
BACKENDS = backends.registered_backends()


def _implements(backend: str, op) -> bool:
    support = backends.get_backend(backend).support_name
    return support == "reference" or support in op.support


def _device(backend: str) -> str:
    devices = backends.get_backend(backend).devices
    return "cpu" if devices is None or "cpu" in devices else devices[0]


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_valid_deterministic_examples(name):
    op = OPS[name]
    assert op.examples is not None, f"{name}: its descriptor needs examples (OpDescriptor.examples)"
    first, again = op.examples("cpu", torch.float32), op.examples("cpu", torch.float32)
    assert len(first) >= 2, f"{name}: give at least two examples (e.g. NCHW and channels_last)"
    odd = False
    for (args, kwargs), (args2, kwargs2) in zip(first, again):
        call = op.prepare(*args, **kwargs)  # valid arguments
        assert call.op is op
        tensors, tensors2 = list(_walk((args, kwargs), "")), list(_walk((args2, kwargs2), ""))
        assert any(t.requires_grad for _, t in tensors), f"{name}: an example without a gradient to check"
        for (n, a), (_, b) in zip(tensors, tensors2):
            assert torch.equal(a, b), f"{name} {n}: examples must be deterministic"
        odd |= any(t.dim() == 4 and (t.shape[-1] % 2 or t.shape[-2] % 2) for _, t in tensors)
    assert odd, f"{name}: use odd spatial sizes somewhere (ragged tiles)"
    # the same values in every dtype: the float32 examples are the float64 ones rounded
    for (args, kwargs), (args64, kwargs64) in zip(first, op.examples("cpu", torch.float64)):
        for (n, a), (_, b) in zip(_walk((args, kwargs), ""), _walk((args64, kwargs64), "")):
            assert torch.equal(a, b.to(a.dtype)), n


# backends on the GPU carry the gpu marker (`pytest -m gpu` on a GPU machine runs them)
CASES = [pytest.param(name, b, id=f"{name}-{b}", marks=[pytest.mark.gpu] if _device(b) == "cuda" else [])
         for name in sorted(OPS) for b in BACKENDS if _implements(b, OPS[name])]


@pytest.mark.parametrize("name,backend", CASES)
def test_opcheck_forward_kernel_op_on_examples(name, backend):
    op, b = OPS[name], backends.get_backend(backend)
    if b.unavailable_reason():
        pytest.skip(b.unavailable_reason())
    device = _device(backend)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    forward = b.kernel_ops(op).forward
    # Triton's interpreter on CPU takes seconds per call: there, the first usable example without the AOT-dispatch
    # check, which runs forward and backward several times (test_triton_*.py run the full opcheck at fixed shapes)
    interpreted = backend == "triton" and device == "cpu"
    tests = ("test_schema", "test_autograd_registration", "test_faketensor") if interpreted else None
    checked = 0
    for args, kwargs in op.examples(device, torch.float32):
        call = op.prepare(*args, **kwargs)
        if b.reasons(call):
            continue
        if tests is None:
            torch.library.opcheck(forward, call.args)
        else:
            torch.library.opcheck(forward, call.args, test_utils=tests)
        checked += 1
        if interpreted:
            break
    if not checked:
        pytest.skip(f"the {backend} backend refuses every example of {name}")
