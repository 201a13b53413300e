"""Losses (MUTATION, TransUNet Dice, structure loss) and metrics (Dice, IoU, HD95, empty-mask conventions)."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emcad.losses import SegmentationLoss, ce_dice_loss, combine_heads, dice_loss, structure_loss
from emcad.metrics import binary_metrics, case_metrics, dice_coefficient, hd95, iou_score, summarize


def _transunet_dice(logits, target, k):
    """TransUNet's DiceLoss written out per class."""
    p = torch.softmax(logits, 1)
    total = 0.0
    for c in range(k):
        s, t = p[:, c], (target == c).float()
        inter = (s * t).sum()
        total = total + 1 - (2 * inter + 1e-5) / ((s * s).sum() + (t * t).sum() + 1e-5)
    return total / k


def test_dice_loss_matches_transunet():
    torch.manual_seed(0)
    z, y = torch.randn(3, 4, 8, 9, dtype=torch.float64), torch.randint(0, 4, (3, 8, 9))
    assert torch.allclose(dice_loss(z, y), _transunet_dice(z, y, 4))
    expected = 0.3 * F.cross_entropy(z, y) + 0.7 * _transunet_dice(z, y, 4)
    assert torch.allclose(ce_dice_loss(z, y), expected)


def test_mutation_loss_sums_the_15_subsets():
    torch.manual_seed(1)
    heads = [torch.randn(2, 3, 8, 8, dtype=torch.float64) for _ in range(4)]
    y = torch.randint(0, 3, (2, 8, 8))
    terms = combine_heads(heads, "mutation")
    assert len(terms) == 15
    expected = sum(ce_dice_loss(sum(heads[i] for i in s), y)
                   for r in range(1, 5) for s in itertools.combinations(range(4), r))
    loss = SegmentationLoss(3)  # auto: mutation + ce_dice
    assert loss.supervision == "mutation" and loss.criterion == "ce_dice"
    assert torch.allclose(loss(heads, y), expected)
    assert torch.allclose(SegmentationLoss(3, "last_layer")(heads, y), ce_dice_loss(heads[-1], y))
    assert torch.allclose(SegmentationLoss(3, "deep_supervision")(heads, y),
                          sum(ce_dice_loss(h, y) for h in heads))
    assert len(combine_heads(heads, "heads_and_sum")) == 5


def _structure_reference(z, m, weighted):
    weit = 1 + 5 * torch.abs(F.avg_pool2d(m, 31, 1, 15) - m)
    if weighted:
        wbce = F.binary_cross_entropy_with_logits(z, m, reduction="none")
        wbce = (weit * wbce).sum((2, 3)) / weit.sum((2, 3))
    else:  # what `reduce='none'` did in the original: the plain mean
        wbce = F.binary_cross_entropy_with_logits(z, m)
    p = torch.sigmoid(z)
    inter, union = (p * m * weit).sum((2, 3)), ((p + m) * weit).sum((2, 3))
    return (wbce + 1 - (inter + 1) / (union - inter + 1)).mean()


def test_structure_loss_explicit_reduction():
    torch.manual_seed(2)
    z = torch.randn(3, 1, 40, 40, dtype=torch.float64)
    m = (torch.rand(3, 1, 40, 40) > 0.7).double()
    weighted = structure_loss(z, m)
    collapsed = structure_loss(z, m, bce_reduction="mean")
    assert torch.allclose(weighted, _structure_reference(z, m, True))
    assert torch.allclose(collapsed, _structure_reference(z, m, False))
    assert not torch.allclose(weighted, collapsed)
    with pytest.raises(ValueError, match="bce_reduction"):
        structure_loss(z, m, bce_reduction="sum")
    binary = SegmentationLoss(1)
    assert binary.supervision == "heads_and_sum" and binary.criterion == "structure"
    heads = [z + i for i in range(4)]
    assert torch.allclose(binary(heads, m[:, 0].long()),
                          sum(_structure_reference(h, m, True) for h in heads + [sum(heads)]))


