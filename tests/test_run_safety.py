"""No lost runs: where resumed runs write, content hashes of checkpoints and saved models, the atomic folder swap of
save_pretrained under signals and crashes, umask permissions, one-line write errors that keep the previous
checkpoint, and the small reading/selection cases (random bytes, a validation split without foreground)."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
import torch

from emcad import CheckpointError, create_model, from_pretrained, load_original_checkpoint, save_pretrained
from emcad.cli import main
from emcad.data import write_png
from emcad.training.checkpoint import CheckpointReadError, load_training_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "emcad_b0", "--size", "32", "32", "--batch-size", "4", "--train-samples", "8",
        "--val-samples", "4", "--lr", "1e-3", "--no-progress", "--threads", "1", "--no-plots"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _train(capsys, *args) -> tuple[int, str]:
    code = main(["train", *TINY, *map(str, args)])
    return code, capsys.readouterr().err


def _step(run) -> int:
    return int(load_training_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["step"])


def _leftovers(folder) -> list[str]:
    return [str(p) for p in __import__("pathlib").Path(folder).rglob("*") if p.name.endswith((".tmp", ".old"))]


# --------------------------------------------------------------------------------------------------
# where a resumed or a new run writes
# --------------------------------------------------------------------------------------------------
def test_resume_writes_into_the_run_folder_that_holds_the_checkpoint(tmp_path, monkeypatch, capsys):
    """The run was started with a relative -o, then moved: the resume continues it where it now lies, not in a
    new folder named by the stored -o under the current directory."""
    monkeypatch.chdir(tmp_path)
    assert _train(capsys, "--steps", "2", "-o", "run")[0] == 0
    os.makedirs("archive")
    os.rename("run", "archive/run")
    code, err = _train(capsys, "--resume", "archive/run/checkpoints/last.pt", "--steps", "3")
    assert code == 0, err
    assert not os.path.exists("run")
    assert _step("archive/run") == 3
    assert json.loads((tmp_path / "archive/run/metrics.json").read_text())["step"] == 3
    assert f"outputs: {tmp_path / 'archive' / 'run'}" in err

    # a checkpoint outside any run folder needs -o; resuming an older state over a newer last.pt needs --overwrite
    shutil.copy("archive/run/checkpoints/last.pt", "copy.pt")
    code, err = _train(capsys, "--resume", "copy.pt", "--steps", "4")
    assert code == 1 and "not in a run folder" in err and "-o" in err
    shutil.copy("copy.pt", "archive/run/checkpoints/step3.pt")
    assert _train(capsys, "--resume", "archive/run/checkpoints/last.pt", "--steps", "4")[0] == 0
    code, err = _train(capsys, "--resume", "archive/run/checkpoints/step3.pt", "--steps", "5")
    assert code == 1 and "would replace" in err and "--overwrite" in err
    assert _step("archive/run") == 4


def test_resume_into_a_folder_holding_another_run_needs_overwrite(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(capsys, "--steps", "2", "-o", a)[0] == 0
    assert _train(capsys, "--steps", "2", "--seed", "1", "-o", b)[0] == 0
    b_before = (b / "checkpoints" / "last.pt").read_bytes()
    code, err = _train(capsys, "--resume", a / "checkpoints" / "last.pt", "--steps", "3", "-o", b)
    assert code == 1 and "already holds another run" in err and "--overwrite" in err
    assert (b / "checkpoints" / "last.pt").read_bytes() == b_before
    code, err = _train(capsys, "--resume", a / "checkpoints" / "last.pt", "--steps", "3", "-o", b, "--overwrite")
    assert code == 0, err
    assert _step(b) == 3 and _step(a) == 2
    assert load_training_checkpoint(b / "checkpoints" / "last.pt")["config"]["seed"] == 0  # a's run, continued


def test_new_run_into_a_run_folder_needs_overwrite_and_replaces_only_run_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY[:-1], "--steps", "2", "-o", str(run)]) == 0  # with plots
    (run / "notes.txt").write_text("mine")
    assert (run / "predictions.png").exists()
    code, err = _train(capsys, "--steps", "2", "-o", run)
    assert code == 1 and "already holds a run" in err and "--overwrite" in err
    code, err = _train(capsys, "--steps", "3", "--seed", "5", "-o", run, "--overwrite")
    assert code == 0, err
    assert _step(run) == 3 and json.loads((run / "config.json").read_text())["seed"] == 5
    assert not (run / "predictions.png").exists() and not (run / "curves.png").exists()  # the old run's
    assert (run / "notes.txt").read_text() == "mine"


def test_resuming_a_finished_run_is_refused_unless_more_steps(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(capsys, "--steps", "2", "-o", run)[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = _train(capsys, "--resume", run / "checkpoints" / "last.pt")
    assert code == 1 and "finished run (2/2 steps)" in err and "--steps" in err
    code, err = _train(capsys, "--resume", run / "checkpoints" / "last.pt", "--steps", "1")
    assert code == 1 and "already at step 2" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing rewritten
    assert _train(capsys, "--resume", run / "checkpoints" / "last.pt", "--steps", "3")[0] == 0
    assert _step(run) == 3


# --------------------------------------------------------------------------------------------------
# content hashes
# --------------------------------------------------------------------------------------------------
def _flip_byte_in_largest_tensor(path) -> None:
    """Flip one bit in the middle of the largest tensor of a torch.save zip archive."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x10]))


