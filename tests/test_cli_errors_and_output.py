"""The command line as a new user meets it: one-line errors with the right exit codes, the --data KIND:DIR
shorthand, help texts, `emcad info`'s backend lines, bench's skipped rows and memory column, figures with text,
metrics keyed by class name, and scripts/install_state.py (what decides whether install.sh rebuilds)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from emcad.cli import build_parser, main
from emcad.data import write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,code,text", [
    (["flops", "--model", "emcad_b7"], 2, "unknown model 'emcad_b7'"),
    (["train", "--model", "emcad_b7"], 2, "did you mean 'emcad_b5'"),
    (["bench", "--model", "nope"], 2, "unknown model 'nope'"),
    (["train", "--data", "imagenet"], 2, "invalid choice 'imagenet'"),
    (["train", "--data", "synthetic:/somewhere"], 2, "takes no directory"),
    (["train", "--data", "folder:"], 2, "no directory after 'folder:'"),
    (["train", "--data", "folder:/a", "--data-dir", "/b"], 2, "given twice"),
    (["evaluate", "--checkpoint", "x", "--data-dir", "/a", "--data", "folder:/b"], 2, "given twice"),
    (["evaluate", "--checkpoint", "x", "--data", "folder"], 2, "--data folder needs a directory"),
    (["nonsense"], 2, "invalid choice"),
])
def test_usage_errors_are_one_line_with_exit_code_2(argv, code, text, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == code
    line = _one_error_line(capsys.readouterr().err)
    assert text in line


def test_runtime_errors_are_one_line_with_exit_code_1(tmp_path, capsys):
    # missing checkpoint
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "not found" in _one_error_line(capsys.readouterr().err)
    # a folder that is not a dataset (given with the shorthand)
    assert main(["train", "--data", f"folder:{tmp_path / 'nothing'}", "-o", str(tmp_path / "run")]) == 1
    assert "nothing" in _one_error_line(capsys.readouterr().err)
    # an unreadable checkpoint
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "junk.pth")]) == 1
    assert "junk.pth" in _one_error_line(capsys.readouterr().err)
    # an unknown backend name in bench
    assert main(["bench", "--backends", "warp-drive", "--size", "32", "32"]) == 1
    assert "unknown backend 'warp-drive'" in _one_error_line(capsys.readouterr().err)


def test_unreadable_image_in_predict(tmp_path, capsys):
    import emcad
    torch.manual_seed(0)
    emcad.save_pretrained(emcad.create_model("emcad_b0", num_classes=3, in_channels=1), tmp_path / "model")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["predict", str(tmp_path / "bad.png"), "--checkpoint", str(tmp_path / "model"),
                 "-o", str(tmp_path / "out"), "--threads", "1"]) == 1
    assert "bad.png" in _one_error_line(capsys.readouterr().err)
    assert main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(tmp_path / "model")]) == 1
    assert "missing.png" in _one_error_line(capsys.readouterr().err)


def test_expected_errors_print_no_traceback_unless_emcad_debug(tmp_path):
    argv = [sys.executable, "-m", "emcad.cli", "evaluate", "--checkpoint", str(tmp_path / "missing")]
    plain = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert _one_error_line(plain.stderr).startswith("error: checkpoint")
    debug = subprocess.run(argv, capture_output=True, text=True, env=_env(EMCAD_DEBUG="1"), cwd=ROOT)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Exceptions outside the expected kinds are not turned into an `error:` line."""
    from emcad import cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_cmd_info", broken)  # build_parser picks the handler up when main runs
    with pytest.raises(KeyError):
        cli.main(["info"])


# --------------------------------------------------------------------------------------------------
# arguments and help
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command,kind", [("train", "folder"), ("train", "synapse"), ("evaluate", "folder"),
                                          ("evaluate", "synapse_volumes")])
def test_data_shorthand_equals_the_long_form(command, kind):
    extra = ["--checkpoint", "c"] if command == "evaluate" else []
    short = build_parser().parse_args([command, *extra, "--data", f"{kind}:/data/x"])
    long = build_parser().parse_args([command, *extra, "--data", kind, "--data-dir", "/data/x"])
    assert (short.data, short.data_dir) == (long.data, long.data_dir) == (kind, "/data/x")
    same_twice = build_parser().parse_args([command, *extra, "--data", f"{kind}:/d", "--data-dir", "/d"])
    assert same_twice.data_dir == "/d"


def test_bench_compile_is_opt_in():
    assert build_parser().parse_args(["bench"]).compile is False
    assert build_parser().parse_args(["bench", "--compile"]).compile is True


