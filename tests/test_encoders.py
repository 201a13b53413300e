"""Tests for emcad.encoders: architecture numbers, shapes and weight loading.

Large variants are built on the meta device (no memory, no initialisation
cost) and used only for counting; forward passes use pvt_v2_b0 and resnet18.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn

from emcad.encoders import (
    ENCODER_CHANNELS,
    ENCODERS,
    EncoderWeightsError,
    convert_official_pvt_to_timm,
    convert_timm_pvt_to_official,
    create_encoder,
    detect_key_format,
    load_encoder_weights,
    pvt_v2_b0,
    resnet18,
)
from emcad.encoders.pvtv2 import DropPath

# name: (parameters, state-dict entries). PVTv2 numbers (no head) are
# docs/models.md#encoders; ResNet parameters include the unused fc, and its
# state-dict entries include the BatchNorm buffers, as in torchvision.
EXPECTED_COUNTS = {
    "pvt_v2_b0": (3_409_760, 176),
    "pvt_v2_b1": (13_496_000, 176),
    "pvt_v2_b2": (24_849_856, 332),
    "pvt_v2_b3": (44_725_696, 572),
    "pvt_v2_b4": (62_043_072, 832),
    "pvt_v2_b5": (81_443_008, 1052),
    "resnet18": (11_689_512, 122),
    "resnet34": (21_797_672, 218),
    "resnet50": (25_557_032, 320),
    "resnet101": (44_549_160, 626),
    "resnet152": (60_192_808, 932),
}
RESNET_PARAMS_WITHOUT_FC = {
    "resnet18": 11_176_512,
    "resnet34": 21_284_672,
    "resnet50": 23_508_032,
    "resnet101": 42_500_160,
    "resnet152": 58_143_808,
}


def _build_on_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return ENCODERS[name]()


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _outputs(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return encoder.eval()(x)


def _assert_same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) == 4
    for fa, fb in zip(a, b):
        assert torch.equal(fa, fb)


# --------------------------------------------------------------------------- architecture


def test_registry_covers_all_variants():
    assert set(ENCODERS) == set(EXPECTED_COUNTS) == set(ENCODER_CHANNELS)


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_param_and_key_counts(name):
    encoder = _build_on_meta(name)
    params, keys = EXPECTED_COUNTS[name]
    assert _num_params(encoder) == params
    assert len(encoder.state_dict()) == keys
    assert encoder.out_channels == ENCODER_CHANNELS[name]
    if name.startswith("resnet"):
        without_fc = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("fc."))
        assert without_fc == RESNET_PARAMS_WITHOUT_FC[name]


def test_pvt_official_key_names_and_shapes():
    sd = _build_on_meta("pvt_v2_b0").state_dict()
    assert list(sd)[:4] == [
        "patch_embed1.proj.weight",
        "patch_embed1.proj.bias",
        "patch_embed1.norm.weight",
        "patch_embed1.norm.bias",
    ]
    assert sd["patch_embed1.proj.weight"].shape == (32, 3, 7, 7)
    assert sd["patch_embed2.proj.weight"].shape == (64, 32, 3, 3)
    assert sd["block1.0.attn.kv.weight"].shape == (64, 32)
    assert sd["block1.0.attn.sr.weight"].shape == (32, 32, 8, 8)
    assert sd["block3.1.attn.sr.weight"].shape == (160, 160, 2, 2)
    assert sd["block1.0.mlp.fc1.weight"].shape == (256, 32)
    assert sd["block1.0.mlp.dwconv.dwconv.weight"].shape == (256, 1, 3, 3)
    assert sd["block4.1.mlp.fc2.weight"].shape == (256, 1024)
    assert sd["norm4.weight"].shape == (256,)
    # Stage 4 (sr_ratio 1) has no spatial reduction.
    assert not any(re.match(r"block4\.\d+\.attn\.(sr|norm)\.", k) for k in sd)
    assert not any(k.startswith("head.") for k in sd)


def test_pvt_layernorm_eps_and_drop_path_schedule():
    encoder = _build_on_meta("pvt_v2_b0")
    assert encoder.patch_embed1.norm.eps == 1e-5
    assert encoder.block1[0].attn.norm.eps == 1e-5
    assert encoder.block1[0].norm1.eps == encoder.block1[0].norm2.eps == 1e-6
    assert encoder.norm1.eps == encoder.norm4.eps == 1e-6
    blocks = [block for stage in range(1, 5) for block in getattr(encoder, f"block{stage}")]
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, len(blocks)).tolist())
    assert isinstance(blocks[0].drop_path, nn.Identity)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(64, 5, 3)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.amin(1) == per_sample.amax(1))  # one decision per sample
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("build", [pvt_v2_b0, resnet18], ids=["pvt_v2_b0", "resnet18"])
@pytest.mark.parametrize("height,width", [(64, 64), (96, 64)])
def test_feature_shapes_and_strides(build, height, width):
    torch.manual_seed(0)
    encoder = build()
    features = _outputs(encoder, torch.randn(1, 3, height, width))
    assert len(features) == 4
    for feature, channels, stride in zip(features, encoder.out_channels, (4, 8, 16, 32)):
        assert feature.shape == (1, channels, height // stride, width // stride)
        assert feature.is_contiguous()


def test_pvt_batch_of_two_is_per_sample():
    torch.manual_seed(0)
    encoder = pvt_v2_b0()
    x = torch.randn(2, 3, 64, 64)
    both = _outputs(encoder, x)
    first = _outputs(encoder, x[:1])
    for fb, f1 in zip(both, first):
        torch.testing.assert_close(fb[:1], f1, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- weight loading


@pytest.fixture(scope="module")
def pvt_reference():
    """A randomly initialised b0, its state dict and its features on a fixed input."""
    torch.manual_seed(1)
    encoder = pvt_v2_b0().eval()
    x = torch.randn(1, 3, 64, 64)
    return encoder.state_dict(), x, _outputs(encoder, x)


@pytest.fixture(scope="module")
def resnet_reference():
    torch.manual_seed(2)
    encoder = resnet18().eval()
    # Non-trivial BatchNorm statistics, so that loading them is actually tested.
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    return encoder.state_dict(), x, _outputs(encoder, x)


def _fresh_pvt() -> nn.Module:
    torch.manual_seed(123)  # a different initialisation than the reference
    return pvt_v2_b0()


def _fresh_resnet() -> nn.Module:
    torch.manual_seed(123)
    return resnet18()


PVT_FILE_LAYOUTS = {
    "official": lambda sd: sd,
    "timm": convert_official_pvt_to_timm,
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "state_dict_wrapper": lambda sd: {"state_dict": sd, "epoch": 3},
    "model_wrapper_timm": lambda sd: {"model": convert_official_pvt_to_timm(sd)},
    "imagenet_with_head": lambda sd: {
        **sd,
        "head.weight": torch.randn(1000, 256),
        "head.bias": torch.zeros(1000),
    },
    "timm_with_head": lambda sd: {
        **convert_official_pvt_to_timm(sd),
        "head.weight": torch.randn(1000, 256),
        "head.bias": torch.zeros(1000),
    },
    "timm_features_only": lambda sd: {
        k.replace("stages.", "stages_", 1): v for k, v in convert_official_pvt_to_timm(sd).items()
    },
}


@pytest.mark.parametrize("layout", sorted(PVT_FILE_LAYOUTS))
def test_pvt_file_layouts_load_and_reproduce_outputs(tmp_path, pvt_reference, layout):
    state_dict, x, expected = pvt_reference
    path = tmp_path / f"{layout}.pth"
    torch.save(PVT_FILE_LAYOUTS[layout](dict(state_dict)), path)

    encoder = _fresh_pvt()
    load_encoder_weights(encoder, path)
    _assert_same_outputs(_outputs(encoder, x), expected)


def test_pvt_safetensors_file_loads(tmp_path, pvt_reference):
    from safetensors.torch import save_file

    state_dict, x, expected = pvt_reference
    path = tmp_path / "pvt_v2_b0.safetensors"
    save_file(convert_official_pvt_to_timm(state_dict), str(path))
    encoder = create_encoder("pvt_v2_b0", weights=path)
    _assert_same_outputs(_outputs(encoder, x), expected)


def test_timm_key_names_and_round_trip(pvt_reference):
    state_dict = pvt_reference[0]
    timm_sd = convert_official_pvt_to_timm(state_dict)
    for key in (
        "patch_embed.proj.weight",
        "stages.1.downsample.proj.weight",
        "stages.3.downsample.norm.bias",
        "stages.0.blocks.1.attn.sr.weight",
        "stages.0.blocks.0.mlp.dwconv.weight",
        "stages.2.blocks.0.norm1.weight",
        "stages.3.norm.weight",
    ):
        assert key in timm_sd
    assert not any(k.startswith(("patch_embed1", "block", "norm")) for k in timm_sd)
    assert not any("dwconv.dwconv" in k for k in timm_sd)
    assert len(timm_sd) == len(state_dict)
    back = convert_timm_pvt_to_official(timm_sd)
    assert list(back) == list(state_dict)
    assert detect_key_format(state_dict) == "pvt_v2_official"
    assert detect_key_format(timm_sd) == "pvt_v2_timm"


def test_resnet_torchvision_file_with_fc_loads(tmp_path, resnet_reference):
    state_dict, x, expected = resnet_reference
    path = tmp_path / "resnet18.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    encoder = _fresh_resnet()
    load_encoder_weights(encoder, path)
    _assert_same_outputs(_outputs(encoder, x), expected)
    assert torch.equal(encoder.fc.weight, state_dict["fc.weight"])


def test_resnet_file_without_fc_or_bn_counters_loads_strictly(tmp_path, resnet_reference):
    # Old torchvision files lack num_batches_tracked; feature-extractor files lack fc.
    state_dict, x, expected = resnet_reference
    trimmed = {k: v for k, v in state_dict.items() if not k.startswith("fc.") and "num_batches" not in k}
    path = tmp_path / "resnet18_features.pth"
    torch.save(trimmed, path)
    encoder = _fresh_resnet()
    fc_before = encoder.fc.weight.clone()
    load_encoder_weights(encoder, path)
    _assert_same_outputs(_outputs(encoder, x), expected)
    assert torch.equal(encoder.fc.weight, fc_before)


# --------------------------------------------------------------------------- errors


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_missing_key_is_reported(tmp_path, pvt_reference):
    state_dict = dict(pvt_reference[0])
    del state_dict["block2.1.attn.q.bias"]
    path = _save(tmp_path, "missing.pth", state_dict)
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder_weights(_fresh_pvt(), path)
    message = str(info.value)
    assert "missing.pth" in message
    assert "pvt_v2_official" in message
    assert "missing keys (1): block2.1.attn.q.bias" in message
    assert "unexpected" not in message


def test_unexpected_keys_are_reported_and_truncated(tmp_path, pvt_reference):
    extra = {f"extra.{i}.weight": torch.zeros(1) for i in range(15)}
    path = _save(tmp_path, "unexpected.pth", {**pvt_reference[0], **extra})
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder_weights(_fresh_pvt(), path)
    message = str(info.value)
    assert "unexpected keys (15): extra.0.weight" in message
    assert "(+5 more)" in message
    assert "missing" not in message


def test_shape_mismatch_is_reported_and_encoder_left_unchanged(tmp_path, pvt_reference):
    state_dict = dict(pvt_reference[0])
    state_dict["norm4.weight"] = torch.ones(512)
    path = _save(tmp_path, "shape.pth", state_dict)
    encoder = _fresh_pvt()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    expected_message = r"shape mismatches \(1\): norm4.weight: file \[512\] vs encoder \[256\]"
    with pytest.raises(EncoderWeightsError, match=expected_message):
        load_encoder_weights(encoder, path)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_non_strict_loads_matching_tensors_with_warning(tmp_path, pvt_reference):
    state_dict = dict(pvt_reference[0])
    del state_dict["norm4.bias"]
    path = _save(tmp_path, "partial.pth", state_dict)
    encoder = _fresh_pvt()
    with pytest.warns(UserWarning, match=r"missing keys \(1\): norm4.bias"):
        load_encoder_weights(encoder, path, strict=False)
    assert torch.equal(encoder.norm4.weight, state_dict["norm4.weight"])


def test_non_strict_still_rejects_a_file_that_fits_nothing(tmp_path, pvt_reference):
    mismatched = {k: torch.zeros(1) for k in pvt_reference[0]}
    path = _save(tmp_path, "nothing_fits.pth", mismatched)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(EncoderWeightsError, match="shape mismatches"):
            load_encoder_weights(_fresh_pvt(), path, strict=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_reported(tmp_path, pvt_reference, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"truncated{suffix}"
    if suffix == ".pth":
        torch.save(pvt_reference[0], path)
    else:
        save_file(pvt_reference[0], str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EncoderWeightsError, match=r"cannot read encoder weights file '.*truncated") as info:
        load_encoder_weights(_fresh_pvt(), path)
    assert "truncated or corrupt" in str(info.value)


def test_garbage_file_is_reported(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint\x00\xff" * 40)
    with pytest.raises(EncoderWeightsError, match=r"garbage\.pth.*not a valid PyTorch checkpoint"):
        load_encoder_weights(_fresh_pvt(), path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist.pth"):
        load_encoder_weights(_fresh_pvt(), tmp_path / "does_not_exist.pth")


def test_checkpoint_without_tensors_is_reported(tmp_path):
    path = _save(tmp_path, "metadata.pth", {"epoch": 3, "lr": 0.1})
    expected_message = "not a plain state dict: entries without tensors: epoch, lr"
    with pytest.raises(EncoderWeightsError, match=expected_message):
        load_encoder_weights(_fresh_pvt(), path)


def test_weights_of_another_family_are_rejected(tmp_path, resnet_reference, pvt_reference):
    resnet_path = _save(tmp_path, "resnet18.pth", resnet_reference[0])
    with pytest.raises(EncoderWeightsError, match=r"holds ResNet weights .*resnet_torchvision.*is a PVTv2"):
        load_encoder_weights(_fresh_pvt(), resnet_path)
    pvt_path = _save(tmp_path, "pvt.pth", pvt_reference[0])
    with pytest.raises(EncoderWeightsError, match="holds PVTv2 weights"):
        load_encoder_weights(_fresh_resnet(), pvt_path)


def test_unrecognised_key_format_is_reported(tmp_path):
    path = _save(tmp_path, "emcad_net.pth", {"backbone.patch_embed1.proj.weight": torch.zeros(1)})
    with pytest.raises(EncoderWeightsError, match="unrecognised key format.*full-network checkpoint"):
        load_encoder_weights(_fresh_pvt(), path)


def test_variant_mismatch_lists_shapes(tmp_path):
    b0_path = _save(tmp_path, "b0.pth", _fresh_pvt().state_dict())
    encoder = _build_on_meta("pvt_v2_b1")  # the check fails before any tensor is copied
    with pytest.raises(EncoderWeightsError, match=r"shape mismatches \(\d+\).*\(\+\d+ more\)") as info:
        load_encoder_weights(encoder, b0_path)
    assert "another variant" in str(info.value)


# --------------------------------------------------------------------------- factory


def test_create_encoder_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_encoder("pvt_v2_b9")
    message = str(info.value)
    assert "unknown encoder 'pvt_v2_b9'" in message
    assert all(name in message for name in ENCODERS)


def test_create_encoder_passes_kwargs():
    with torch.device("meta"):
        encoder = create_encoder("pvt_v2_b0", drop_path_rate=0.0)
    assert all(isinstance(b.drop_path, nn.Identity) for b in encoder.block4)
