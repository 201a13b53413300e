"""The fused MUTATION loss: ``emcad_kernels.mutation_stats`` / ``mutation_loss`` against the plain
``SegmentationLoss`` on upsampled heads (forward, every gradient, float64 gradcheck, opcheck, low precision, odd
sizes, channels_last, determinism, bad inputs), EMCADNet's ``heads="lowres"``, ``SegmentationLoss(fused=...)``
on a real model, and the trainer / CLI default."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import emcad_kernels as ek
from emcad.losses import SegmentationLoss
from emcad_kernels import backends


def _cpu_reason():
    reasons = backends.reasons("mutation_stats", [torch.zeros(1, 2, 2, 2)], torch.zeros(1, 2, 2, dtype=torch.long),
                               backend="cpu")
    return "; ".join(reasons) if reasons else None


CPU_REASON = _cpu_reason()
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend: {CPU_REASON}")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu)]

ODD_SIZES = [(2, 3), (4, 5), (7, 6), (13, 11)]  # the last one equals the target: scale 1


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make(n=4, k=3, b=2, size=(13, 11), sizes=ODD_SIZES, dtype=torch.float64, channels_last=False, seed=0,
         scale=2.0):
    g = torch.Generator().manual_seed(seed)
    heads = []
    for h, w in sizes[-n:]:
        z = (torch.randn(b, k, h, w, generator=g, dtype=torch.float64) * scale).to(dtype)
        heads.append(z.contiguous(memory_format=torch.channels_last) if channels_last else z)
    target = torch.randint(0, k, (b, *size), generator=g)
    return heads, target


def upsampled(heads, size):
    return [F.interpolate(z, size=size, mode="bilinear", align_corners=False) for z in heads]


def plain_loss(heads, target):
    """The plain loss on the upsampled heads (what the fused loss must equal)."""
    k = heads[0].shape[1]
    return SegmentationLoss(k, "mutation", "ce_dice", fused=False)(upsampled(heads, tuple(target.shape[-2:])),
                                                                    target)


def plain_stats(heads, target):
    """The statistics written out with plain torch ops on the upsampled heads (float64)."""
    ups = upsampled([z.double() for z in heads], tuple(target.shape[-2:]))
    k = heads[0].shape[1]
    onehot = F.one_hot(target, k).movedim(-1, 1).double()
    ce, inter, psq = [], [], []
    for r in range(1, len(ups) + 1):
        for s in itertools.combinations(range(len(ups)), r):
            z = sum(ups[i] for i in s)
            p = torch.softmax(z, 1)
            ce.append(F.cross_entropy(z, target, reduction="sum"))
            inter.append((p * onehot).sum((0, 2, 3)))
            psq.append((p * p).sum((0, 2, 3)))
    return torch.stack(ce), torch.stack(inter), torch.stack(psq), onehot.sum((0, 2, 3))


def grads_of(fn, heads):
    heads = [z.detach().clone().requires_grad_() for z in heads]
    loss = fn(heads)
    return loss.detach(), torch.autograd.grad(loss, heads)


# --------------------------------------------------------------------------------------------------
# forward statistics and loss, float64
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 9])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_stats_and_loss_match_plain_float64(backend, n, k):
    heads, target = make(n=n, k=k)
    got = ek.mutation_stats(heads, target, backend=backend)
    want = plain_stats(heads, target)
    assert got[0].shape == (2 ** n - 1,) and got[1].shape == (2 ** n - 1, k) and got[3].shape == (k,)
    for name, a, b in zip(("ce", "inter", "psq", "tcount"), got, want):
        assert a.dtype == torch.float64, name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-12, msg=name)
    loss = ek.mutation_loss(heads, target, backend=backend)
    torch.testing.assert_close(loss, plain_loss(heads, target), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("n,k", [(4, 9), (3, 2), (1, 4)])
def test_all_gradients_match_plain_float64(backend, n, k, channels_last):
    heads, target = make(n=n, k=k, channels_last=channels_last)
    want_loss, want = grads_of(lambda hs: plain_loss(hs, target), heads)
    got_loss, got = grads_of(lambda hs: ek.mutation_loss(hs, target, backend=backend), heads)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-12, rtol=1e-12)
    for i, (a, b, z) in enumerate(zip(got, want, heads)):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-9, msg=f"grad of head {i}")
        assert a.dtype == z.dtype and a.stride() == z.stride(), f"head {i}: dtype/layout of the gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    heads, target = make(n=3, k=3, b=1, size=(5, 4), sizes=[(2, 2), (3, 2), (5, 4)])
    heads = [z.requires_grad_() for z in heads]

    def fn(*hs):
        ce, inter, psq, _ = ek.mutation_stats(list(hs), target, backend=backend)
        return ce, inter, psq

    assert torch.autograd.gradcheck(fn, heads, atol=1e-8, rtol=1e-6)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_gradients_match_reference_for_random_upstream(dtype):
    heads, target = make(n=4, k=5, dtype=dtype, sizes=[(1, 1), (3, 2), (6, 7), (13, 11)])
    g = torch.Generator().manual_seed(7)
    s = 15
    up = (torch.randn(s, generator=g), torch.randn(s, 5, generator=g), torch.randn(s, 5, generator=g))
    res = {}
    for backend in ("reference", "cpu"):
        hs = [z.detach().clone().requires_grad_() for z in heads]
        ce, inter, psq, tcount = ek.mutation_stats(hs, target, backend=backend)
        total = (ce * up[0].to(ce)).sum() + (inter * up[1].to(ce)).sum() + (psq * up[2].to(ce)).sum()
        res[backend] = (torch.cat([ce, inter.flatten(), psq.flatten(), tcount]).detach(),
                        torch.autograd.grad(total, hs))
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(res["cpu"][0], res["reference"][0], **tol)
    for a, b in zip(res["cpu"][1], res["reference"][1]):
        torch.testing.assert_close(a, b, **tol)


# --------------------------------------------------------------------------------------------------
# low precision: within 2x PyTorch's own error against float64
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_low_precision_within_twice_plain_error(backend, dtype):
    heads64, target = make(n=4, k=9, b=2, size=(28, 24), sizes=[(4, 3), (7, 6), (14, 12), (28, 24)])
    heads = [z.to(dtype) for z in heads64]
    # exact answer: float64 on the same (rounded) inputs
    ref_loss, ref_grads = grads_of(lambda hs: plain_loss(hs, target), [z.double() for z in heads])
    pl_loss, pl_grads = grads_of(lambda hs: plain_loss(hs, target), heads)
    fu_loss, fu_grads = grads_of(lambda hs: ek.mutation_loss(hs, target, backend=backend), heads)
    assert fu_loss.dtype == torch.float32 and pl_loss.dtype == torch.float32
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    err_plain = float((pl_loss.double() - ref_loss).abs())
    err_fused = float((fu_loss.double() - ref_loss).abs())
    assert err_fused <= 2 * err_plain + floor * float(ref_loss.abs()), (err_fused, err_plain)
    for i, (a, p, r) in enumerate(zip(fu_grads, pl_grads, ref_grads)):
        assert a.dtype == dtype
        scale = float(r.abs().max())
        e_fused = float((a.double() - r).abs().max())
        e_plain = float((p.double() - r).abs().max())
        assert e_fused <= 2 * e_plain + floor * scale, (i, e_fused, e_plain, scale)


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_reproducible_and_thread_count_independent(backend):
    heads, target = make(n=4, k=9, b=2, size=(56, 48), sizes=[(7, 6), (14, 12), (28, 24), (56, 48)],
                         dtype=torch.float32)

    def run(threads):
        torch.set_num_threads(threads)
        hs = [z.detach().clone().requires_grad_() for z in heads]
        loss = ek.mutation_loss(hs, target, backend=backend)
        stats = ek.mutation_stats(hs, target, backend=backend)
        return [loss.detach(), *(s.detach() for s in stats), *torch.autograd.grad(loss, hs)]

    a, b = run(2), run(2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if backend == "cpu":  # fixed partition: the same bits with any thread count
        c = run(1)
        for x, y in zip(a, c):
            assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------------
# opcheck, explain, bad inputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(backend, channels_last):
    heads, target = make(n=3, k=4, b=1, size=(6, 5), sizes=[(2, 2), (3, 3), (6, 5)], channels_last=channels_last)
    heads = [z.requires_grad_() for z in heads]
    op = backends.kernel_ops("mutation_stats", backend).forward
    torch.library.opcheck(op, (heads, target))


@needs_cpu
def test_auto_picks_cpu_and_explain_lists_it():
    heads, target = make(n=2, k=3, dtype=torch.float32)
    text = ek.explain("mutation_stats", heads, target)
    assert "-> cpu" in text, text


def test_stats_of_a_known_case():
    """One head, two classes, logits 0: p = 1/2 everywhere (checks the formulas, not just the agreement)."""
    z = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([[[0, 1], [1, 1]]])
    for backend in ["reference"] + ([] if CPU_REASON else ["cpu"]):
        ce, inter, psq, tcount = ek.mutation_stats([z], t, backend=backend)
        torch.testing.assert_close(ce, torch.tensor([4 * 0.6931471805599453], dtype=torch.float64))
        torch.testing.assert_close(inter, torch.tensor([[0.5, 1.5]], dtype=torch.float64))
        torch.testing.assert_close(psq, torch.tensor([[1.0, 1.0]], dtype=torch.float64))
        torch.testing.assert_close(tcount, torch.tensor([1.0, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend):
    heads, target = make(n=2, k=3)
    with pytest.raises(ValueError, match=r"target values .*\[0, 3\)"):
        ek.mutation_loss(heads, target + 1, backend=backend)
    with pytest.raises(ValueError, match=r"target values"):
        ek.mutation_stats(heads, target - 1, backend=backend)
    with pytest.raises(TypeError, match="target must be an integer"):
        ek.mutation_stats(heads, target.double(), backend=backend)
    with pytest.raises(ValueError, match="target must be a 3-D"):
        ek.mutation_stats(heads, target[0], backend=backend)
    with pytest.raises(ValueError, match="target has batch 1"):
        ek.mutation_stats(heads, target[:1], backend=backend)
    with pytest.raises(ValueError, match=r"logits\[1\] has shape .* batch and classes"):
        ek.mutation_stats([heads[0], heads[1][:, :2]], target, backend=backend)
    with pytest.raises(ValueError, match=r"logits\[1\] has shape .* batch and classes"):
        ek.mutation_stats([heads[0], heads[1][:1]], target, backend=backend)
    with pytest.raises(TypeError, match=r"logits\[1\] has dtype"):
        ek.mutation_stats([heads[0], heads[1].float()], target, backend=backend)
    with pytest.raises(ValueError, match=r"logits\[0\] must be a 4-D"):
        ek.mutation_stats([heads[0][0]], target, backend=backend)
    with pytest.raises(TypeError, match=r"logits\[0\] must be float"):
        ek.mutation_stats([heads[0].long()], target, backend=backend)
    with pytest.raises(ValueError, match="logits must hold 1 to 4 heads"):
        ek.mutation_stats([heads[0]] * 5, target, backend=backend)
    with pytest.raises(ValueError, match="logits must hold 1 to 4 heads"):
        ek.mutation_stats([], target, backend=backend)
    with pytest.raises(TypeError, match="logits must be a list"):
        ek.mutation_stats(heads[0], target, backend=backend)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ek.mutation_stats([heads[0][:, :1]], target, backend=backend)


# --------------------------------------------------------------------------------------------------
# EMCADNet heads="lowres" and SegmentationLoss(fused=...)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_net():
    from emcad.models import create_model

    torch.manual_seed(0)
    return create_model("emcad_b0", num_classes=4, in_channels=3)


def test_emcadnet_lowres_heads_upsample_to_all_heads(tiny_net):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tiny_net.eval()
    with torch.no_grad():
        low = tiny_net(x, heads="lowres")
        full = tiny_net(x, heads="all")
    assert [tuple(z.shape[-2:]) for z in low] == [(2, 2), (4, 4), (8, 8), (16, 16)]
    for a, b in zip(upsampled(low, (64, 64)), full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="heads must be one of"):
        tiny_net(x, heads="low")


def test_segmentation_loss_fused_equals_plain_on_emcadnet(tiny_net):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 4, (2, 64, 64), generator=torch.Generator().manual_seed(3))
    tiny_net.eval()  # deterministic forward (no DropPath); BatchNorm running statistics
    out = {}
    for name, fused, heads in (("fused", True, "lowres"), ("plain-lowres", False, "lowres"),
                               ("plain-all", False, "all")):
        tiny_net.zero_grad(set_to_none=True)
        crit = SegmentationLoss(4, fused=fused)
        loss = crit(tiny_net(x, heads=heads), y)
        loss.backward()
        assert crit.last_path == ("fused" if fused else "plain")
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in tiny_net.named_parameters()
                                     if p.grad is not None})
    scale = max(float(g.abs().max()) for g in out["plain-all"][1].values())
    for name in ("fused", "plain-lowres"):
        torch.testing.assert_close(out[name][0], out["plain-all"][0], atol=1e-5, rtol=1e-5)
        assert out[name][1].keys() == out["plain-all"][1].keys()
        for n, g in out[name][1].items():
            ref = out["plain-all"][1][n]
            # biases in front of a BatchNorm have zero true gradient: only rounding noise, hence the floor
            torch.testing.assert_close(g, ref, atol=1e-5 * scale, rtol=1e-3, msg=f"{name}: {n}")


def test_segmentation_loss_fused_choice():
    heads, target = make(n=4, k=3, dtype=torch.float32)
    auto = SegmentationLoss(3)
    loss = auto(heads, target)
    assert auto.last_path == "fused"
    torch.testing.assert_close(loss, plain_loss(heads, target), atol=1e-5, rtol=1e-5)
    # other supervisions and binary models: plain path (with the heads upsampled), or an error when required
    ds = SegmentationLoss(3, supervision="deep_supervision")
    ds(heads, target)
    assert ds.last_path == "plain"
    with pytest.raises(ValueError, match="fused=True.*supervision is 'deep_supervision'"):
        SegmentationLoss(3, supervision="deep_supervision", fused=True)(heads, target)
    binary = SegmentationLoss(1)
    mask = (torch.rand(2, 1, 13, 11) > 0.5).float()
    lb = binary([z[:, :1] for z in heads], mask)
    assert binary.last_path == "plain" and torch.isfinite(lb)
    with pytest.raises(ValueError, match="fused=True.*supervision is 'heads_and_sum'"):
        SegmentationLoss(1, fused=True)([z[:, :1] for z in heads], mask)
    with pytest.raises(ValueError, match="fused must be"):
        SegmentationLoss(3, fused="yes")
    # mixed dtypes (e.g. some heads under autocast) and bf16: computed in float32 like the plain path
    mixed = [heads[0].bfloat16(), *heads[1:]]
    lm = SegmentationLoss(3)(mixed, target)
    assert lm.dtype == torch.float32
    lb16 = SegmentationLoss(3)([z.bfloat16() for z in heads], target)
    assert lb16.dtype == torch.float32
    torch.testing.assert_close(lb16, plain_loss([z.bfloat16() for z in heads], target), atol=0.05, rtol=0.02)
    # fp16 (no cpu kernel: the reference backend, in float32) with its gradients in fp16
    h16 = [z.half().requires_grad_() for z in heads]
    l16 = SegmentationLoss(3)(h16, target)
    assert l16.dtype == torch.float32
    g16 = torch.autograd.grad(l16, h16)
    assert all(g.dtype == torch.float16 for g in g16)
    _, g32 = grads_of(lambda hs: plain_loss(hs, target), [z.half().float() for z in heads])
    for a, b in zip(g16, g32):
        torch.testing.assert_close(a.float(), b, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_int32_targets(backend):
    heads, target = make(n=2, k=4, size=(13, 11))
    wide = torch.randint(0, 4, (2, 13, 22), generator=torch.Generator().manual_seed(5))
    strided = wide[:, :, ::2]  # not contiguous
    want = ek.mutation_stats(heads, strided.contiguous(), backend=backend)
    for t in (strided, strided.int()):
        for a, b in zip(ek.mutation_stats(heads, t, backend=backend), want):
            assert torch.equal(a, b)


def test_trainer_uses_the_fused_loss_by_default(tmp_path):
    from emcad.training.trainer import TrainConfig, train

    tiny = dict(model="emcad_b0", size=(32, 32), batch_size=2, train_samples=4, val_samples=2, lr=1e-3,
                log_every=1, val_every=100, checkpoint_every=100, plots=False, progress=False, seed=3, threads=1)
    seen = {}

    def callback(trainer, step, loss):
        seen[trainer.cfg.loss_impl] = (trainer.loss_path, trainer.forward_kwargs)

    train(TrainConfig(**tiny, steps=1, output=str(tmp_path / "a")), callback=callback)
    train(TrainConfig(**tiny, steps=1, loss_impl="plain", output=str(tmp_path / "b")), callback=callback)
    assert seen["auto"] == ("fused", {"heads": "lowres"})
    assert seen["plain"] == ("plain", {})
    assert json.load(open(tmp_path / "a" / "config.json"))["loss_impl"] == "auto"
    from emcad.training.trainer import TrainError
    with pytest.raises(TrainError, match="loss_impl 'fused' computes the multi-class MUTATION loss"):
        train(TrainConfig(**tiny, steps=1, loss_impl="fused", supervision="deep_supervision",
                          output=str(tmp_path / "c")))
    with pytest.raises(TrainError, match="loss_impl must be one of"):
        train(TrainConfig(**tiny, steps=1, loss_impl="fast", output=str(tmp_path / "d")))


def test_cli_loss_impl_flag(tmp_path, capsys):
    from emcad.cli import main

    args = ["train", "--model", "emcad_b0", "--size", "32", "32", "--batch-size", "2", "--train-samples", "4",
            "--val-samples", "2", "--steps", "1", "--no-progress", "--no-plots", "--threads", "1"]
    assert main([*args, "--loss-impl", "fused", "-o", str(tmp_path / "f")]) == 0
    err = capsys.readouterr().err
    assert "loss path: fused" in err, err
    assert json.load(open(tmp_path / "f" / "config.json"))["loss_impl"] == "fused"
    assert main([*args, "--loss-impl", "plain", "-o", str(tmp_path / "p")]) == 0
    assert "loss path: plain" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--loss-impl", "nope"])


def _available_isas():
    if CPU_REASON is not None:
        return []
    out = [isa for isa in ("default", "avx2", "avx512") if torch.ops.emcad_kernels.cpu_set_isa(isa)]
    torch.ops.emcad_kernels.cpu_set_isa("auto")
    return out


@needs_cpu
@pytest.mark.parametrize("isa", _available_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_every_isa_build(isa, dtype):
    """The default (SSE2), AVX2 and AVX-512 builds of the kernels: each against the float64 reference."""
    heads, target = make(n=4, k=9, size=(28, 19), sizes=[(3, 2), (7, 5), (14, 10), (28, 19)], dtype=dtype)
    up = torch.randn(15, 9, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run(hs, backend):
        hs = [z.detach().clone().requires_grad_() for z in hs]
        ce, inter, psq, tcount = ek.mutation_stats(hs, target, backend=backend)
        total = ce.sum() + (inter * up.to(inter)).sum() + (psq * up.flip(0).to(psq)).sum()
        return torch.cat([ce, inter.flatten(), psq.flatten(), tcount]).detach(), torch.autograd.grad(total, hs)

    want = run([z.double() for z in heads], "reference")
    try:
        from emcad_kernels import _ext
        _ext.set_cpu_isa(isa)
        got = run(heads, "cpu")
    finally:
        torch.ops.emcad_kernels.cpu_set_isa("auto")
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4}[dtype]  # bf16: inputs rounded alike
    torch.testing.assert_close(got[0].double(), want[0], atol=tol * float(want[0].abs().max()), rtol=tol)
    for a, b in zip(got[1], want[1]):
        gtol = 1e-2 if dtype == torch.bfloat16 else tol  # bf16 gradients are rounded on output
        torch.testing.assert_close(a.double(), b, atol=gtol * float(b.abs().max()), rtol=gtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_larger_than_the_target_and_single_pixel_heads(backend):
    """Any head size: bilinear downsampling (F.interpolate semantics, no antialiasing) and 1x1 heads."""
    heads, target = make(n=3, k=3, size=(5, 7), sizes=[(1, 1), (9, 16), (5, 7)])
    want_loss, want = grads_of(lambda hs: plain_loss(hs, target), heads)
    got_loss, got = grads_of(lambda hs: ek.mutation_loss(hs, target, backend=backend), heads)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-12, rtol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-9)
