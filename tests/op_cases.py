"""Shared inputs and parity checks for the backend tests (triton, cuda): one functional call per ``Case``, run
forward and backward on any backend, device, dtype and layout, and compared with the reference.

The tolerance rule and its table live in the package (``emcad_kernels.testing``), shared with ``emcad selftest``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from emcad_kernels.testing import FLOOR, assert_matches, layout_strides  # noqa: F401 (re-exported for the tests)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rand(gen, *shape, scale=1.0, offset=0.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset


def bn_state(gen, channels):
    """(weight, bias, running_mean, running_var), away from the trivial values."""
    return [rand(gen, channels, scale=0.2, offset=1.0), rand(gen, channels, scale=0.1),
            rand(gen, channels, scale=0.1), torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5]


@dataclass
class Case:
    """Inputs of one functional call in float64 on CPU; ``run`` casts and places them."""

    op: str
    tensors: dict
    bn: list
    kwargs: dict = field(default_factory=dict)

    def __repr__(self):
        shapes = {k: tuple(v.shape) for k, v in self.tensors.items() if v.dim() == 4}
        return f"{self.op}{shapes}{self.kwargs}"


def msdc_case(shape=(2, 6, 13, 11), kernel_sizes=(1, 3, 5), seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    tensors = {"x": rand(gen, *shape)}
    for i, k in enumerate(kernel_sizes):
        tensors[f"w{i}"] = rand(gen, c, 1, k, k, scale=0.3)
    kwargs.setdefault("shuffle_groups", c // 2 if c % 2 == 0 else None)
    kwargs.setdefault("activation", "relu6")
    return Case("multi_scale_dwconv", tensors, [bn_state(gen, c) for _ in kernel_sizes], kwargs)


def updw_case(shape=(2, 5, 9, 6), k=3, seed=1, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    kwargs.setdefault("activation", "relu")
    return Case("upsample_dwconv", {"x": rand(gen, *shape), "weight": rand(gen, c, 1, k, k, scale=0.3)},
                [bn_state(gen, c)], kwargs)


def lgag_case(shape=(2, 6, 9, 7), k=3, groups=None, f_int=None, seed=2, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    f_int = f_int or c // 2
    groups = groups or f_int
    tensors = {"g": rand(gen, *shape), "x": rand(gen, *shape),
               "wg": rand(gen, f_int, c // groups, k, k, scale=0.3), "bg": rand(gen, f_int, scale=0.1),
               "wx": rand(gen, f_int, c // groups, k, k, scale=0.3), "bx": rand(gen, f_int, scale=0.1),
               "wpsi": rand(gen, 1, f_int, 1, 1, scale=0.5), "bpsi": rand(gen, 1, scale=0.1)}
    kwargs.setdefault("add_gate_input", True)
    kwargs["groups"] = groups
    return Case("grouped_attention_gate", tensors, [bn_state(gen, f_int), bn_state(gen, f_int), bn_state(gen, 1)],
                kwargs)


def run(case: Case, backend: str, dtype, channels_last: bool, training: bool, device="cpu", grad_seed=3):
    """Forward + backward through the functional API. Returns ({name: tensor}, output): the output, the gradient
    of every differentiable input and the updated running statistics."""
    import emcad_kernels as ek

    named, leaves = {}, []
    for name, t in case.tensors.items():
        t = t.to(device=device, dtype=dtype)
        if channels_last and t.dim() == 4 and name in ("x", "g"):
            t = t.contiguous(memory_format=torch.channels_last)
        named[name] = t.requires_grad_()
        leaves.append((name, named[name]))
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bns = []
    for i, state in enumerate(case.bn):
        w, b, rm, rv = (s.to(device=device, dtype=bn_dtype) for s in state)
        bns.append(ek.BatchNormParams(w.requires_grad_(), b.requires_grad_(), rm, rv))
        leaves += [(f"bn{i}.weight", w), (f"bn{i}.bias", b)]
    kw = dict(case.kwargs, training=training, backend=backend)
    if case.op == "multi_scale_dwconv":
        ws = [named[k] for k in named if k.startswith("w")]
        y = ek.multi_scale_dwconv(named["x"], ws, bns, **kw)
    elif case.op == "upsample_dwconv":
        y = ek.upsample_dwconv(named["x"], named["weight"], bns[0], **kw)
    else:
        t = named
        y = ek.grouped_attention_gate(t["g"], t["x"], t["wg"], t["bg"], bns[0], t["wx"], t["bx"], bns[1], t["wpsi"],
                                      t["bpsi"], bns[2], **kw)
    gen = torch.Generator().manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, [t for _, t in leaves], gy)
    out = {"out": y.detach()}
    out.update({f"grad {name}": g for (name, _), g in zip(leaves, grads)})
    for i, bn in enumerate(bns):
        out[f"bn{i}.running_mean"] = bn.running_mean
        out[f"bn{i}.running_var"] = bn.running_var
    return out, y


def assert_backend_matches_reference(run_call, backend, dtype, label, ref_device="cpu", check_dtypes=False):
    """``run_call(backend, dtype, device=...)`` -> (values dict, output) for one case: ``backend`` against the
    reference in the same dtype and in float64 (``assert_matches``), plus the memory format of the output and of
    the input gradients and, with ``check_dtypes``, equal result dtypes."""
    got, y = run_call(backend, dtype)
    same, y_ref = run_call("reference", dtype)
    ref64, _ = run_call("reference", torch.float64, device=ref_device)
    assert_matches(got, same, ref64, dtype, label)
    assert layout_strides(y) == layout_strides(y_ref), f"{label}: output strides {y.stride()} != {y_ref.stride()}"
    for name in ("grad x", "grad g"):
        if name in got:
            assert layout_strides(got[name]) == layout_strides(same[name]), f"{label} {name}"
    if check_dtypes:
        for name in got:
            assert got[name].dtype == same[name].dtype, f"{label} {name}"


def check_against_reference(case, backend, device, dtype, channels_last, training, ref_device="cpu"):
    """``backend`` on ``device`` against the reference (:func:`assert_backend_matches_reference`)."""
    label = f"{case} {dtype} {'channels_last' if channels_last else 'NCHW'} {'train' if training else 'eval'}"

    def run_call(b, dt, device=device):
        return run(case, b, dt, channels_last, training, device=device)
    assert_backend_matches_reference(run_call, backend, dtype, label, ref_device)


def assert_cuda_graph_replay_matches_eager(step, refresh):
    """Captures ``step()`` (returning a tuple of tensors) in a CUDA graph after a warm-up on a side stream (so
    compilation and autotuning happen outside the capture), overwrites the tensors in ``refresh`` with new random
    values, replays the graph and requires bitwise the same results as an eager ``step()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    with torch.no_grad():
        for t in refresh:
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for a, b in zip(static_out, expected):
        assert torch.equal(a, b)


