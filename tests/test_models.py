"""EMCAD decoder and EMCADNet: state-dict layout (docs/state_dicts.md#emcad-decoder-pvtv2-b2-channels), parameter counts
(docs/models.md#parameter-counts), shapes, input validation, fused vs ``backend="torch"`` for the whole decoder, the
registry and save_pretrained / from_pretrained.

Large models are built on the meta device where only parameters are counted.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn

import emcad
from emcad import EMCAD, EMCADNet, create_model, from_pretrained, list_models, save_pretrained, set_backend
from emcad.models.registry import CONFIG_NAME, WEIGHTS_NAME

from test_blocks import CallCounter, assert_close_scaled, randomize


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: these small problems gain nothing from two, and OpenMP barriers under a loaded
    2-core machine (float64 grouped convs run one small conv per group) slow them down by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

B2 = [512, 320, 128, 64]
B0 = [256, 160, 64, 32]
RESNET18 = [512, 256, 128, 64]

# docs/state_dicts.md#emcad-decoder-pvtv2-b2-channels: the complete decoder state dict for PVTv2-B2 channels, ef = 2
# (216 entries, in order).
APPENDIX_A = """
mscb4.0.pconv1.0.weight                       [1024, 512, 1, 1]
mscb4.0.pconv1.1.weight                       [1024]
mscb4.0.pconv1.1.bias                         [1024]
mscb4.0.pconv1.1.running_mean                 [1024]
mscb4.0.pconv1.1.running_var                  [1024]
mscb4.0.pconv1.1.num_batches_tracked          [] (int64)
mscb4.0.msdc.dwconvs.0.0.weight               [1024, 1, 1, 1]
mscb4.0.msdc.dwconvs.0.1.weight               [1024]
mscb4.0.msdc.dwconvs.0.1.bias                 [1024]
mscb4.0.msdc.dwconvs.0.1.running_mean         [1024]
mscb4.0.msdc.dwconvs.0.1.running_var          [1024]
mscb4.0.msdc.dwconvs.0.1.num_batches_tracked  [] (int64)
mscb4.0.msdc.dwconvs.1.0.weight               [1024, 1, 3, 3]
mscb4.0.msdc.dwconvs.1.1.weight               [1024]
mscb4.0.msdc.dwconvs.1.1.bias                 [1024]
mscb4.0.msdc.dwconvs.1.1.running_mean         [1024]
mscb4.0.msdc.dwconvs.1.1.running_var          [1024]
mscb4.0.msdc.dwconvs.1.1.num_batches_tracked  [] (int64)
mscb4.0.msdc.dwconvs.2.0.weight               [1024, 1, 5, 5]
mscb4.0.msdc.dwconvs.2.1.weight               [1024]
mscb4.0.msdc.dwconvs.2.1.bias                 [1024]
mscb4.0.msdc.dwconvs.2.1.running_mean         [1024]
mscb4.0.msdc.dwconvs.2.1.running_var          [1024]
mscb4.0.msdc.dwconvs.2.1.num_batches_tracked  [] (int64)
mscb4.0.pconv2.0.weight                       [512, 1024, 1, 1]
mscb4.0.pconv2.1.weight                       [512]
mscb4.0.pconv2.1.bias                         [512]
mscb4.0.pconv2.1.running_mean                 [512]
mscb4.0.pconv2.1.running_var                  [512]
mscb4.0.pconv2.1.num_batches_tracked          [] (int64)
eucb3.up_dwc.1.weight                         [512, 1, 3, 3]
eucb3.up_dwc.2.weight                         [512]
eucb3.up_dwc.2.bias                           [512]
eucb3.up_dwc.2.running_mean                   [512]
eucb3.up_dwc.2.running_var                    [512]
eucb3.up_dwc.2.num_batches_tracked            [] (int64)
eucb3.pwc.0.weight                            [320, 512, 1, 1]
eucb3.pwc.0.bias                              [320]
lgag3.W_g.0.weight                            [160, 2, 3, 3]
lgag3.W_g.0.bias                              [160]
lgag3.W_g.1.weight                            [160]
lgag3.W_g.1.bias                              [160]
lgag3.W_g.1.running_mean                      [160]
lgag3.W_g.1.running_var                       [160]
lgag3.W_g.1.num_batches_tracked               [] (int64)
lgag3.W_x.0.weight                            [160, 2, 3, 3]
lgag3.W_x.0.bias                              [160]
lgag3.W_x.1.weight                            [160]
lgag3.W_x.1.bias                              [160]
lgag3.W_x.1.running_mean                      [160]
lgag3.W_x.1.running_var                       [160]
lgag3.W_x.1.num_batches_tracked               [] (int64)
lgag3.psi.0.weight                            [1, 160, 1, 1]
lgag3.psi.0.bias                              [1]
lgag3.psi.1.weight                            [1]
lgag3.psi.1.bias                              [1]
lgag3.psi.1.running_mean                      [1]
lgag3.psi.1.running_var                       [1]
lgag3.psi.1.num_batches_tracked               [] (int64)
mscb3.0.pconv1.0.weight                       [640, 320, 1, 1]
mscb3.0.pconv1.1.weight                       [640]
mscb3.0.pconv1.1.bias                         [640]
mscb3.0.pconv1.1.running_mean                 [640]
mscb3.0.pconv1.1.running_var                  [640]
mscb3.0.pconv1.1.num_batches_tracked          [] (int64)
mscb3.0.msdc.dwconvs.0.0.weight               [640, 1, 1, 1]
mscb3.0.msdc.dwconvs.0.1.weight               [640]
mscb3.0.msdc.dwconvs.0.1.bias                 [640]
mscb3.0.msdc.dwconvs.0.1.running_mean         [640]
mscb3.0.msdc.dwconvs.0.1.running_var          [640]
mscb3.0.msdc.dwconvs.0.1.num_batches_tracked  [] (int64)
mscb3.0.msdc.dwconvs.1.0.weight               [640, 1, 3, 3]
mscb3.0.msdc.dwconvs.1.1.weight               [640]
mscb3.0.msdc.dwconvs.1.1.bias                 [640]
mscb3.0.msdc.dwconvs.1.1.running_mean         [640]
mscb3.0.msdc.dwconvs.1.1.running_var          [640]
mscb3.0.msdc.dwconvs.1.1.num_batches_tracked  [] (int64)
mscb3.0.msdc.dwconvs.2.0.weight               [640, 1, 5, 5]
mscb3.0.msdc.dwconvs.2.1.weight               [640]
mscb3.0.msdc.dwconvs.2.1.bias                 [640]
mscb3.0.msdc.dwconvs.2.1.running_mean         [640]
mscb3.0.msdc.dwconvs.2.1.running_var          [640]
mscb3.0.msdc.dwconvs.2.1.num_batches_tracked  [] (int64)
mscb3.0.pconv2.0.weight                       [320, 640, 1, 1]
mscb3.0.pconv2.1.weight                       [320]
mscb3.0.pconv2.1.bias                         [320]
mscb3.0.pconv2.1.running_mean                 [320]
mscb3.0.pconv2.1.running_var                  [320]
mscb3.0.pconv2.1.num_batches_tracked          [] (int64)
eucb2.up_dwc.1.weight                         [320, 1, 3, 3]
eucb2.up_dwc.2.weight                         [320]
eucb2.up_dwc.2.bias                           [320]
eucb2.up_dwc.2.running_mean                   [320]
eucb2.up_dwc.2.running_var                    [320]
eucb2.up_dwc.2.num_batches_tracked            [] (int64)
eucb2.pwc.0.weight                            [128, 320, 1, 1]
eucb2.pwc.0.bias                              [128]
lgag2.W_g.0.weight                            [64, 2, 3, 3]
lgag2.W_g.0.bias                              [64]
lgag2.W_g.1.weight                            [64]
lgag2.W_g.1.bias                              [64]
lgag2.W_g.1.running_mean                      [64]
lgag2.W_g.1.running_var                       [64]
lgag2.W_g.1.num_batches_tracked               [] (int64)
lgag2.W_x.0.weight                            [64, 2, 3, 3]
lgag2.W_x.0.bias                              [64]
lgag2.W_x.1.weight                            [64]
lgag2.W_x.1.bias                              [64]
lgag2.W_x.1.running_mean                      [64]
lgag2.W_x.1.running_var                       [64]
lgag2.W_x.1.num_batches_tracked               [] (int64)
lgag2.psi.0.weight                            [1, 64, 1, 1]
lgag2.psi.0.bias                              [1]
lgag2.psi.1.weight                            [1]
lgag2.psi.1.bias                              [1]
lgag2.psi.1.running_mean                      [1]
lgag2.psi.1.running_var                       [1]
lgag2.psi.1.num_batches_tracked               [] (int64)
mscb2.0.pconv1.0.weight                       [256, 128, 1, 1]
mscb2.0.pconv1.1.weight                       [256]
mscb2.0.pconv1.1.bias                         [256]
mscb2.0.pconv1.1.running_mean                 [256]
mscb2.0.pconv1.1.running_var                  [256]
mscb2.0.pconv1.1.num_batches_tracked          [] (int64)
mscb2.0.msdc.dwconvs.0.0.weight               [256, 1, 1, 1]
mscb2.0.msdc.dwconvs.0.1.weight               [256]
mscb2.0.msdc.dwconvs.0.1.bias                 [256]
mscb2.0.msdc.dwconvs.0.1.running_mean         [256]
mscb2.0.msdc.dwconvs.0.1.running_var          [256]
mscb2.0.msdc.dwconvs.0.1.num_batches_tracked  [] (int64)
mscb2.0.msdc.dwconvs.1.0.weight               [256, 1, 3, 3]
mscb2.0.msdc.dwconvs.1.1.weight               [256]
mscb2.0.msdc.dwconvs.1.1.bias                 [256]
mscb2.0.msdc.dwconvs.1.1.running_mean         [256]
mscb2.0.msdc.dwconvs.1.1.running_var          [256]
mscb2.0.msdc.dwconvs.1.1.num_batches_tracked  [] (int64)
mscb2.0.msdc.dwconvs.2.0.weight               [256, 1, 5, 5]
mscb2.0.msdc.dwconvs.2.1.weight               [256]
mscb2.0.msdc.dwconvs.2.1.bias                 [256]
mscb2.0.msdc.dwconvs.2.1.running_mean         [256]
mscb2.0.msdc.dwconvs.2.1.running_var          [256]
mscb2.0.msdc.dwconvs.2.1.num_batches_tracked  [] (int64)
mscb2.0.pconv2.0.weight                       [128, 256, 1, 1]
mscb2.0.pconv2.1.weight                       [128]
mscb2.0.pconv2.1.bias                         [128]
mscb2.0.pconv2.1.running_mean                 [128]
mscb2.0.pconv2.1.running_var                  [128]
mscb2.0.pconv2.1.num_batches_tracked          [] (int64)
eucb1.up_dwc.1.weight                         [128, 1, 3, 3]
eucb1.up_dwc.2.weight                         [128]
eucb1.up_dwc.2.bias                           [128]
eucb1.up_dwc.2.running_mean                   [128]
eucb1.up_dwc.2.running_var                    [128]
eucb1.up_dwc.2.num_batches_tracked            [] (int64)
eucb1.pwc.0.weight                            [64, 128, 1, 1]
eucb1.pwc.0.bias                              [64]
lgag1.W_g.0.weight                            [32, 2, 3, 3]
lgag1.W_g.0.bias                              [32]
lgag1.W_g.1.weight                            [32]
lgag1.W_g.1.bias                              [32]
lgag1.W_g.1.running_mean                      [32]
lgag1.W_g.1.running_var                       [32]
lgag1.W_g.1.num_batches_tracked               [] (int64)
lgag1.W_x.0.weight                            [32, 2, 3, 3]
lgag1.W_x.0.bias                              [32]
lgag1.W_x.1.weight                            [32]
lgag1.W_x.1.bias                              [32]
lgag1.W_x.1.running_mean                      [32]
lgag1.W_x.1.running_var                       [32]
lgag1.W_x.1.num_batches_tracked               [] (int64)
lgag1.psi.0.weight                            [1, 32, 1, 1]
lgag1.psi.0.bias                              [1]
lgag1.psi.1.weight                            [1]
lgag1.psi.1.bias                              [1]
lgag1.psi.1.running_mean                      [1]
lgag1.psi.1.running_var                       [1]
lgag1.psi.1.num_batches_tracked               [] (int64)
mscb1.0.pconv1.0.weight                       [128, 64, 1, 1]
mscb1.0.pconv1.1.weight                       [128]
mscb1.0.pconv1.1.bias                         [128]
mscb1.0.pconv1.1.running_mean                 [128]
mscb1.0.pconv1.1.running_var                  [128]
mscb1.0.pconv1.1.num_batches_tracked          [] (int64)
mscb1.0.msdc.dwconvs.0.0.weight               [128, 1, 1, 1]
mscb1.0.msdc.dwconvs.0.1.weight               [128]
mscb1.0.msdc.dwconvs.0.1.bias                 [128]
mscb1.0.msdc.dwconvs.0.1.running_mean         [128]
mscb1.0.msdc.dwconvs.0.1.running_var          [128]
mscb1.0.msdc.dwconvs.0.1.num_batches_tracked  [] (int64)
mscb1.0.msdc.dwconvs.1.0.weight               [128, 1, 3, 3]
mscb1.0.msdc.dwconvs.1.1.weight               [128]
mscb1.0.msdc.dwconvs.1.1.bias                 [128]
mscb1.0.msdc.dwconvs.1.1.running_mean         [128]
mscb1.0.msdc.dwconvs.1.1.running_var          [128]
mscb1.0.msdc.dwconvs.1.1.num_batches_tracked  [] (int64)
mscb1.0.msdc.dwconvs.2.0.weight               [128, 1, 5, 5]
mscb1.0.msdc.dwconvs.2.1.weight               [128]
mscb1.0.msdc.dwconvs.2.1.bias                 [128]
mscb1.0.msdc.dwconvs.2.1.running_mean         [128]
mscb1.0.msdc.dwconvs.2.1.running_var          [128]
mscb1.0.msdc.dwconvs.2.1.num_batches_tracked  [] (int64)
mscb1.0.pconv2.0.weight                       [64, 128, 1, 1]
mscb1.0.pconv2.1.weight                       [64]
mscb1.0.pconv2.1.bias                         [64]
mscb1.0.pconv2.1.running_mean                 [64]
mscb1.0.pconv2.1.running_var                  [64]
mscb1.0.pconv2.1.num_batches_tracked          [] (int64)
cab4.fc1.weight                               [32, 512, 1, 1]
cab4.fc2.weight                               [512, 32, 1, 1]
cab3.fc1.weight                               [20, 320, 1, 1]
cab3.fc2.weight                               [320, 20, 1, 1]
cab2.fc1.weight                               [8, 128, 1, 1]
cab2.fc2.weight                               [128, 8, 1, 1]
cab1.fc1.weight                               [4, 64, 1, 1]
cab1.fc2.weight                               [64, 4, 1, 1]
sab.conv.weight                               [1, 2, 7, 7]
"""


def parse_appendix_a() -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for line in APPENDIX_A.strip().splitlines():
        key, shape = re.match(r"^(\S+)\s+\[([0-9, ]*)\]", line).groups()
        entries.append((key, tuple(int(v) for v in shape.split(",")) if shape.strip() else ()))
    return entries


BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def decoder_layout(channels, ef=2, kernel_sizes=(1, 3, 5)) -> list[tuple[str, tuple[int, ...]]]:
    """The decoder key/shape pattern of docs/models.md#decoder-keys for any channel list."""
    out = []

    def bn(prefix, n):
        out.extend((f"{prefix}.{s}", (n,) if s != "num_batches_tracked" else ()) for s in BN_SUFFIXES)

    def mscb(s, c):
        e = ef * c
        out.append((f"mscb{s}.0.pconv1.0.weight", (e, c, 1, 1)))
        bn(f"mscb{s}.0.pconv1.1", e)
        for i, k in enumerate(kernel_sizes):
            out.append((f"mscb{s}.0.msdc.dwconvs.{i}.0.weight", (e, 1, k, k)))
            bn(f"mscb{s}.0.msdc.dwconvs.{i}.1", e)
        out.append((f"mscb{s}.0.pconv2.0.weight", (c, e, 1, 1)))
        bn(f"mscb{s}.0.pconv2.1", c)

    mscb(4, channels[0])
    for s, cin, c in ((3, channels[0], channels[1]), (2, channels[1], channels[2]), (1, channels[2], channels[3])):
        out.append((f"eucb{s}.up_dwc.1.weight", (cin, 1, 3, 3)))
        bn(f"eucb{s}.up_dwc.2", cin)
        out += [(f"eucb{s}.pwc.0.weight", (c, cin, 1, 1)), (f"eucb{s}.pwc.0.bias", (c,))]
        f = c // 2
        for gate in ("W_g", "W_x"):
            out += [(f"lgag{s}.{gate}.0.weight", (f, 2, 3, 3)), (f"lgag{s}.{gate}.0.bias", (f,))]
            bn(f"lgag{s}.{gate}.1", f)
        out += [(f"lgag{s}.psi.0.weight", (1, f, 1, 1)), (f"lgag{s}.psi.0.bias", (1,))]
        bn(f"lgag{s}.psi.1", 1)
        mscb(s, c)
    for s, c in zip((4, 3, 2, 1), channels):
        m = c // min(16, c)
        out += [(f"cab{s}.fc1.weight", (m, c, 1, 1)), (f"cab{s}.fc2.weight", (c, m, 1, 1))]
    out.append(("sab.conv.weight", (1, 2, 7, 7)))
    return out