@pytest.mark.parametrize("command", ["info", "flops", "train", "evaluate", "predict", "bench"])
def test_help_texts_do_not_state_flag_defaults_backwards(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "(default: True)" not in out and "(default: False)" not in out and "(default: None)" not in out


def test_info_says_triton_needs_a_gpu(monkeypatch, capsys):
    from emcad_kernels import backends

    from emcad import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = cli._backend_status("triton")
    reason = backends.get_backend("triton").unavailable_reason()
    if reason is None:
        assert status.startswith("installed (triton ") and "no CUDA GPU" in status and "TRITON_INTERPRET=1" in status
    else:
        assert status == "unavailable: " + reason
    assert cli._backend_status("reference") == "available"
    assert main(["info"]) == 0
    assert "triton" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------
def test_bench_plan_skips_compile_and_gpu_backends_on_cpu():
    from emcad.training.bench import plan_configs

    configs, skipped = plan_configs(None, compile=False, device="cpu")
    names = [name for name, compiled in configs]
    assert names[0] == "torch" and names[-1] == "auto" and "reference" in names
    assert not any(compiled for _, compiled in configs)
    assert skipped[0] == "torch.compile rows (use --compile)"
    assert "triton" not in names and "cuda" not in names
    assert any(s.startswith("triton (") for s in skipped) and any(s.startswith("cuda (") for s in skipped)
    configs, skipped = plan_configs(["torch", "reference"], compile=True, device="cpu")
    assert configs == [("torch", False), ("reference", False), ("torch", True), ("auto", True)] and not skipped


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
def test_cpu_memory_column_measures_the_peak_growth_of_a_run():
    from emcad.training.bench import _cpu_peak_growth

    def allocate_64mb():
        x = torch.ones(16 * 2**20)  # 64 MiB, written: resident
        del x

    assert 60 * 2**20 <= _cpu_peak_growth(allocate_64mb) < 200 * 2**20
    assert _cpu_peak_growth(lambda: None) < 16 * 2**20


def test_bench_reports_skips_and_nonzero_cpu_memory(capsys):
    assert main(["bench", "--model", "emcad_b0", "--size", "64", "64", "--batch-size", "2", "--iters", "1",
                 "--warmup", "0", "--backends", "torch", "triton", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    skipped = [line for line in out if line.startswith("skipped: ")]
    assert len(skipped) == 1 and "torch.compile rows (use --compile)" in skipped[0] and "triton (" in skipped[0]
    row = next(line for line in out if line.startswith("torch "))
    fwd_ms, fwd_mb, _, train_ms, train_mb = row.split()[1:6]
    if os.path.exists("/proc/self/status"):
        assert float(fwd_mb) > 0 and float(train_mb) > 0, row


# --------------------------------------------------------------------------------------------------
# outputs: figures with text, metrics keyed by class name
# --------------------------------------------------------------------------------------------------
def test_figures_carry_text_and_say_so_when_pillow_is_missing(tmp_path, monkeypatch, capsys):
    from emcad.data import read_image
    from emcad.training import plotting

    train = [{"step": s, "loss": 1.0 / s} for s in range(1, 21)]
    val = [{"step": s, "dice_mean": 0.1 * s / 10, "dice_lesion": 0.05 * s / 10, "dice_ring": 0.15 * s / 10}
           for s in (10, 20)]
    plotting.plot_curves(tmp_path / "with_text.png", train, val, ["background", "lesion", "ring"])
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    monkeypatch.setattr(plotting, "_warned_no_text", False)
    plotting.plot_curves(tmp_path / "without_text.png", train, val, ["background", "lesion", "ring"])
    err = capsys.readouterr().err
    assert err.startswith("warning: Pillow is not installed") and "pip install pillow" in err
    with_text, without = read_image(tmp_path / "with_text.png"), read_image(tmp_path / "without_text.png")
    text_pixels = np.any(with_text != without, axis=-1)
    assert text_pixels.sum() > 500  # titles, tick labels, legends


def test_prediction_grid_has_a_colour_legend(tmp_path):
    from emcad.data import read_image
    from emcad.training.plotting import PALETTE, save_overlay_grid

    image, labels = torch.rand(1, 32, 32), torch.zeros(32, 32, dtype=torch.long)
    save_overlay_grid(tmp_path / "plain.png", [image], [labels], [labels])
    save_overlay_grid(tmp_path / "legend.png", [image], [labels], [labels], class_names=["bg", "lesion", "ring"])
    plain, legend = read_image(tmp_path / "plain.png"), read_image(tmp_path / "legend.png")
    assert legend.shape[0] > plain.shape[0]
    footer = legend[plain.shape[0]:]
    for c in (1, 2):  # each class's swatch is drawn in its palette colour
        assert np.all(footer == PALETTE[c], axis=-1).sum() >= 40


def test_class_keys_and_old_index_keys():
    from emcad.training.evaluation import class_keys, per_class_values

    names = ["background", "right kidney", "liver"]
    assert class_keys([1, 2], names) == {1: "right_kidney", 2: "liver"}
    assert class_keys([1, 2], None) == {1: "1", 2: "2"}
    assert class_keys([1, 2], ["bg", "mean", "x"]) == {1: "1", 2: "x"}  # "mean" would clash with dice_mean
    assert class_keys([1, 2], ["bg", "a", "a"]) == {1: "1", 2: "2"}  # duplicates fall back to indices
    new = {"step": 5, "dice_mean": 0.5, "dice_right_kidney": 0.4, "dice_liver": 0.6, "iou_liver": 0.3}
    old = {"step": 5, "dice_mean": 0.5, "dice_1": 0.4, "dice_2": 0.6, "iou_2": 0.3}
    assert per_class_values(new, "dice", names) == per_class_values(old, "dice", names) == {
        "right_kidney": 0.4, "liver": 0.6}
    assert per_class_values(old, "iou", names) == {"liver": 0.3}


def test_evaluate_writes_test_metrics_into_the_run_folder(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    assert main(["train", "--model", "emcad_b0", "--size", "32", "32", "--batch-size", "4", "--train-samples", "8",
                 "--val-samples", "4", "--steps", "2", "--val-every", "2", "--no-progress", "--no-plots",
                 "--threads", "1", "-o", str(run)]) == 0
    capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"dice_lesion", "dice_ring"} <= set(metrics["best"]) and "dice_1" not in metrics["best"]
    assert (run / "val_log.csv").read_text().splitlines()[0].split(",")[2:6] == [
        "dice_mean", "iou_mean", "dice_lesion", "dice_ring"]

    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best"), "--samples", "3",
                 "--threads", "1"]) == 0
    assert str(run / "test_metrics.json") in capsys.readouterr().out
    test = json.loads((run / "test_metrics.json").read_text())
    assert set(test["per_class"]) == {"lesion", "ring"} and set(test["per_class"]["ring"]) == {"dice", "iou", "hd95"}
    assert test["class_index"] == {"lesion": 1, "ring": 2} and test["cases"] == 3
    assert test["class_names"] == ["background", "lesion", "ring"]
    assert test["mean"]["dice"] == pytest.approx(np.mean([v["dice"] for v in test["per_class"].values()]))
    rows = (run / "test_per_case.csv").read_text().splitlines()
    assert rows[0] == "case,class,class_index,dice,iou,hd95" and len(rows) == 1 + 3 * 2

    # a checkpoint outside a run folder: -o decides
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--samples", "2",
                 "--threads", "1", "-o", str(tmp_path / "elsewhere")]) == 0
    capsys.readouterr()
    assert (tmp_path / "elsewhere" / "test_metrics.json").exists()


