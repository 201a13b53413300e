"""Paper-convention MAC counts (docs/models.md#measured-vs-paper) and the `emcad` command line."""

import subprocess
import sys

import pytest
import torch

import emcad
from emcad.cli import main
from emcad.flops import count_macs, decoder_inputs

B2_PER_MODULE_224 = {
    "mscb4": 53_788_672, "eucb3": 33_479_936, "lgag3": 1_380_428, "mscb3": 86_302_720, "eucb2": 35_474_432,
    "lgag2": 2_210_096, "mscb2": 61_014_016, "eucb1": 31_109_120, "lgag1": 4_424_896, "mscb1": 70_647_808,
    "cab4": 115_776, "cab3": 151_080, "cab2": 204_816, "cab1": 402_440, "sab": 408_170,
}


def _decoder(name):
    torch.manual_seed(0)
    return emcad.create_model(name).decoder


def test_decoder_b2_macs_match_paper_per_module():
    dec = _decoder("emcad_b2")
    report = count_macs(dec, decoder_inputs(dec.channels, 224, 224))
    assert report.macs == 381_114_406  # paper: 0.381 G
    assert dict(report.per_module) == B2_PER_MODULE_224
    assert report.params == 1_913_515
    assert report.flops == 2 * report.macs


@pytest.mark.parametrize("name,size,expected", [
    ("emcad_b0", 224, 109_658_982), ("emcad_b2", 256, 497_752_576), ("emcad_b0", 256, 143_220_672)])
def test_decoder_macs_reference_values(name, size, expected):
    dec = _decoder(name)
    assert count_macs(dec, decoder_inputs(dec.channels, size, size)).macs == expected


def test_counting_restores_backend_and_mode():
    dec = _decoder("emcad_b0").train()
    emcad.set_backend(dec, "reference")
    count_macs(dec, decoder_inputs(dec.channels, 64, 64))
    assert dec.training and dec.mscb1.backend == "reference"


def test_cli_flops_decoder(capsys):
    assert main(["flops", "--model", "emcad_b0", "--decoder-only"]) == 0
    out = capsys.readouterr().out
    assert "109,658,982" in out and "506,507" in out


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "emcad_b2" in out


def test_cli_rejects_bad_size(capsys):
    assert main(["flops", "--size", "250", "250"]) == 2
    assert "multiples of 32" in capsys.readouterr().err


def test_cli_help_and_usage_errors():
    ok = subprocess.run([sys.executable, "-m", "emcad.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "flops" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "emcad.cli", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.parametrize("name,macs", [("egeunet", "72,096,256"), ("malunet", "82,972,800")])
def test_cli_flops_lightweight_models_in_thop_convention(capsys, name, macs):
    assert main(["flops", "--model", name, "--size", "256", "256"]) == 0
    assert macs in capsys.readouterr().out