def captured_kernel_call(run_public):
    """Runs ``run_public()`` (a public op call) and returns ``(forward kernel op, its arguments)`` of the last fused
    call it made: the inputs for ``torch.library.opcheck``."""
    from emcad_kernels import backends

    captured = {}
    original = backends.Backend.kernel_ops

    def recording(self, op):
        ops = original(self, op)

        def forward(*args):
            captured["op"], captured["args"] = ops.forward, args
            return ops.forward(*args)

        return ops._replace(forward=forward)

    backends.Backend.kernel_ops = recording
    try:
        run_public()
    finally:
        backends.Backend.kernel_ops = original
    return captured["op"], captured["args"]


def detached(args, requires_grad=False):
    """Kernel-op arguments with fresh leaf tensors (optionally requiring grad where they are floating point)."""
    def leaf(t):
        t = t.detach().clone()
        return t.requires_grad_(requires_grad and t.is_floating_point() and t.dim() > 0)

    return [leaf(a) if isinstance(a, torch.Tensor) else [leaf(t) for t in a] if isinstance(a, list) else a
            for a in args]


def failing_kernel(*args):
    """A kernel that always fails, as a Triton compile error or a failed launch would (safety-net tests)."""
    raise RuntimeError("injected kernel failure")


def oom_kernel(*args):
    raise torch.OutOfMemoryError("injected out of memory")