def test_loss_option_errors():
    with pytest.raises(ValueError, match="supervision"):
        SegmentationLoss(3, "everything")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SegmentationLoss(1, criterion="ce_dice")
    with pytest.raises(ValueError, match="num_classes == 1"):
        SegmentationLoss(3, criterion="structure")


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def _brute_hd95(p, g, spacing):
    """medpy's hd95 by brute force: surface points (face-connected erosion), all pairwise distances."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    fp = generate_binary_structure(p.ndim, 1)
    ps = np.argwhere(p ^ binary_erosion(p, fp)) * np.asarray(spacing)
    gs = np.argwhere(g ^ binary_erosion(g, fp)) * np.asarray(spacing)
    d = np.sqrt(((ps[:, None, :] - gs[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


@pytest.mark.parametrize("shape,spacing", [((24, 20), (1.0, 1.0)), ((24, 20), (0.5, 2.0)), ((6, 12, 10), (3, 1, 1))])
def test_hd95_matches_brute_force(shape, spacing):
    rng = np.random.default_rng(0)
    for _ in range(3):
        p = rng.random(shape) > 0.7
        g = rng.random(shape) > 0.8
        p[(slice(1, 4),) * len(shape)] = True
        g[(slice(-4, -1),) * len(shape)] = True
        assert hd95(p, g, spacing) == pytest.approx(_brute_hd95(p, g, spacing), rel=1e-9)


def test_dice_iou_values():
    p = np.zeros((10, 10), bool)
    g = np.zeros((10, 10), bool)
    p[:5, :4] = True  # 20
    g[:5, 2:6] = True  # 20, overlap 10
    assert dice_coefficient(p, g) == pytest.approx(0.5)
    assert iou_score(p, g) == pytest.approx(10 / 30)
    assert hd95(p, p) == 0.0


def test_empty_mask_conventions():
    e = np.zeros((8, 8), bool)
    f = np.zeros((8, 8), bool)
    f[2:4, 2:4] = True
    diag = math.sqrt(2) * 7
    std = {k: binary_metrics(a, b) for k, (a, b) in {"both_empty": (e, e), "missed": (e, f),
                                                       "hallucinated": (f, e), "hit": (f, f)}.items()}
    assert all(math.isnan(v) for v in std["both_empty"].values())
    assert std["missed"] == {"dice": 0.0, "iou": 0.0, "hd95": pytest.approx(diag)}
    assert std["hallucinated"] == {"dice": 0.0, "iou": 0.0, "hd95": pytest.approx(diag)}
    assert std["hit"] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}
    tu = {k: binary_metrics(a, b, convention="transunet") for k, (a, b) in
          {"both_empty": (e, e), "missed": (e, f), "hallucinated": (f, e)}.items()}
    assert tu["hallucinated"]["dice"] == 1 and tu["hallucinated"]["hd95"] == 0  # the original quirk, named
    assert tu["missed"]["dice"] == 0 and tu["missed"]["hd95"] == 0
    assert tu["both_empty"]["dice"] == 0
    with pytest.raises(ValueError, match="convention"):
        binary_metrics(e, e, convention="medpy")


def test_case_metrics_and_summary_skip_absent_classes():
    gt = np.zeros((16, 16), int)
    gt[2:6, 2:6] = 1
    pred = gt.copy()
    pred[10:12, 10:12] = 2  # hallucinated class 2 in case a
    a = case_metrics(pred, gt, 3, name="a")
    b = case_metrics(gt, gt, 3, name="b")  # class 2 absent and not predicted: NaN, skipped
    assert a.per_class[1]["dice"] == 1.0 and a.per_class[2]["dice"] == 0.0
    assert math.isnan(b.per_class[2]["dice"])
    s = summarize([a, b])
    assert s["per_class"][1]["dice"] == 1.0
    assert s["per_class"][2]["dice"] == 0.0  # only case a counts
    assert s["mean"]["dice"] == 0.5 and s["cases"] == 2
    binary = case_metrics(torch.tensor(gt), torch.tensor(gt), 1)
    assert list(binary.per_class) == [1] and binary.per_class[1]["dice"] == 1.0
