"""``torch.compile(fullgraph=True)`` with the default backend (``auto``): the fused ops trace into one graph, on a
fresh model (nothing selected or loaded yet), in training and in evaluation under ``no_grad`` and
``inference_mode``, without graph breaks (``fullgraph=True`` raises on any) and without recompiling across the
decoder's stages or on a second call; the whole EMCADNet-B0 is one graph (``torch._dynamo.explain``).

Runs in a fresh interpreter so that no backend choice is cached and no lazy loading has happened yet.
``aot_eager`` keeps the compile time of the default suite low; the slow test compiles with Inductor.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
import torch
import emcad
import emcad_kernels as ek
from emcad import EMCAD

compile_backend = sys.argv[1]
torch.manual_seed(0)
torch._dynamo.config.error_on_recompile = True  # a second call with new values must reuse the graph
channels = (32, 16, 8, 4)


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, s, s, generator=g) for c, s in zip(channels, (2, 4, 8, 16))]


for mode in ("train", "no_grad", "inference_mode"):
    torch._dynamo.reset()
    ek.backends.clear_decisions()  # as fresh as a new process
    dec = EMCAD(channels).train(mode == "train")
    ctx = {"train": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        compiled = torch.compile(dec, fullgraph=True, backend=compile_backend)
        for seed in (1, 2):  # two calls with other values: no recompile (error_on_recompile)
            xs = inputs(seed)
            state = {k: v.clone() for k, v in dec.state_dict().items()}
            got = compiled(xs[0], xs[1:])
            dec.load_state_dict(state)  # the eager run starts from the same running statistics
            want = dec(xs[0], xs[1:])
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    print(mode, "ok")

# the whole model: one graph, no break
torch._dynamo.reset()
model = emcad.create_model("emcad_b0", num_classes=3, in_channels=1).eval()
with torch.no_grad():
    explained = torch._dynamo.explain(model)(torch.randn(1, 1, 64, 64))
assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
print("emcad_b0 ok")
"""


def _run(compile_backend: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT, compile_backend], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_fullgraph_compile_of_fresh_models_with_auto():
    out = _run("aot_eager")
    assert out.split() == ["train", "ok", "no_grad", "ok", "inference_mode", "ok", "emcad_b0", "ok"]


def test_backend_choice_is_marked_like_assume_constant_result():
    import torch

    from emcad_kernels import backends

    marked = torch.compiler.assume_constant_result(lambda: None)
    markers = [k for k in vars(marked) if k.startswith("_dynamo")]
    assert markers and all(getattr(backends._selected_name, k) is True for k in markers)


def test_import_does_not_load_dynamo():
    code = "import sys, emcad, emcad_kernels; print('torch._dynamo' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.slow
def test_fullgraph_compile_with_inductor():
    out = _run("inductor")
    assert "emcad_b0 ok" in out