def _flip_byte_in_safetensors(path) -> None:
    with open(path, "r+b") as f:
        header = struct.unpack("<Q", f.read(8))[0]
        size = os.fstat(f.fileno()).st_size
        pos = 8 + header + (size - 8 - header) // 2
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x10]))


def test_flipped_bytes_in_a_training_checkpoint_are_detected(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(capsys, "--steps", "2", "-o", run)[0] == 0
    good = run / "checkpoints" / "last.pt"
    # a damaged copy beside a good run: reading it fails, resuming from it writes nothing anywhere
    bad = tmp_path / "copy" / "checkpoints" / "last.pt"
    bad.parent.mkdir(parents=True)
    shutil.copy(good, bad)
    _flip_byte_in_largest_tensor(bad)
    with pytest.raises(CheckpointReadError, match=r"copy/checkpoints/last\.pt' is corrupt"):
        load_training_checkpoint(bad)
    good_bytes = good.read_bytes()
    code, err = _train(capsys, "--resume", bad, "--steps", "3", "-o", run, "--overwrite")
    assert code == 1 and "is corrupt" in err and "Traceback" not in err
    assert good.read_bytes() == good_bytes
    assert main(["evaluate", "--checkpoint", str(bad), "--samples", "2", "--threads", "1"]) == 1
    assert "is corrupt" in capsys.readouterr().err  # not taken for an original .pth state dict

    # a checkpoint written before hashes were recorded still loads (silently)
    old = torch.load(good, weights_only=True)
    del old["sha256"]
    torch.save(old, tmp_path / "old.pt")
    assert load_training_checkpoint(tmp_path / "old.pt")["step"] == 2


def test_flipped_bytes_in_model_safetensors_are_detected(tmp_path):
    torch.manual_seed(0)
    model = create_model("egeunet", num_classes=2)
    save_pretrained(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    _flip_byte_in_safetensors(weights)
    with pytest.raises(ValueError, match=r"m/model\.safetensors' is corrupt") as e:
        from_pretrained(tmp_path / "m")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_original_checkpoint(weights)


def test_config_and_weights_of_different_saves_are_detected(tmp_path):
    """Same shapes, another setting (probabilities vs logits): the config records the weights it was saved with."""
    torch.manual_seed(0)
    save_pretrained(create_model("egeunet", num_classes=2), tmp_path / "a")
    save_pretrained(create_model("egeunet", num_classes=2, output="logits"), tmp_path / "b")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    with pytest.raises(ValueError, match=r"b/config\.json' does not belong to .*b/model\.safetensors"):
        from_pretrained(tmp_path / "b")


def test_models_saved_without_hashes_still_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model("egeunet", num_classes=2)
    save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["weights_sha256"]
    config["format_version"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m" / "model.safetensors"))
    loaded = from_pretrained(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


# --------------------------------------------------------------------------------------------------
# save_pretrained: one atomic folder swap
# --------------------------------------------------------------------------------------------------
_KILLED_SAVE = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started from a shell's background job
import torch
import emcad

torch.manual_seed(1)
model = emcad.create_model("egeunet", num_classes=3)
real_replace = os.replace

def replace_then_pause(src, dst):  # the first rename of the save happens, then the process waits to be killed
    real_replace(src, dst)
    os.replace = real_replace
    print("paused", flush=True)
    time.sleep(120)

os.replace = replace_then_pause
emcad.save_pretrained(model, sys.argv[1])
print("finished", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_save_pretrained_killed_mid_write_leaves_a_complete_folder(tmp_path, sig):
    """Killed right after the first rename of the save (main: the weights replaced, the config not yet; now: the
    old folder moved aside): the folder reads as the old complete version. SIGTERM/SIGINT clean up and end the
    process with the signal; after SIGKILL the reader uses the aside copy and the next save tidies up."""
    out = tmp_path / "out"
    target = out / "model"
    torch.manual_seed(0)
    old = create_model("egeunet", num_classes=2)
    save_pretrained(old, target)
    script = tmp_path / "save.py"
    script.write_text(_KILLED_SAVE)
    proc = subprocess.Popen([sys.executable, str(script), str(target)], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    if line.strip() != "paused":
        proc.kill()
        pytest.fail(f"the save did not reach its pause: {line!r} {proc.communicate()[1]}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -sig, err
    loaded = from_pretrained(target)
    assert loaded.state_dict().keys() == old.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))
    if sig != signal.SIGKILL:
        assert os.listdir(out) == ["model"]
        assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    new = create_model("egeunet", num_classes=3)
    save_pretrained(new, target)
    assert os.listdir(out) == ["model"]  # an aside copy or temporary folder left by SIGKILL is gone
    assert from_pretrained(target).state_dict()["final.weight"].shape == (3, 8, 1, 1)


def test_save_pretrained_keeps_other_files_and_refuses_unsafe_targets(tmp_path, monkeypatch):
    model = create_model("egeunet", num_classes=2)
    save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("notes")
    save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == "notes"
    (tmp_path / "m" / "sub").mkdir()
    with pytest.raises(ValueError, match="holds folders \\(sub\\)"):
        save_pretrained(model, tmp_path / "m")
    monkeypatch.chdir(tmp_path / "m" / "sub")
    with pytest.raises(ValueError, match="current directory"):
        save_pretrained(model, ".")


# --------------------------------------------------------------------------------------------------
# permissions
# --------------------------------------------------------------------------------------------------
def _modes(folder) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {"file": set(), "dir": set()}
    for p in __import__("pathlib").Path(folder).rglob("*"):
        found["dir" if p.is_dir() else "file"].add(p.stat().st_mode & 0o777)
    return found


def test_outputs_honour_the_umask(tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(["train", *TINY[:-1], "--steps", "2", "-o", str(run)]) == 0
        os.umask(0o027)
        save_pretrained(create_model("egeunet", num_classes=2), tmp_path / "m")
    finally:
        os.umask(previous)
    capsys.readouterr()
    assert (run / "checkpoints" / "best" / "model.safetensors").exists() and (run / "curves.png").exists()
    assert _modes(run) == {"file": {0o644}, "dir": {0o755}}
    assert _modes(tmp_path / "m") == {"file": {0o640}, "dir": set()}
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750


# --------------------------------------------------------------------------------------------------
# read-only and full disks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys,
                                                                                code):
    """The second checkpoint write fails (ENOSPC in the final rename, EROFS creating the temporary file)."""
    run = tmp_path / "run"
    writes = {"n": 0}
    real_replace, real_mkstemp = os.replace, tempfile.mkstemp

    def fail_second(name: str) -> None:
        if name.startswith(".last.pt.") or name.endswith(os.sep + "last.pt"):
            writes["n"] += 1
            if writes["n"] == 2:
                raise OSError(code, os.strerror(code))

    def replace(src, dst, *a, **kw):
        if code == errno.ENOSPC:
            fail_second(os.fspath(dst))
        return real_replace(src, dst, *a, **kw)

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if code == errno.EROFS:
            fail_second(prefix or "")
        return real_mkstemp(suffix, prefix, dir, text)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code_, err = _train(capsys, "--steps", "6", "--checkpoint-every", "2", "-o", run)
    assert code_ == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    last = run / "checkpoints" / "last.pt"
    assert errors == [f"error: cannot write checkpoint to {last}: {os.strerror(code)} (the checkpoint of step 2 is "
                      f"intact: {last})"], err
    assert "Traceback" not in err
    assert _step(run) == 2
    assert _leftovers(run) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root is not stopped by permissions")
def test_read_only_run_folder_gives_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(capsys, "--steps", "2", "-o", run)[0] == 0
    for p in (run / "checkpoints", run):
        p.chmod(0o555)
    try:
        code, err = _train(capsys, "--resume", run / "checkpoints" / "last.pt", "--steps", "3")
    finally:
        for p in (run, run / "checkpoints"):
            p.chmod(0o755)
    assert code == 1 and "Permission denied" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: cannot write ")]
    assert _step(run) == 2


def test_save_pretrained_on_a_full_disk_keeps_the_old_folder(tmp_path, monkeypatch):
    torch.manual_seed(0)
    old = create_model("egeunet", num_classes=2)
    save_pretrained(old, tmp_path / "m")
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if os.fspath(src).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as e:  # emcad.io_safety.WriteError
        save_pretrained(create_model("egeunet", num_classes=3), tmp_path / "m")
    monkeypatch.undo()
    assert str(e.value) == f"cannot write model to {tmp_path / 'm'}: No space left on device"
    assert os.listdir(tmp_path) == ["m"]
    loaded = from_pretrained(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))


# --------------------------------------------------------------------------------------------------
# reading random bytes; a validation split without foreground
# --------------------------------------------------------------------------------------------------
def test_random_bytes_are_unreadable_not_pickled_code(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x11" + np.random.default_rng(2).bytes(4095))
    with pytest.raises(Exception, match="Weights only load failed"):  # torch's wording is that of pickled code
        torch.load(junk, weights_only=True)
    with pytest.raises(CheckpointError) as e:
        load_original_checkpoint(junk)
    assert "is not a PyTorch checkpoint" in str(e.value) and "arbitrary code" not in str(e.value)
    with pytest.raises(CheckpointReadError) as e:
        load_training_checkpoint(junk)
    assert "is not a PyTorch checkpoint" in str(e.value) and "arbitrary code" not in str(e.value)
    for argv in (["train", "--resume", str(junk)], ["evaluate", "--checkpoint", str(junk)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "junk.pt' is not a PyTorch checkpoint" in err and "arbitrary code" not in err


def test_validation_split_without_foreground(tmp_path, capsys):
    """A --val-dir whose masks are all background: a warning names it, and best/ is selected on the loss."""
    rng = np.random.default_rng(0)
    for folder, n, fg in (("train", 4, True), ("val", 2, False)):
        for i in range(n):
            mask = np.zeros((32, 32), np.uint8)
            if fg:
                mask[4 + i:16 + i, 8:20] = 255
            write_png(tmp_path / folder / "images" / f"im{i}.png", (rng.random((32, 32)) * 200).astype(np.uint8))
            write_png(tmp_path / folder / "masks" / f"im{i}.png", mask)
    run = tmp_path / "run"
    code = main(["train", "--data", "folder", "--data-dir", str(tmp_path / "train"), "--val-dir",
                 str(tmp_path / "val"), "--size", "32", "32", "--batch-size", "2", "--steps", "3", "--val-every", "1",
                 "--no-progress", "--threads", "1", "--no-plots", "-o", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"warning: the validation split (--val-dir {tmp_path / 'val'}, 2 images) has no foreground" in err
    metrics = json.loads((run / "metrics.json").read_text())
    losses = {row["step"]: row["val_loss"] for row in metrics["val"]}
    assert len(losses) == 3 and all(np.isfinite(v) for v in losses.values())
    assert metrics["best"]["step"] == min(losses, key=losses.get)
    assert "validation loss" in metrics["selection"]
    assert (run / "checkpoints" / "best" / "model.safetensors").exists()
    assert "best val loss" in err
