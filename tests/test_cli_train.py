"""The train / evaluate / predict / bench command line: help, exit codes, errors, signals, end to end."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from emcad.cli import main
from emcad.data import read_image, write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "emcad_b0", "--size", "32", "32", "--batch-size", "4", "--train-samples", "16",
        "--val-samples", "4", "--lr", "1e-3", "--no-progress", "--threads", "1"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["predict"], ["bench"]])
def test_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    assert e.value.code == 0
    assert "usage: emcad" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    for argv in (["train", "--data", "imagenet"], ["train", "--steps", "many"], ["evaluate"], ["predict"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    capsys.readouterr()


def test_runtime_errors_exit_1_with_one_line(tmp_path, capsys):
    assert main(["train", "--size", "30", "30", "-o", str(tmp_path / "a")]) == 1
    assert "multiples of 32" in capsys.readouterr().err
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    write_png(tmp_path / "data" / "images" / "x.png", np.zeros((32, 32), np.uint8))
    write_png(tmp_path / "data" / "masks" / "y.png", np.zeros((32, 32), np.uint8))
    assert main(["train", "--data", "folder", "--data-dir", str(tmp_path / "data"), "-o", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "\nerror: unpaired files" in "\n" + err and "x.png" in err and "y.png" in err
    assert not (tmp_path / "b").exists()  # nothing written
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["predict", str(tmp_path / "data" / "images"), "--checkpoint", str(tmp_path / "junk.pt"),
                 "-o", str(tmp_path / "p")]) == 1
    assert "junk.pt" in capsys.readouterr().err


def test_train_evaluate_predict_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--val-every", "2", "-o", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"outputs: {run}" in err and "val Dice" in err
    for name in ("curves.png", "predictions.png", "metrics.json", "val_log.csv", "checkpoints/best/config.json"):
        assert (run / name).exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["step"] in (2, 4) and metrics["train"][-1]["step"] == 4

    # resume refuses changed settings, accepts more steps
    assert main(["train", "--resume", str(run / "checkpoints" / "last.pt"), "--lr", "0.5"]) == 1
    assert "--lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(run / "checkpoints" / "last.pt"), "--steps", "5", "--no-progress"]) == 0
    capsys.readouterr()

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best"), "--samples", "6",
                 "--threads", "1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hd95" in text and "lesion" in text and "ring" in text
    summary = json.loads((out / "test_metrics.json").read_text())
    assert set(summary["mean"]) == {"dice", "iou", "hd95"} and summary["cases"] == 6
    assert set(summary["per_class"]) == {"lesion", "ring"}
    assert len((out / "test_per_case.csv").read_text().strip().splitlines()) == 1 + 6 * 2
    # a training checkpoint works as well, and the TransUNet convention is available by name
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--samples", "2",
                 "--convention", "transunet", "--threads", "1"]) == 0
    capsys.readouterr()

    # predict: the exported samples folder plus an odd-sized image, in each size mode
    samples = run / "samples" / "images"
    odd = tmp_path / "odd.png"
    write_png(odd, (np.random.default_rng(0).random((45, 50)) * 65535).astype(np.uint16))
    for mode in ("resize", "pad", "sliding"):
        pred = tmp_path / f"pred_{mode}"
        assert main(["predict", str(samples), str(odd), "--checkpoint", str(run / "checkpoints" / "best"),
                     "--mode", mode, "--threads", "1", "-o", str(pred)]) == 0
        mask = read_image(pred / "odd_mask.png")
        assert mask.shape == (45, 50) and mask.max() <= 2
        assert read_image(pred / "odd_overlay.png").shape == (45, 50, 3)
        assert read_image(pred / "odd_mask_color.png").shape == (45, 50, 3)
        assert len([f for f in os.listdir(pred) if f.endswith("_mask.png")]) == 8 + 1
    capsys.readouterr()


def test_bench_runs(capsys):
    assert main(["bench", "--model", "emcad_b0", "--size", "32", "32", "--batch-size", "1", "--iters", "1",
                 "--warmup", "0", "--backends", "torch", "reference", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "fwd ms" in out


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_sets_the_exit_code(tmp_path, monkeypatch, sig, code, capsys):
    """The signal arrives during step 2 (sent from the step callback): step 2 completes, last.pt is written."""
    from emcad.training import trainer

    original = trainer.train

    def train_with_signal(cfg, **kw):
        def cb(t, step, loss):
            if step == 2:
                os.kill(os.getpid(), sig)
        return original(cfg, callback=cb, **kw)

    monkeypatch.setattr(trainer, "train", train_with_signal)
    before = signal.getsignal(sig)  # SIG_IGN for SIGINT when pytest runs as a background job of a shell
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "50", "--val-every", "100", "--no-plots", "-o", str(run)]) == code
    err = capsys.readouterr().err
    assert signal.Signals(sig).name in err and "checkpoint saved" in err and "--resume" in err
    from emcad.training.checkpoint import load_training_checkpoint
    assert load_training_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert not [p for p in run.rglob("*.tmp")]
    assert signal.getsignal(sig) == before  # the handler in place before the run is restored


def test_sigterm_to_a_real_training_process(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "emcad.cli", "train", *TINY, "--steps", "1000", "--val-every",
                             "1000", "--checkpoint-every", "1000", "--no-plots", "-o", str(run)],
                            env=_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # wait until the handlers are installed (printed after the set-up)
        lines.append(line)
        if line.startswith("outputs:"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, "".join(lines) + rest
    from emcad.training.checkpoint import load_training_checkpoint
    assert 1 <= load_training_checkpoint(run / "checkpoints" / "last.pt")["step"] < 1000


def test_folder_binary_training_and_synapse_volume_evaluation(tmp_path, capsys):
    """RGB image/mask folder with 0/255 masks: a binary model (structure loss); then Synapse-style volumes."""
    rng = np.random.default_rng(0)
    for i in range(8):
        img = (rng.random((40, 36, 3)) * 120).astype(np.uint8)
        mask = np.zeros((40, 36), np.uint8)
        mask[8 + i:20 + i, 6:18] = 255
        img[mask > 0] += 100
        write_png(tmp_path / "data" / "images" / f"im{i}.png", img)
        write_png(tmp_path / "data" / "masks" / f"im{i}.png", mask)
    run = tmp_path / "run"
    assert main(["train", "--data", "folder", "--data-dir", str(tmp_path / "data"), "--size", "32", "32",
                 "--batch-size", "2", "--steps", "2", "--val-fraction", "0.25", "--no-progress", "--threads", "1",
                 "--no-plots", "-o", str(run)]) == 0
    err = capsys.readouterr().err
    assert "heads_and_sum supervision of structure" in err and "1 classes" in err
    pre = json.loads((run / "checkpoints" / "final" / "preprocess.json").read_text())
    assert pre["num_classes"] == 1 and pre["in_channels"] == 3
    assert main(["predict", str(tmp_path / "data" / "images" / "im0.png"), "--checkpoint",
                 str(run / "checkpoints" / "final"), "--threads", "1", "-o", str(tmp_path / "pred")]) == 0
    assert set(np.unique(read_image(tmp_path / "pred" / "im0_mask.png"))) <= {0, 255}
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "final"), "--data", "folder",
                 "--data-dir", str(tmp_path / "data"), "--threads", "1"]) == 0
    capsys.readouterr()

    import torch

    import emcad
    torch.manual_seed(0)
    model = emcad.create_model("emcad_b0", num_classes=9, in_channels=1)
    emcad.save_pretrained(model, tmp_path / "syn")
    vols = tmp_path / "vols"
    vols.mkdir()
    for case in (1, 2):
        np.savez(vols / f"case{case:04d}.npz", image=rng.random((2, 40, 40)).astype(np.float32),
                 label=rng.integers(0, 9, (2, 40, 40)))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "syn"), "--data", "synapse_volumes", "--data-dir",
                 str(vols), "--size", "32", "32", "--spacing", "3", "1", "1", "--threads", "1",
                 "-o", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "2 Synapse volumes" in out and "spleen" in out and "aorta" in out


@pytest.mark.parametrize("name", ["egeunet", "malunet"])
def test_lightweight_models_train_and_predict(tmp_path, name, capsys):
    from emcad.models.registry import LIGHTWEIGHT_MODELS
    if name not in LIGHTWEIGHT_MODELS:
        pytest.skip(f"{name} is not registered")
    run = tmp_path / "run"
    assert main(["train", "--model", name, "--steps", "2", "--batch-size", "4", "--train-samples", "8",
                 "--val-samples", "4", "--val-every", "2", "--no-progress", "--no-plots", "--threads", "1",
                 "-o", str(run)]) == 0
    assert main(["predict", str(run / "samples" / "images"), "--checkpoint", str(run / "checkpoints" / "best"),
                 "--threads", "1", "-o", str(tmp_path / "pred")]) == 0
    assert read_image(tmp_path / "pred" / "synthetic_test_00000_mask.png").max() <= 2
    capsys.readouterr()
