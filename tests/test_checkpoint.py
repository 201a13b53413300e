"""load_original_checkpoint: SLDGroup/EMCAD-style .pth files (plain EMCADNet state dicts) and every error case.

The "original" checkpoints are made here from randomly initialised models (nothing is downloaded): saved as
plain state dicts, with a DataParallel ``module.`` prefix, with the pre-2024-06-24 head names, wrapped, etc.
"""

from __future__ import annotations

import re

import pytest
import torch

from emcad import CheckpointError, create_model, load_original_checkpoint
from emcad.checkpoint import ACTIVATION_NOTE, infer_encoder
from emcad.encoders import ENCODERS, create_encoder

from test_blocks import randomize


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: these small problems gain nothing from two, and OpenMP barriers under a loaded
    2-core machine (float64 grouped convs run one small conv per group) slow them down by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

NC = 3


@pytest.fixture(scope="module")
def b0():
    """A B0 model with non-trivial decoder weights and BN statistics, and its state dict."""
    torch.manual_seed(0)
    model = create_model("emcad_b0", num_classes=NC)
    randomize(model.decoder)
    return model.eval(), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))


def _save(obj, path):
    torch.save(obj, path)
    return path


def _old_head_names(sd):
    """The head naming of SLDGroup/EMCAD before b27fea6 (2024-06-24): out_head{i} held today's out_head{5-i}."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^out_head([1-4])\.(.*)$", k)
        out[f"out_head{5 - int(m.group(1))}.{m.group(2)}" if m else k] = v
    return out


def _same_outputs(a, b, x):
    with torch.no_grad():
        return all(torch.equal(p, q) for p, q in zip(a(x), b(x)))


def test_plain_checkpoint_builds_model(b0, x, tmp_path):
    model, sd = b0
    path = _save(sd, tmp_path / "best.pth")
    loaded, report = load_original_checkpoint(path)
    assert loaded.encoder_name == "pvt_v2_b0" and loaded.num_classes == NC and not loaded.training
    assert report.encoder == "pvt_v2_b0" and report.num_classes == NC and report.model_built
    assert not report.renamed_heads and report.stripped_prefix is None and report.unwrapped == []
    assert ACTIVATION_NOTE in report.notes and "8f18a7d" in str(report)
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert _same_outputs(model, loaded, x)


def test_module_prefix_and_wrapper(b0, x, tmp_path):
    model, sd = b0
    wrapped = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    loaded, report = load_original_checkpoint(_save(wrapped, tmp_path / "dp.pth"))
    assert report.stripped_prefix == "module." and report.unwrapped == ["state_dict"]
    assert "stripped key prefix 'module.'" in str(report)
    assert _same_outputs(model, loaded, x)


def test_old_head_names_are_renamed(b0, x, tmp_path):
    model, sd = b0
    old = _old_head_names(sd)
    assert old["out_head1.weight"].shape == (NC, 256, 1, 1)  # C0 input channels: the old naming
    path = _save(old, tmp_path / "old.pth")
    loaded, report = load_original_checkpoint(path)
    assert report.renamed_heads and "out_head{i} -> out_head{5-i}" in str(report)
    assert loaded.out_head1.weight.shape == (NC, 32, 1, 1)
    assert _same_outputs(model, loaded, x)
    # into a given model, which keeps its mode
    target = create_model("emcad_b0", num_classes=NC).train()
    same, report = load_original_checkpoint(path, target)
    assert same is target and target.training and report.renamed_heads and not report.model_built
    assert _same_outputs(model, target.eval(), x)


def test_given_encoder_and_num_classes(b0, tmp_path):
    _, sd = b0
    path = _save(sd, tmp_path / "c.pth")
    loaded, _ = load_original_checkpoint(path, encoder="pvt_v2_b0", num_classes=NC)
    assert loaded.num_classes == NC
    with pytest.raises(CheckpointError, match=f"has {NC} output classes .* num_classes has 9"):
        load_original_checkpoint(path, num_classes=9)
    with pytest.raises(CheckpointError, match="has a pvt_v2_b0 encoder, but encoder='pvt_v2_b2'"):
        load_original_checkpoint(path, encoder="pvt_v2_b2")
    with pytest.raises(CheckpointError, match="the given model has 1"):
        load_original_checkpoint(path, create_model("emcad_b0", num_classes=1))


def test_truncated_file(b0, tmp_path):
    _, sd = b0
    path = _save(sd, tmp_path / "full.pth")
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth' is a truncated or corrupt PyTorch checkpoint"):
        load_original_checkpoint(cut)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth' is not a PyTorch checkpoint"):
        load_original_checkpoint(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_original_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_original_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_original_checkpoint(tmp_path)
    not_dict = _save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not contain a state dict"):
        load_original_checkpoint(not_dict)
    mixed = _save({"weight": torch.zeros(2), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="not a plain state dict.*epoch"):
        load_original_checkpoint(mixed)


class _Pickled:  # any non-tensor class: weights_only=True must refuse it
    pass


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"model": _Pickled()}, path)
    with pytest.raises(CheckpointError, match="arbitrary code.*refused"):
        load_original_checkpoint(path)


def test_encoder_only_checkpoint(tmp_path):
    enc = create_encoder("pvt_v2_b0")
    path = _save(enc.state_dict(), tmp_path / "pvt_v2_b0.pth")
    with pytest.raises(CheckpointError, match="not an EMCADNet checkpoint .*no 'decoder.\\*' keys.*encoder_weights"):
        load_original_checkpoint(path)
    other = _save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an EMCADNet checkpoint"):
        load_original_checkpoint(other)


def test_missing_and_unexpected_keys(b0, tmp_path):
    _, sd = b0
    broken = dict(sd)
    del broken["decoder.lgag2.psi.1.num_batches_tracked"]
    del broken["decoder.sab.conv.weight"]
    broken["decoder.sab2.conv.weight"] = torch.zeros(1, 2, 7, 7)
    path = _save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as info:
        load_original_checkpoint(path)
    msg = str(info.value)
    assert "broken.pth" in msg and "2 missing keys" in msg and "decoder.sab.conv.weight" in msg
    assert "decoder.lgag2.psi.1.num_batches_tracked" in msg
    assert "1 unexpected keys [decoder.sab2.conv.weight]" in msg


def test_shape_mismatch(b0, tmp_path):
    _, sd = b0
    bad = dict(sd)
    bad["decoder.mscb1.0.pconv1.0.weight"] = torch.zeros(96, 32, 1, 1)  # ef = 3 in one block only
    path = _save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches \[decoder.mscb1.0.pconv1.0.weight: checkpoint "
                                              r"\[96, 32, 1, 1\] vs model \[64, 32, 1, 1\]"):
        load_original_checkpoint(path)


def test_other_architecture(b0, tmp_path):
    """A ResNet-18 EMCADNet checkpoint: built correctly when no model is given, a clear error for a B0 model."""
    torch.manual_seed(0)
    r18 = create_model("emcad_resnet18", num_classes=2).eval()
    path = _save(r18.state_dict(), tmp_path / "r18.pth")
    loaded, report = load_original_checkpoint(path)
    assert report.encoder == "resnet18" and loaded.num_classes == 2 and "backbone.fc.weight" in loaded.state_dict()
    xr = torch.randn(1, 3, 64, 64)
    assert _same_outputs(r18, loaded, xr)
    target = create_model("emcad_b0", num_classes=2)
    with pytest.raises(CheckpointError, match="does not fit EMCADNet\\(encoder='pvt_v2_b0', num_classes=2\\): "
                                              ".*missing keys.*unexpected keys.*looks like resnet18"):
        load_original_checkpoint(path, target)


def test_unknown_encoder_structure(b0, tmp_path):
    _, sd = b0
    odd = {k: v for k, v in sd.items() if not k.startswith("backbone.block4.1.")}  # depths [2, 2, 2, 1]
    with pytest.raises(CheckpointError, match="unknown architecture: PVTv2-like encoder .* depths \\[2, 2, 2, 1\\]"):
        load_original_checkpoint(_save(odd, tmp_path / "odd.pth"))
    # with a model given, the structural guess is not needed: the key comparison reports it
    with pytest.raises(CheckpointError, match="missing keys \\[backbone.block4.1."):
        load_original_checkpoint(tmp_path / "odd.pth", create_model("emcad_b0", num_classes=NC))


def test_decoder_settings_are_inferred(tmp_path):
    torch.manual_seed(0)
    model = create_model("emcad_b0", num_classes=1, expansion_factor=3, kernel_sizes=[3, 5], add=False,
                         lgag_ks=1).eval()
    loaded, _ = load_original_checkpoint(_save(model.state_dict(), tmp_path / "cfg.pth"))
    assert loaded.config == model.config
    x = torch.randn(1, 3, 64, 64)
    assert _same_outputs(model, loaded, x)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_infer_encoder_for_every_encoder(name):
    with torch.device("meta"):
        enc = create_encoder(name)
    sd = {f"backbone.{k}": v for k, v in enc.state_dict().items()}
    assert infer_encoder(sd) == name


def test_safetensors_original_layout(b0, x, tmp_path):
    from safetensors.torch import save_file

    model, sd = b0
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in _old_head_names(sd).items()}, str(path))
    loaded, report = load_original_checkpoint(path)
    assert report.renamed_heads and _same_outputs(model, loaded, x)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_original_checkpoint(path)


def test_pickle_protocol_legacy_truncated(b0, tmp_path):
    _, sd = b0
    path = tmp_path / "legacy.pth"
    torch.save({k: sd[k] for k in list(sd)[:5]}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_original_checkpoint(path)
