"""Deployment exports of models that run the fused ops (backend "auto"): ONNX through ``emcad export`` /
``emcad.export_model`` checked with onnxruntime, ``.pt2`` AOTInductor packages (slow: an Inductor C++ build), and
``torch.export`` + ``torch.export.save`` of the fused program itself with grad enabled."""

import importlib.util
import io

import pytest
import torch

import emcad
from emcad.cli import main
from emcad.export import ExportCheckError, export_model, plain_copy, run_exported
from emcad.models import EUCB, LGAG, MSCB

HAS_ONNX = all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs the [export] extra (onnx, onnxscript, onnxruntime)")


def _backends(model):
    return {name: m.backend for name, m in model.named_modules() if hasattr(m, "backend")}


def _eager(model, x, **kwargs):
    with torch.no_grad():
        return model.eval()(x, **kwargs)


@needs_onnx
def test_cli_onnx_export_of_an_auto_model_matches_onnxruntime(tmp_path, capsys):
    """The fused model (auto) exports as its plain composition; onnxruntime reproduces the fused eager model at
    other batch sizes (dynamic batch), including the 1-channel stem."""
    torch.manual_seed(0)
    model = emcad.create_model("emcad_b0", num_classes=2, in_channels=1)  # backend "auto"
    for m in model.modules():  # non-trivial BatchNorm statistics, so that a wrong eval/train mode shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    emcad.save_pretrained(model, tmp_path / "model")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "model"), "--size", "64", "64", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onnx -> " in printed and "dynamic batch" in printed and "max |exported - eager|" in printed
    assert "in_channels=1" in printed

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["prediction"]
    loaded = emcad.from_pretrained(tmp_path / "model")
    assert set(_backends(loaded).values()) == {"auto"}
    for batch in (1, 3):
        x = torch.randn(batch, 1, 64, 64)
        (got,) = session.run(None, {"image": x.numpy()})
        want = _eager(loaded, x, heads="all")[-1]
        assert got.shape == (batch, 2, 64, 64)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def test_export_copy_runs_the_plain_composition_and_leaves_the_model_alone():
    model = emcad.create_model("emcad_b0", num_classes=2).train()
    before = _backends(model)
    plain = plain_copy(model)
    assert set(_backends(plain).values()) == {"torch"} and not plain.training
    assert _backends(model) == before and model.training
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_eager(plain, x)[-1], _eager(model, x)[-1], rtol=1e-4, atol=1e-5)


