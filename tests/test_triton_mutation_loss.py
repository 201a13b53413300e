"""Tests of the Triton kernels of the fused MUTATION loss statistics (``emcad_kernels/triton/mutation_loss.py``):
the kernels called directly, and the registered op (``emcad_kernels.mutation_stats`` /
``mutation_loss`` with ``backend="triton"``) against the reference backend, with opcheck.

The oracle is written here in plain PyTorch: every head upsampled with ``F.interpolate(bilinear,
align_corners=False)``, the subset sums, ``log_softmax`` and the four sums; its gradients are torch.autograd of
that oracle with the given upstream ``grad_*``. Under the interpreter (no GPU) the shapes are tiny: B = 2, K = 3,
full resolution 8..13 with heads of 1..13 pixels per side, sizes that do not divide the target's, both memory
formats, every head count 1..4. Tolerance: the rule of docs/numerics.md#tolerance-rule (``op_cases.assert_matches``)
against the oracle in float64, with the oracle in the kernel's dtype as the PyTorch error scale.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.6'); the triton backend "
                                     "tests need it")

from emcad_kernels import triton as ek_triton  # noqa: E402
from emcad_kernels.triton import mutation_loss as ml  # noqa: E402

from op_cases import assert_bitwise_equal, assert_matches  # noqa: E402
from test_triton_backend import _COMPILE_CHECK, _clean_env, _python, interpreter_bounds_check  # noqa: E402,F401

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA and not ek_triton.INTERPRET:
    pytest.skip("no GPU and the triton kernels were not decorated for the interpreter", allow_module_level=True)


# --------------------------------------------------------------------------------------------------
# oracle
# --------------------------------------------------------------------------------------------------
def oracle(logits, target):
    """(ce, inter, psq, tcount) in the logits' dtype (computed in fp32 for fp16 / bf16), by plain PyTorch."""
    h, w = target.shape[-2:]
    k = logits[0].shape[1]
    dt = torch.float64 if logits[0].dtype == torch.float64 else torch.float32
    ups = [F.interpolate(z.to(dt), size=(h, w), mode="bilinear", align_corners=False) for z in logits]
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(dt)
    ce, inter, psq = [], [], []
    for s in ml.subsets(len(logits)):
        zs = ups[s[0]]
        for i in s[1:]:
            zs = zs + ups[i]
        logp = torch.log_softmax(zs, 1)
        p = logp.exp()
        ce.append(-logp.gather(1, target[:, None]).sum())
        inter.append((p * onehot).sum((0, 2, 3)))
        psq.append((p * p).sum((0, 2, 3)))
    return torch.stack(ce), torch.stack(inter), torch.stack(psq), onehot.sum((0, 2, 3))


def make_case(sizes=((3, 4), (5, 4), (7, 6), (13, 11)), full=(13, 11), b=2, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(b, k, hi, wi, generator=gen, dtype=torch.float64) * 2.0 for hi, wi in sizes]
    target = torch.randint(0, k, (b, *full), generator=gen)
    n = len(sizes)
    s = 2 ** n - 1
    grads = (torch.randn(s, generator=gen, dtype=torch.float64), torch.randn(s, k, generator=gen, dtype=torch.float64),
             torch.randn(s, k, generator=gen, dtype=torch.float64))
    return logits, target, grads


def run_kernels(logits, target, grads, dtype, channels_last):
    zs = [z.to(DEVICE, dtype) for z in logits]
    if channels_last:
        zs = [z.contiguous(memory_format=torch.channels_last) for z in zs]
    t = target.to(DEVICE)
    ce, inter, psq, tcount = ml.mutation_stats_forward(zs, t)
    gs = ml.mutation_stats_backward(*(g.to(DEVICE, torch.float32) for g in grads), zs, t)
    out = {"ce": ce, "inter": inter, "psq": psq, "tcount": tcount}
    out.update({f"grad {i}": g for i, g in enumerate(gs)})
    return out, zs, gs


def run_oracle(logits, target, grads, dtype):
    zs = [z.to(dtype).requires_grad_() for z in logits]
    ce, inter, psq, tcount = oracle(zs, target)
    gz = torch.autograd.grad((ce, inter, psq), zs, [g.to(ce.dtype) for g in grads])
    out = {"ce": ce.detach(), "inter": inter.detach(), "psq": psq.detach(), "tcount": tcount}
    out.update({f"grad {i}": g for i, g in enumerate(gz)})
    return out


def check(logits, target, grads, dtype=torch.float32, channels_last=False):
    label = f"heads {[tuple(z.shape[-2:]) for z in logits]} -> {tuple(target.shape[-2:])} {dtype} " \
            f"{'channels_last' if channels_last else 'NCHW'}"
    got, zs, gs = run_kernels(logits, target, grads, dtype, channels_last)
    same = run_oracle(logits, target, grads, dtype)
    ref64 = run_oracle(logits, target, grads, torch.float64)
    assert_matches(got, same, ref64, dtype, label)
    for name in ("ce", "inter", "psq", "tcount"):
        assert got[name].dtype == torch.float32, name
    assert torch.equal(got["tcount"].cpu().double(), ref64["tcount"])  # counts are exact
    for z, g in zip(zs, gs):
        assert g.shape == z.shape and g.dtype == z.dtype and g.stride() == z.stride(), label