def layout_of(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def on_meta(fn, *args, **kwargs):
    with torch.device("meta"):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# state dict layout and parameter counts
# --------------------------------------------------------------------------------------------------
def test_appendix_a_generator():
    spec = parse_appendix_a()
    assert len(spec) == 216
    assert decoder_layout(B2) == spec


def test_decoder_state_dict_b2_matches_appendix_a():
    decoder = on_meta(EMCAD, B2)
    assert layout_of(decoder) == parse_appendix_a()
    nbt = [v for k, v in decoder.state_dict().items() if k.endswith("num_batches_tracked")]
    assert nbt and all(v.dtype == torch.int64 for v in nbt)


@pytest.mark.parametrize("channels", [B0, RESNET18, [2048, 1024, 512, 256]], ids=["b0", "resnet18", "resnet50"])
def test_decoder_state_dict_pattern(channels):
    assert layout_of(on_meta(EMCAD, channels)) == decoder_layout(channels)


@pytest.mark.parametrize("channels,kwargs,expected", [
    (B2, {}, 1_913_515),
    (B0, {}, 506_507),
    (B2, {"expansion_factor": 6}, 5_169_835),
    (B0, {"expansion_factor": 6}, 1_364_619),
    (RESNET18, {}, 1_712_715),
    ([2048, 1024, 512, 256], {}, 26_148_843),
])
def test_decoder_param_counts(channels, kwargs, expected):
    assert n_params(on_meta(EMCAD, channels, **kwargs)) == expected


def test_decoder_defaults_are_paper_config():
    d = on_meta(EMCAD)
    assert d.channels == B2 and d.expansion_factor == 2 and d.kernel_sizes == [1, 3, 5]
    assert isinstance(d.mscb4[0].pconv1[2], nn.ReLU6)
    assert type(d.eucb3.up_dwc[3]) is nn.ReLU and type(d.lgag3.activation) is nn.ReLU
    assert d.lgag3.groups == 160 and d.lgag3.kernel_size == 3


def test_decoder_per_module_counts():
    expected = {
        "B2": dict(mscb4=1_093_632, eucb3=169_792, lgag3=6_883, mscb3=437_760, eucb2=44_608, lgag2=2_755,
                   mscb2=76_800, eucb1=9_664, lgag1=1_379, mscb1=22_016, cab4=32_768, cab3=12_800, cab2=2_048,
                   cab1=512, sab=98),
        "B0": dict(mscb4=284_672, eucb3=43_936, lgag3=3_443, mscb3=116_480, eucb2=12_064, lgag2=1_379,
                   mscb2=22_016, eucb1=2_784, lgag1=691, mscb1=6_912, cab4=8_192, cab3=3_200, cab2=512, cab1=128,
                   sab=98),
    }
    for name, channels in (("B2", B2), ("B0", B0)):
        d = on_meta(EMCAD, channels)
        assert [n for n, _ in d.named_children()] == list(expected[name])
        assert {n: n_params(m) for n, m in d.named_children()} == expected[name]


@pytest.mark.parametrize("name,nc,params,keys", [
    ("emcad_b2", 1, 26_764_411, 563),
    ("emcad_b0", 1, 3_916_795, 407),
    ("emcad_b2", 9, 26_772_635, 563),
    ("emcad_b0", 9, 3_920_923, 407),
])
def test_full_network_counts(name, nc, params, keys):
    model = on_meta(create_model, name, num_classes=nc)
    assert n_params(model) == params
    sd = model.state_dict()
    assert len(sd) == keys
    top = [k.split(".")[0] for k in sd]
    assert list(dict.fromkeys(top)) == ["conv", "backbone", "decoder", "out_head4", "out_head3", "out_head2",
                                        "out_head1"]
    assert [k for k in sd if k.startswith("conv.")] == [
        "conv.0.weight", "conv.0.bias", "conv.1.weight", "conv.1.bias", "conv.1.running_mean",
        "conv.1.running_var", "conv.1.num_batches_tracked"]
    c = model.channels
    for s, width in zip((4, 3, 2, 1), c):
        assert sd[f"out_head{s}.weight"].shape == (nc, width, 1, 1) and sd[f"out_head{s}.bias"].shape == (nc,)
    assert n_params(model.decoder) == (1_913_515 if name == "emcad_b2" else 506_507)


def test_registry():
    names = list_models(include_lightweight=False)
    assert names == [f"emcad_b{i}" for i in range(6)] + [f"emcad_resnet{d}" for d in (18, 34, 50, 101, 152)]
    for name in names:
        model = on_meta(create_model, name)
        assert model.channels == list(reversed(model.backbone.out_channels))
    assert on_meta(create_model, "emcad_resnet50").channels == [2048, 1024, 512, 256]
    assert on_meta(create_model, "emcad_b1").channels == B2
    with pytest.raises(ValueError, match="unknown model 'emcad_b9'.*emcad_b0"):
        create_model("emcad_b9")
    with pytest.raises(TypeError, match="unknown arguments.*'foo'"):
        create_model("emcad_b0", foo=1)
    m = on_meta(create_model, "emcad_b0", expansion_factor=3, kernel_sizes=[3, 5], activation="relu")
    assert m.decoder.mscb4[0].pconv1[0].weight.shape == (768, 256, 1, 1)
    assert len(m.decoder.mscb4[0].msdc.dwconvs) == 2


# --------------------------------------------------------------------------------------------------
# forward shapes and input validation
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def b0_net():
    torch.manual_seed(0)
    return create_model("emcad_b0", num_classes=3).eval()


def test_emcadnet_b0_shapes_and_stem(b0_net):
    calls = []
    handle = b0_net.conv.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out = b0_net(torch.randn(2, 3, 64, 96))
            assert isinstance(out, list) and len(out) == 4
            assert all(p.shape == (2, 3, 64, 96) for p in out)
            assert not calls  # the stem runs only for 1-channel input
            out = b0_net(torch.randn(2, 1, 64, 64))
            assert all(p.shape == (2, 3, 64, 64) for p in out)
            assert calls == [1]
    finally:
        handle.remove()


def test_emcadnet_output_order(b0_net):
    """[p4, p3, p2, p1]: p_S = bilinear(out_headS(d_S)) to the input size."""
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        p = b0_net(x)
        feats = b0_net.backbone(x)
        d4, d3, d2, d1 = b0_net.decoder(feats[3], [feats[2], feats[1], feats[0]])
        assert (d4.shape[-1], d1.shape[-1]) == (2, 16)
        for i, (head, d) in enumerate(((b0_net.out_head4, d4), (b0_net.out_head3, d3), (b0_net.out_head2, d2),
                                       (b0_net.out_head1, d1))):
            ref = nn.functional.interpolate(head(d), scale_factor=64 // d.shape[-1], mode="bilinear",
                                            align_corners=False)
            torch.testing.assert_close(p[i], ref)


def test_emcadnet_input_errors(b0_net):
    with pytest.raises(ValueError, match=r"multiples of 32, got 64×50"):
        b0_net(torch.randn(1, 3, 64, 50))
    with pytest.raises(ValueError, match="multiples of 32"):
        b0_net(torch.randn(1, 1, 250, 256))
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 input channels, got 2"):
        b0_net(torch.randn(1, 2, 64, 64))
    with pytest.raises(ValueError, match="4-D"):
        b0_net(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="in_channels must be 1 .* or 3, got 4"):
        create_model("emcad_b0", in_channels=4)
    with pytest.raises(ValueError, match="unknown encoder 'pvt_v2_b9'"):
        EMCADNet(encoder="pvt_v2_b9")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("emcad_b0", num_classes=0)
    assert on_meta(create_model, "emcad_b0", in_channels=1).in_channels == 1


def test_decoder_input_errors():
    d = EMCAD(B0).eval()
    x4 = torch.randn(1, 256, 2, 2)
    skips = [torch.randn(1, 160, 4, 4), torch.randn(1, 64, 8, 8), torch.randn(1, 32, 16, 16)]
    assert [t.shape[1] for t in d(x4, skips)] == B0
    with pytest.raises(ValueError, match="3 skip features"):
        d(x4, skips[:2])
    with pytest.raises(ValueError, match=r"skips\[1\] must have spatial size \(8, 8\)"):
        d(x4, [skips[0], torch.randn(1, 64, 7, 7), skips[2]])
    with pytest.raises(ValueError, match=r"skips\[0\] must be \(B, 160, H, W\)"):
        d(x4, [torch.randn(1, 128, 4, 4), *skips[1:]])


def test_emcadnet_resnet18_shapes():
    model = create_model("emcad_resnet18", num_classes=2).eval()
    assert "backbone.fc.weight" in model.state_dict()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
        assert [p.shape for p in out] == [(2, 2, 64, 64)] * 4
        out = model(torch.randn(2, 1, 64, 64))
        assert [p.shape for p in out] == [(2, 2, 64, 64)] * 4


def test_emcadnet_b2_shapes():
    model = create_model("emcad_b2", num_classes=9).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert [p.shape for p in out] == [(2, 9, 32, 32)] * 4


# --------------------------------------------------------------------------------------------------
# fused vs torch: the whole B0 decoder
# --------------------------------------------------------------------------------------------------
def _decoder_step(model, inputs, grads_seed):
    """One forward/backward; returns every tensor to compare: outputs, input grads, param grads, buffers."""
    xs = [t.clone().requires_grad_() for t in inputs]
    ys = model(xs[0], xs[1:])
    g = torch.Generator().manual_seed(grads_seed)
    torch.autograd.backward(ys, [torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype) for y in ys])
    result = {f"output {i}": y.detach() for i, y in enumerate(ys)}
    result.update({f"input {i} grad": x.grad for i, x in enumerate(xs)})
    result.update({f"{n}.grad": p.grad.clone() for n, p in model.named_parameters()})
    result.update({n: b.clone() for n, b in model.named_buffers()})
    model.zero_grad()
    return result


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_decoder_b0_fused_matches_torch(monkeypatch, train, dtype, channels_last):
    """float64: fused == torch to ~1e-10. float32 (the rule of docs/numerics.md#tolerance-rule): the fused error against
    a float64 oracle is at most twice the torch float32 error (plus a 1e-4 floor relative to the tensor's scale):
    max-pool arg-max flips make a fixed float32 tolerance meaningless for gradients through four stages."""
    torch.manual_seed(0)
    ref = randomize(EMCAD(B0)).to(dtype)
    fused = copy.deepcopy(ref)
    oracle = copy.deepcopy(ref).double() if dtype == torch.float32 else None
    set_backend(ref, "torch")
    for m in (ref, fused, oracle):
        if m is not None:
            m.train(train)
    if oracle is not None:
        set_backend(oracle, "torch")
    counter = CallCounter(monkeypatch)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        inputs = [torch.randn(2, c, s, s, generator=g, dtype=torch.float64) for c, s in zip(B0, (2, 4, 8, 16))]
        if channels_last:
            inputs = [t.to(memory_format=torch.channels_last) for t in inputs]
        a = _decoder_step(ref, [t.to(dtype) for t in inputs], step)
        b = _decoder_step(fused, [t.to(dtype) for t in inputs], step)
        assert a.keys() == b.keys()
        if oracle is None:
            for name in a:
                if a[name].dtype == torch.int64:
                    assert torch.equal(a[name], b[name]), name
                else:
                    assert_close_scaled(b[name], a[name], dtype, name)
        else:
            o = _decoder_step(oracle, inputs, step)
            for name in a:
                if a[name].dtype == torch.int64:
                    assert torch.equal(a[name], b[name]) and torch.equal(a[name], o[name]), name
                    continue
                scale = max(o[name].abs().max().item(), 1.0)
                err_fused = (b[name].double() - o[name]).abs().max().item()
                err_torch = (a[name].double() - o[name]).abs().max().item()
                assert err_fused <= 2 * err_torch + 1e-4 * scale, \
                    f"{name}: fused {err_fused:.3g}, torch {err_torch:.3g}, scale {scale:.3g}"
    # per decoder forward: 4 MSDC, 3 EUCB up-convs, 3 gates
    assert counter.counts == {"multi_scale_dwconv": 8, "upsample_dwconv": 6, "grouped_attention_gate": 6}
    if train:
        assert fused.lgag1.psi[1].num_batches_tracked.item() == 5  # randomize() starts at 3