def test_export_argument_errors(tmp_path, monkeypatch):
    model = emcad.create_model("egeunet")
    with pytest.raises(ValueError, match="cannot tell it from the file name"):
        export_model(model, tmp_path / "model.bin", size=(64, 64))
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, tmp_path / "model.bin", format="tflite", size=(64, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        export_model(model, tmp_path / "model.onnx", size=(60, 64))
    with pytest.raises(ValueError, match="outputs must be one of"):
        export_model(model, tmp_path / "model.onnx", size=(64, 64), outputs="heads")
    with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
        export_model(model, tmp_path / "model.onnx", size=(64, 64), batch_size=1)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    # names onnxruntime among what is missing (with only part of the extra installed, the rest is named too)
    with pytest.raises(ImportError, match=r"needs (\w+, )*onnxruntime: pip install 'emcad-kernels\[export\]'"):
        export_model(model, tmp_path / "model.onnx", size=(64, 64))
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_export_errors_exit_1(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "not found" in capsys.readouterr().err
    emcad.save_pretrained(emcad.create_model("egeunet"), tmp_path / "model")
    assert main(["export", "--checkpoint", str(tmp_path / "model"), "--size", "50", "64",
                 "-o", str(tmp_path / "m.onnx")]) == 1
    assert "multiples of 32" in capsys.readouterr().err


def test_failed_check_raises(tmp_path, monkeypatch):
    """A check that finds a difference is an error, not a report."""
    import emcad.export as ex

    model = torch.nn.Sequential(MSCB(8, 8), EUCB(8, 4)).eval()
    model.in_channels = 8
    monkeypatch.setattr(ex, "run_exported", lambda path, image, format=None: [torch.zeros(3, 4, 64, 64)])
    monkeypatch.setattr(ex, "_write_export", lambda *args: None)
    with pytest.raises(ExportCheckError, match="differs from the eager model"):
        export_model(model, tmp_path / "m.pt2", size=(32, 32))


# --------------------------------------------------------------------------------------------------
# torch.export of the fused program itself
# --------------------------------------------------------------------------------------------------
def _save_and_load(program):
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def test_torch_export_save_of_the_fused_model_with_grad_enabled():
    """An eval-mode fused model exported with grad enabled saves and loads (an empty no_grad block used to become
    an output-less subgraph that torch.export.save rejects) and reproduces the eager model."""
    torch.manual_seed(0)
    model = emcad.create_model("emcad_b0", num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.is_grad_enabled()
    program = torch.export.export(model, (x,))
    assert any("emcad_kernels" in str(n.target) for n in program.graph.nodes)  # the fused ops are in it
    loaded = _save_and_load(program)
    for got, want in zip(loaded.module()(x), _eager(model, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_export_save_of_fused_blocks_in_training_mode():
    """Training mode: the BatchNorm running-statistics update of the fused ops is exported as buffer mutations
    (no output-less no_grad subgraph); the loaded program updates the statistics like the eager blocks."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleDict({"mscb": MSCB(8, 8), "eucb": EUCB(8, 8), "lgag": LGAG(8, 8, 4, groups=4)})

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = blocks

        def forward(self, x):
            y = self.blocks["mscb"](x)
            return self.blocks["lgag"](y, y, aggregate=True), self.blocks["eucb"](y)

    net = Net().train()
    eager = Net().train()
    eager.load_state_dict(net.state_dict())
    x = torch.randn(2, 8, 16, 16)
    program = torch.export.export(net, (x,))
    loaded = _save_and_load(program).module()
    got, want = loaded(x), eager(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    state = dict(loaded.state_dict())
    for key, value in eager.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


def test_torch_export_of_egeunet_with_frozen_weights():
    """EGE-UNet's eval-mode attention-map cache is bypassed while tracing (it keyed on data pointers, which traced
    tensors do not have)."""
    model = emcad.create_model("egeunet").eval().requires_grad_(False)
    x = torch.rand(2, 3, 64, 64) * 255
    loaded = _save_and_load(torch.export.export(model, (x,)))
    torch.testing.assert_close(loaded.module()(x)[-1], _eager(model, x)[-1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# AOTInductor packages (an Inductor C++ build: minutes on 2 cores)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["egeunet", "emcad_b0"])
def test_pt2_package_of_an_auto_model_matches_eager(tmp_path, name):
    torch.manual_seed(0)
    model = emcad.create_model(name, num_classes=2).eval()
    report = export_model(model, tmp_path / "model.pt2", size=(64, 64))
    assert report.max_abs_diff is not None and report.max_abs_diff <= report.tolerance
    x = torch.randn(1, 3, 64, 64) * (255 if name == "egeunet" else 1)
    (got,) = run_exported(tmp_path / "model.pt2", x)
    torch.testing.assert_close(got, _eager(model, x)[-1], rtol=1e-4, atol=1e-5)
    assert set(_backends(model).values()) == {"auto"}


@needs_onnx
@pytest.mark.slow
def test_onnx_all_outputs_of_egeunet(tmp_path):
    model = emcad.create_model("egeunet", num_classes=1).eval()
    report = export_model(model, tmp_path / "m.onnx", size=(64, 64), outputs="all")
    assert report.output_names == [f"output{i}" for i in range(5)] + ["prediction"]
    x = torch.rand(2, 3, 64, 64) * 255
    got = run_exported(tmp_path / "m.onnx", x)
    want = _eager(model, x)
    for a, b in zip(got, [*want[0], want[1]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