# --------------------------------------------------------------------------------------------------
# the registered op
# --------------------------------------------------------------------------------------------------
def test_registered_op_matches_reference_backend():
    import emcad_kernels as ek

    logits, target, _ = make_case(sizes=((3, 4), (7, 6)), full=(9, 8))
    results = {}
    for backend in ("triton", "reference"):
        zs = [z.to(DEVICE, torch.float32).requires_grad_() for z in logits]
        loss = ek.mutation_loss(zs, target.to(DEVICE), backend=backend)
        loss.backward()
        results[backend] = {"loss": loss.detach(), **{f"grad {i}": z.grad for i, z in enumerate(zs)}}
    ref64 = {}
    zs = [z.clone().requires_grad_() for z in logits]
    loss = ek.mutation_loss(zs, target, backend="reference")
    loss.backward()
    ref64 = {"loss": loss.detach(), **{f"grad {i}": z.grad for i, z in enumerate(zs)}}
    assert_matches(results["triton"], results["reference"], ref64, torch.float32, "mutation_loss triton vs reference")


def test_registered_op_opcheck_and_float64_refusal():
    import emcad_kernels as ek

    logits, target, _ = make_case(sizes=((3, 4), (7, 6)), full=(9, 8))
    zs = [z.to(DEVICE, torch.float32).requires_grad_() for z in logits]
    op = ek.backends.kernel_ops("mutation_stats", "triton").forward
    torch.library.opcheck(op, (zs, target.to(DEVICE)), test_utils=("test_schema", "test_autograd_registration",
                                                                     "test_faketensor"))
    with pytest.raises(ek.BackendUnavailableError, match="float64"):
        ek.mutation_stats([z.to(DEVICE) for z in logits], target.to(DEVICE), backend="triton")


# --------------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------------
def test_four_heads_match_oracle():
    """EMCAD-like pyramid (p4, p3, p2, p1) at sizes that do not divide 13×11, one head at full size."""
    check(*make_case())


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False),
                                                 (torch.float16, True)], ids=["fp32-cl", "bf16-nchw", "fp16-cl"])
def test_dtypes_and_layouts(dtype, channels_last):
    check(*make_case(sizes=((2, 3), (4, 4), (5, 7)), full=(9, 10), seed=1), dtype, channels_last)


CASES = {
    "one-head-1x1": dict(sizes=((1, 1),), full=(8, 9)),
    "two-heads": dict(sizes=((2, 2), (4, 3)), full=(8, 8)),
    "three-heads-odd": dict(sizes=((3, 2), (1, 5), (6, 6)), full=(10, 13), k=4),
    "heads-larger-than-target": dict(sizes=((10, 3), (9, 12)), full=(8, 9), k=2),
    "four-heads-pyramid-8": dict(sizes=((1, 1), (2, 2), (4, 4), (8, 8)), full=(8, 8)),
}


@pytest.mark.parametrize("name", CASES)
def test_head_counts_and_sizes(name):
    check(*make_case(**CASES[name], seed=2), channels_last=name == "three-heads-odd")


def test_subset_order():
    assert ml.subsets(4) == [(0,), (1,), (2,), (3,), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (0, 1, 2),
                             (0, 1, 3), (0, 2, 3), (1, 2, 3), (0, 1, 2, 3)]
    # every subset's statistics land in their own row: a head of huge logits towards class 0 in one head only
    # moves exactly the subsets that contain it
    logits, target, _ = make_case(sizes=((2, 2), (3, 3), (4, 4)), full=(8, 8))
    base = ml.mutation_stats_forward([z.float() for z in logits], target)[0]
    logits[1] = logits[1] + torch.tensor([50.0, 0.0, 0.0], dtype=torch.float64)[None, :, None, None]
    moved = ml.mutation_stats_forward([z.float() for z in logits], target)[0]
    changed = [(moved[i] - base[i]).abs().item() > 1.0 for i in range(7)]
    assert changed == [1 in s for s in ml.subsets(3)]