def test_emcadnet_fused_matches_torch(b0_net):
    ref = copy.deepcopy(b0_net)
    set_backend(ref, "torch")
    assert all(m.backend == "torch" for m in ref.modules() if hasattr(m, "backend"))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(ref(x), b0_net(x)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert b0_net.backend == "auto" and b0_net.decoder.mscb1[0].msdc.backend == "auto"


# --------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# --------------------------------------------------------------------------------------------------
def test_save_and_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(1)
    model = create_model("emcad_b0", num_classes=2, in_channels=1, kernel_sizes=[1, 3], expansion_factor=3)
    randomize(model.decoder)
    model.train()
    model(torch.randn(2, 1, 64, 64))[-1].sum().backward()  # running statistics move
    model.eval()
    save_pretrained(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert config["name"] == "emcad_b0" and config["num_classes"] == 2 and config["in_channels"] == 1
    assert config["kernel_sizes"] == [1, 3] and config["expansion_factor"] == 3
    loaded = from_pretrained(tmp_path / "ckpt", backend="torch")
    assert not loaded.training and loaded.backend == "torch" and loaded.decoder.mscb1[0].backend == "torch"
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    loaded_auto = from_pretrained(tmp_path / "ckpt")
    assert loaded_auto.backend == "auto"
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), loaded_auto(x)):
            assert torch.equal(a, b)
        set_backend(model, "torch")
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)


