"""pytest-benchmark suite of the ``cpu`` backend, sharing its set-up with ``cpu_table.py``.

    pytest benchmarks/bench_cpu.py --benchmark-enable --benchmark-group-by=param:case
    pytest benchmarks/bench_cpu.py --benchmark-enable -k "msdc and 352"   # a subset

Each case (op, PVTv2's Mix-FFN middle or whole decoder, resolution, shape, mode) is one benchmark group; the providers are the fused
``cpu`` backend (NCHW and channels_last inputs) and the PyTorch baselines (eager NCHW, eager channels_last,
``torch.compile`` of the same composition; ``backend="torch"`` for the decoder). The ratio table with the
targets is produced by ``python benchmarks/cpu_table.py`` (see benchmarks/RESULTS.md). Without
``--benchmark-enable`` (the project default) every case runs once as a smoke test.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emcad_kernels import _ext  # noqa: E402

if not _ext.HAS_CPU_EXT:
    pytest.skip(f"cpu backend not available: {_ext.CPU_EXT_ERROR}", allow_module_level=True)

import cpu_table as ct  # noqa: E402

torch.set_num_threads(ct.THREADS)


def _op_cases():
    cases = []
    for res in sorted(ct.RESOLUTIONS):
        for kind, shapes in (("msdc", ct.msdc_shapes(res)), ("eucb", ct.eucb_shapes(res)),
                             ("lgag", ct.lgag_shapes(res))):
            for shape in shapes[-2:]:  # the two largest-spatial stages
                for mode in ("eval", "train"):
                    cases.append((kind, res, tuple(shape), mode))
    return cases


OP_CASES = _op_cases()


@pytest.mark.parametrize("provider", ct.OP_PROVIDERS)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}-{c[3]}")
def test_op(benchmark, case, provider):
    kind, res, shape, mode = case
    fn = ct.op_providers(kind, shape, mode, only=(provider,))[provider]
    fn()  # warm-up (compilation)
    benchmark.group = f"{kind} {res} {shape} {mode}"
    benchmark.extra_info.update(kind=kind, res=res, shape=shape, mode=mode, provider=provider, isa=_ext.cpu_isa())
    benchmark(fn)


@pytest.mark.parametrize("provider", ["torch nchw", "torch cl", "cpu (nchw)", "cpu (cl)"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("res", sorted(ct.RESOLUTIONS))
def test_decoder(benchmark, res, mode, provider):
    pytest.importorskip("emcad.models")
    fn = ct.decoder_providers(res, mode)[provider]
    fn()
    benchmark.group = f"decoder {res} {mode}"
    benchmark.extra_info.update(res=res, mode=mode, provider=provider)
    benchmark(fn)


@pytest.mark.parametrize("provider", ["eager nchw", "eager cl", "compile", "cpu"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("stage", range(len(ct.PVT_B2_MIXFFN)))
def test_mixffn(benchmark, stage, mode, provider):
    """PVTv2-B2's Mix-FFN middle at 224 px: the plain modules vs ``token_dwconv_gelu`` (``cpu_table.py --only
    mixffn``)."""
    fn = ct.mixffn_providers(224, stage, mode, with_compile=provider == "compile")[provider]
    fn()
    benchmark.group = f"mixffn 224 stage {stage + 1} {mode}"
    benchmark.extra_info.update(stage=stage + 1, mode=mode, provider=provider)
    benchmark(fn)