def test_statistics_give_the_segmentation_loss_and_its_gradients():
    """The interface's loss formula on the kernels' statistics equals ``emcad.losses.SegmentationLoss`` (mutation,
    ce_dice) on the upsampled heads, and the kernels' backward fed with the formula's gradients equals autograd
    through that loss and ``F.interpolate``."""
    losses = pytest.importorskip("emcad.losses", reason="the emcad package is not importable")
    logits, target, _ = make_case(sizes=((2, 3), (4, 4), (8, 9)), full=(8, 9), k=4, seed=4)
    zs = [z.float().to(DEVICE).requires_grad_() for z in logits]
    t = target.to(DEVICE)
    h, w = target.shape[-2:]
    loss_fn = losses.SegmentationLoss(num_classes=4, supervision="mutation", criterion="ce_dice")
    want = loss_fn([F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False) for z in zs], t)
    want_grads = torch.autograd.grad(want, zs)
    ce, inter, psq, tcount = (v.detach().requires_grad_() for v in ml.mutation_stats_forward(zs, t))
    dice = 1 - (2 * inter + 1e-5) / (psq + tcount.detach() + 1e-5)
    got = (0.3 * ce / target.numel() + 0.7 * dice.mean(1)).sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g_ce, g_inter, g_psq = torch.autograd.grad(got, (ce, inter, psq))
    got_grads = ml.mutation_stats_backward(g_ce, g_inter, g_psq, [z.detach() for z in zs], t)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_empty_batch():
    logits, target, grads = make_case(sizes=((2, 3), (4, 4)), full=(8, 8))
    zs = [z[:0].float() for z in logits]
    ce, inter, psq, tcount = ml.mutation_stats_forward(zs, target[:0])
    assert ce.shape == (3,) and inter.shape == psq.shape == (3, 3) and tcount.shape == (3,)
    assert not any(v.abs().sum() for v in (ce, inter, psq, tcount))
    gs = ml.mutation_stats_backward(*(g.float() for g in grads), zs, target[:0])
    assert [g.shape for g in gs] == [z.shape for z in zs]


def test_bitwise_deterministic():
    case = make_case(sizes=((3, 4), (5, 4), (9, 10)), full=(9, 10), seed=3)
    first, _, _ = run_kernels(*case, torch.float32, True)
    second, _, _ = run_kernels(*case, torch.float32, True)
    assert_bitwise_equal(first, second)


def test_rejects_float64_and_bad_head_count():
    logits, target, _ = make_case(sizes=((2, 2),), full=(8, 8))
    with pytest.raises(TypeError, match=r"logits\[0\] has dtype torch.float64"):
        ml.mutation_stats_forward(logits, target)
    with pytest.raises(ValueError, match="1 to 4 heads"):
        ml.mutation_stats_forward([logits[0].float()] * 5, target)


# --------------------------------------------------------------------------------------------------
# GPU only (not run yet)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_emcad_synapse_shapes(dtype):
    """EMCAD heads at 224 px (p4..p1 at 7, 14, 28, 56 px), Synapse's 9 classes, batch 6, channels_last."""
    check(*make_case(sizes=((7, 7), (14, 14), (28, 28), (56, 56)), full=(224, 224), b=6, k=9), dtype, True)


@pytest.mark.gpu
def test_gpu_odd_sizes_and_determinism():
    case = make_case(sizes=((11, 9), (22, 19), (45, 37), (89, 75)), full=(352, 300), b=3, k=4, seed=5)
    check(*case, torch.float32, False)
    first, _, _ = run_kernels(*case, torch.bfloat16, True)
    for _ in range(2):
        again, _, _ = run_kernels(*case, torch.bfloat16, True)
        assert_bitwise_equal(first, again)


_COMPILE_LAUNCHES = r"""
from emcad_kernels.triton import mutation_loss

for n in (1, 2, 3, 4):  # EMCAD heads p4..p1 at 224 px (7, 14, 28, 56 px), Synapse's 9 classes, batch 6
    heads = [torch.zeros(6, 9, 7 * 2 ** i, 7 * 2 ** i, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last) for i in range(n)]
    tgt = torch.zeros(6, 224, 224, dtype=torch.int64)
    mutation_loss.mutation_stats_forward(heads, tgt)
    s = 2 ** n - 1
    mutation_loss.mutation_stats_backward(torch.zeros(s), torch.zeros(s, 9), torch.zeros(s, 9), heads, tgt)
for name, regs, stack in report:
    print(f"{name} {regs} {stack}")
"""


@pytest.mark.skipif(os.environ.get("EMCAD_TRITON_COMPILE_CHECK") != "1",
                    reason="set EMCAD_TRITON_COMPILE_CHECK=1 to compile the kernels for sm_90 without a GPU")
def test_kernels_compile_for_sm90_without_spills():
    """Compiles the forward and backward kernels for 1..4 heads (bf16, channels_last, K = 9) with the real Triton
    compiler for sm_90 and checks their register spills."""
    harness = _COMPILE_CHECK.split("from emcad_kernels.triton import")[0].replace(
        'torch.bfloat16: "bf16"}', 'torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64"}')
    out = _python(harness + _COMPILE_LAUNCHES, _clean_env(), timeout=3600)
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert {r[0] for r in rows} >= {"_fwd_kernel", "_bwd_rows_kernel", "_bwd_cols_kernel"}, out
    print("kernel registers stack-bytes\n" + "\n".join(" ".join(r) for r in rows))
    spilling = [r for r in rows if int(r[2]) > 32]
    assert not spilling, f"kernels spilling more than 32 bytes of stack: {spilling}"