def test_save_pretrained_shared_storage(tmp_path):
    model = create_model("emcad_b0", num_classes=1)
    model.out_head2.bias = model.out_head1.bias  # tied: same storage under two keys
    sd = model.state_dict()
    assert sd["out_head1.bias"].data_ptr() == sd["out_head2.bias"].data_ptr()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert torch.equal(loaded.out_head2.bias, model.out_head1.bias)
    # a directly built EMCADNet (no registry name) saves too
    net = EMCADNet(encoder="resnet18", num_classes=2)
    save_pretrained(net, tmp_path / "r18")
    assert json.loads((tmp_path / "r18" / CONFIG_NAME).read_text())["name"] == "emcad_resnet18"


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="expects an EMCADNet"):
        save_pretrained(EMCAD(B0), tmp_path)
    with pytest.raises(ValueError, match="meta device"):
        save_pretrained(on_meta(create_model, "emcad_b0"), tmp_path / "meta")
    model = create_model("emcad_b0")
    save_pretrained(model, tmp_path / "m")
    path = tmp_path / "m" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        from_pretrained(tmp_path / "m")


def test_public_api():
    for name in ("create_model", "list_models", "EMCAD", "EMCADNet", "load_original_checkpoint", "save_pretrained",
                 "from_pretrained", "set_backend"):
        assert hasattr(emcad, name)


