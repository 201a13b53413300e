"""``emcad selftest``: passes on this machine's backends, and fails, naming the op, when a backend's forward or
backward kernel is wrong (a test backend with injected kernels, as in test_safety_net.py) or raises."""

from __future__ import annotations

import json
import re

import pytest
import torch

from emcad import cli
from emcad_kernels import backends, reference, selftest
from emcad_kernels.descriptor import Support
from emcad_kernels.ops.msdc import MSDC


# kernels of the injected backends (imported by name through Support.kernels)
msdc_forward, msdc_backward = reference.msdc_forward, reference.msdc_backward


def msdc_forward_off_by_one_percent(*args):
    y, mean, var = reference.msdc_forward(*args)
    return y * 1.01, mean, var


def msdc_backward_off_in_x(*args):
    gx, *rest = reference.msdc_backward(*args)
    return [gx * 1.01, *rest]


def failing_kernel(*args):
    raise RuntimeError("injected kernel failure")


@pytest.fixture
def injected(monkeypatch):
    """Registers a test backend whose msdc kernels are ``(forward, backward)``, names in this module. Each gets its
    own backend name: the kernel ops of a name are defined once per process."""
    names = []

    def register(name, forward, backward):
        monkeypatch.setitem(MSDC.support, name, Support(kernels=(__name__, forward, backward)))
        backends.register_backend(backends.Backend(name, priority=-1, description="tests", devices=("cpu",),
                                                   dtypes=(torch.float32, torch.float64)))
        names.append(name)
        return name

    yield register
    for name in names:
        backends.unregister_backend(name)


def test_cpu_backend_passes_every_op():
    if backends.get_backend("cpu").unavailable_reason():
        pytest.skip("cpu backend not built")
    report = selftest.run(backends=["cpu"], dtypes=["float32", "bfloat16"])
    assert report.ok, report.table()
    cpu_ops = {name for name, op in backends.registered_ops().items() if "cpu" in op.support}
    for dtype in ("float32", "bfloat16"):
        passed = {r.op for r in report.rows if r.dtype == dtype and r.status == "pass"}
        assert passed == cpu_ops, report.table()
    assert all(r.examples_run == r.examples for r in report.rows), report.table()
    assert all(0 <= r.tolerance_share <= 1 for r in report.rows)


@pytest.mark.parametrize("backend,forward,backward,status,where", [
    ("wrong_fwd", "msdc_forward_off_by_one_percent", "msdc_backward", "FAIL", "example 0 out: max error"),
    ("wrong_bwd", "msdc_forward", "msdc_backward_off_in_x", "FAIL", "example 0 grad x: max error"),
    ("raising", "failing_kernel", "msdc_backward", "ERROR", "example 0: RuntimeError: injected kernel failure"),
])
def test_a_wrong_kernel_fails_and_names_the_op(injected, tmp_path, capsys, backend, forward, backward, status,
                                               where):
    injected(backend, forward, backward)
    report_path = tmp_path / "selftest.json"
    rc = cli.main(["selftest", "--backends", backend, "--dtypes", "float32", "--json", str(report_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert re.search(rf"^multi_scale_dwconv +{backend} +cpu +float32 +{status} ", out, re.M), out
    assert f"multi_scale_dwconv on {backend}/cpu/float32: {where}" in out
    report = json.loads(report_path.read_text())
    assert not report["ok"] and report["complete"]
    assert [(r["op"], r["status"]) for r in report["rows"]] == [("multi_scale_dwconv", status)]


def test_interpreter_rows_need_the_flag():
    report = selftest.run(backends=["triton"], ops=["mscam"], devices=["cpu"])
    assert report.rows == []
    assert any("--include-interpreter" in n for n in report.notes)
    assert "nothing was checked" in report.table()


def test_bad_arguments_are_one_line_errors(capsys):
    assert cli.main(["selftest", "--ops", "no_such_op"]) == 2
    assert "unknown op(s) ['no_such_op']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        selftest.run(backends=["nope"])
