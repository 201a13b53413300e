"""The README cannot rot: its Python blocks run as written, and its `emcad` command lines parse."""

import os
import re
import shlex

import pytest

from emcad.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    README = f.read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_has_the_blocks_this_test_checks():
    assert PYTHON_BLOCKS and BASH_BLOCKS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    if "import onnxruntime" in PYTHON_BLOCKS[index]:  # the deployment example needs the [export] extra
        pytest.importorskip("onnxruntime", reason="needs the [export] extra (onnxruntime)")
        pytest.importorskip("onnxscript", reason="needs the [export] extra (onnxscript)")
        pytest.importorskip("onnx", reason="needs the [export] extra (onnx)")
    monkeypatch.chdir(tmp_path)  # the snippet writes my_model/ and a .pth file
    # 64x64 images instead of 224x224: the same code, a few seconds instead of half a minute on 2 cores
    code = compile(PYTHON_BLOCKS[index].replace("224", "64"), f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})
    capsys.readouterr()


def _emcad_commands():
    commands = []
    for block in BASH_BLOCKS:
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.strip())
                if words[:1] == ["emcad"]:
                    commands.append(words[1:])
    # inline ones with options and no placeholders, e.g. `emcad flops --model emcad_b2 --decoder-only`
    for text in re.findall(r"`(emcad [^`]+)`", README):
        words = shlex.split(text)
        if len(words) > 2 and "--help" not in words and not any(re.fullmatch(r"[A-Z.]+", w) for w in words):
            commands.append(words[1:])
    return commands


@pytest.mark.parametrize("argv", _emcad_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_readme_emcad_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)