# --------------------------------------------------------------------------------------------------
# heads at inference and the folded eval path over the whole decoder
# --------------------------------------------------------------------------------------------------
def test_emcadnet_last_head_only(b0_net):
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    ref = copy.deepcopy(b0_net)
    set_backend(ref, "torch")
    with torch.no_grad():
        full = b0_net(x)
        last = b0_net(x, heads="last")
        assert len(last) == 1 and last[0].shape == full[-1].shape
        torch.testing.assert_close(last[0], full[-1], atol=0, rtol=0)
        torch.testing.assert_close(last[0], ref(x)[-1], atol=1e-5, rtol=1e-5)
        calls = []
        hooks = [getattr(b0_net, f"out_head{i}").register_forward_hook(lambda m, i, o, n=i: calls.append(n))
                 for i in range(1, 5)]
        try:
            b0_net.inference_heads = "last"
            out = b0_net(x)  # eval mode: the attribute applies
            assert len(out) == 1 and calls == [1]
            torch.testing.assert_close(out[0], full[-1], atol=0, rtol=0)
            b0_net.train()
            assert len(b0_net(x)) == 4  # training mode: all heads (deep supervision)
        finally:
            b0_net.eval()
            b0_net.inference_heads = "all"
            for h in hooks:
                h.remove()
    with pytest.raises(ValueError, match="heads must be one of"):
        b0_net(x, heads="first")