def test_predict_writes_a_viewable_colour_mask_beside_the_index_mask(tmp_path, capsys):
    import emcad
    from emcad.data import read_image
    from emcad.training.plotting import PALETTE

    torch.manual_seed(0)
    emcad.save_pretrained(emcad.create_model("emcad_b0", num_classes=3, in_channels=1), tmp_path / "model")
    write_png(tmp_path / "img.png", (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
    assert main(["predict", str(tmp_path / "img.png"), "--checkpoint", str(tmp_path / "model"), "-o",
                 str(tmp_path / "out"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "NAME_mask_color.png" in out and "class index" in out
    labels = read_image(tmp_path / "out" / "img_mask.png")
    colour = read_image(tmp_path / "out" / "img_mask_color.png")
    assert labels.shape == (32, 32) and labels.max() <= 2 and colour.shape == (32, 32, 3)
    np.testing.assert_array_equal(colour, PALETTE[labels])


# --------------------------------------------------------------------------------------------------
# scripts/install_state.py
# --------------------------------------------------------------------------------------------------
def _install_state():
    spec = importlib.util.spec_from_file_location("install_state", os.path.join(ROOT, "scripts", "install_state.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_state_requirements(capsys):
    state = _install_state()
    assert state.requirements("") == 0
    core = capsys.readouterr().out.split()
    assert "pillow" in core and any(r.startswith("torch") for r in core)
    assert state.requirements("dev,flops") == 0
    both = capsys.readouterr().out.split()
    assert set(core) < set(both) and "fvcore" in both and "pytest" in both
    assert state.requirements("dev,nope") == 2
    assert "unknown extra(s) nope" in capsys.readouterr().err


def test_install_state_fingerprint_follows_the_sources(tmp_path, monkeypatch):
    import shutil

    state = _install_state()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "k.cpp").write_text("int f() { return 1; }\n")
    monkeypatch.setattr(state, "ROOT", str(tmp_path))
    first = state.fingerprint()
    assert state.fingerprint() == first
    (tmp_path / "csrc" / "cpu" / "k.h").write_text("// a new header\n")
    second = state.fingerprint()
    assert second != first
    (tmp_path / "csrc" / "cpu" / "k.cpp").write_text("int f() { return 2; }\n")
    assert state.fingerprint() not in (first, second)
    monkeypatch.setenv("FORCE_CUDA", "1")
    assert state.fingerprint() != second