def test_evaluation_computes_only_the_last_head(b0_net):
    from emcad.training.evaluation import forward_head

    x = torch.randn(1, 3, 64, 64)
    calls = []
    hooks = [getattr(b0_net, f"out_head{i}").register_forward_hook(lambda m, i, o, n=i: calls.append(n))
             for i in range(1, 5)]
    try:
        with torch.no_grad():
            last = forward_head(b0_net, x, "last")
            assert calls == [1]
            torch.testing.assert_close(last, b0_net(x)[-1], atol=0, rtol=0)
            calls.clear()
            forward_head(b0_net, x, "sum")
            assert sorted(calls) == [1, 2, 3, 4]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_decoder_b0_folded_inference_matches_torch(channels_last):
    """no_grad eval over the whole decoder (folded, cached pointwise weights) == torch; after load_state_dict
    and an in-place weight change the cached folds follow."""
    torch.manual_seed(0)
    fused = randomize(EMCAD(B0)).eval()
    ref = copy.deepcopy(fused)
    set_backend(ref, "torch")
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, c, s, s, generator=g) for c, s in zip(B0, (2, 4, 8, 16))]
    if channels_last:
        inputs = [t.to(memory_format=torch.channels_last) for t in inputs]

    def check():
        # float32 through four stages: the rule of test_decoder_b0_fused_matches_torch (float64 oracle)
        oracle = copy.deepcopy(ref).double()
        with torch.no_grad():
            outs = zip(ref(inputs[0], inputs[1:]), fused(inputs[0], inputs[1:]),
                       oracle(inputs[0].double(), [t.double() for t in inputs[1:]]))
            for a, b, o in outs:
                scale = max(o.abs().max().item(), 1.0)
                err_fused, err_torch = (b.double() - o).abs().max().item(), (a.double() - o).abs().max().item()
                assert err_fused <= 2 * err_torch + 1e-5 * scale, (err_fused, err_torch, scale)

    check()
    check()
    other = randomize(EMCAD(B0), seed=5).eval()
    fused.load_state_dict(other.state_dict())
    ref.load_state_dict(other.state_dict())
    check()
    with torch.no_grad():
        for m in (fused, ref):
            m.mscb1[0].pconv2[0].weight.mul_(-1.0)
            m.mscb3[0].pconv1[1].running_mean.add_(0.3)
            m.eucb1.pwc[0].bias.add_(1.0)
    check()
