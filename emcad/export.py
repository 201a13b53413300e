"""Exporting a model for deployment: ONNX (onnxruntime and other ONNX runtimes) and ``.pt2`` (``torch.export`` +
AOTInductor, loadable with ``torch._inductor.aoti_load_package`` and torch alone).

Whatever backend the model runs (``"auto"``, ``"cpu"``, ``"triton"``, ...), the export is made from a copy
switched to ``backend="torch"``: the plain nn-module composition of the same weights (the state dict is the same
for every backend), which every ONNX runtime and Inductor understand. The fused ops are ``emcad_kernels`` custom
ops that have no ONNX translation and would tie a ``.pt2`` to this package. The copy is exported in eval mode
under ``torch.no_grad()``; the model itself is not changed.

Shapes: the batch is dynamic (``dynamic_batch=True``), height and width are fixed at ``size`` (multiples of 32;
export once per deployed size). The exported program takes one ``(B, C, H, W)`` float32 input named ``image``
and returns the prediction logits (``outputs="prediction"``; for EGE-UNet/MALUNet with ``output="probs"``,
probabilities) named ``prediction``, or every output of the model (``outputs="all"``).

``check=True`` runs the exported file (onnxruntime, or the loaded AOTInductor package) on a fresh input with
another batch size and compares it with the eager model in its own backend; a difference above the tolerance
raises :class:`ExportCheckError`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from emcad.models import EMCADNet, set_backend

__all__ = ["FORMATS", "OUTPUTS", "ExportCheckError", "ExportReport", "export_model", "missing_export_packages"]

FORMATS = ("onnx", "pt2")
OUTPUTS = ("prediction", "all")
INPUT_NAME = "image"
# onnx, onnxruntime and onnxscript: the optional extra ``emcad-kernels[export]``
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportCheckError(RuntimeError):
    """The exported file does not reproduce the eager model within the tolerance."""


@dataclass
class ExportReport:
    path: str
    format: str
    input_shape: tuple[int, ...]  # of the example input; the batch is dynamic when dynamic_batch
    dynamic_batch: bool
    output_names: list[str]
    max_abs_diff: Optional[float]  # against the eager model (None: not checked)
    tolerance: Optional[float]
    seconds: float

    def summary(self) -> str:
        batch = "dynamic batch" if self.dynamic_batch else f"batch {self.input_shape[0]}"
        shape = "x".join(map(str, self.input_shape[1:]))
        check = ("not checked" if self.max_abs_diff is None else
                 f"max |exported - eager| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        return (f"{self.format} -> {self.path} ({batch}, input '{INPUT_NAME}' {shape}, outputs "
                f"{', '.join(self.output_names)}; {check}; {self.seconds:.1f} s)")


def missing_export_packages(format: str) -> list[str]:
    """The packages ``format`` needs that are not installed (ONNX: onnx, onnxscript, onnxruntime)."""
    import importlib.util

    if format != "onnx":
        return []
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def _flatten(outputs) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    flat: list[Tensor] = []
    for o in outputs:
        flat.extend(_flatten(o))
    return flat


class _Exported(nn.Module):
    """The model with one tensor input and a flat tuple of outputs (what exporters want)."""

    def __init__(self, model: nn.Module, outputs: str):
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, image: Tensor):
        if self.outputs == "prediction":
            if isinstance(self.model, EMCADNet):  # only the prediction head is computed
                return self.model(image, heads="last")[0]
            return _flatten(self.model(image))[-1]
        if isinstance(self.model, EMCADNet):
            return tuple(self.model(image, heads="all"))
        return tuple(_flatten(self.model(image)))


def _output_names(model: nn.Module, outputs: str, count: int) -> list[str]:
    if outputs == "prediction":
        return ["prediction"]
    if isinstance(model, EMCADNet):
        return ["p4", "p3", "p2", "prediction"]
    return [f"output{i}" for i in range(count - 1)] + ["prediction"]


def _format_of(path: str, format: Optional[str]) -> str:
    if format is None:
        suffix = os.path.splitext(path)[1].lower().lstrip(".")
        if suffix not in FORMATS:
            raise ValueError(f"format: cannot tell it from the file name '{path}'; pass format='onnx' or 'pt2' "
                             f"(or name the file *.onnx / *.pt2)")
        return suffix
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def _check_size(size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise ValueError(f"size must be positive multiples of 32 (the models' output stride), got {height}x{width}")
    return height, width


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode that runs the plain composition (``backend="torch"``) on the same weights."""
    return set_backend(copy.deepcopy(model), "torch").eval()


def export_model(model: nn.Module, path: str | os.PathLike, *, format: Optional[str] = None,
                 size: Sequence[int] = (224, 224), in_channels: Optional[int] = None, batch_size: int = 2,
                 dynamic_batch: bool = True, outputs: str = "prediction", opset: Optional[int] = None,
                 check: bool = True, atol: float = 1e-5, rtol: float = 1e-5) -> ExportReport:
    """Export ``model`` (an EMCADNet, EGE-UNet, MALUNet or any module of one image input built from the
    ``emcad`` blocks) to ``path`` as ONNX (``format="onnx"``) or an AOTInductor package (``"pt2"``); the format is
    taken from the file name when not given. See the module docstring for what is exported.

    Args:
        size: ``(H, W)`` of the exported input, multiples of 32 (fixed in the exported program).
        in_channels: input channels (default: ``model.in_channels``, else 3).
        batch_size: batch of the example input that is traced (2: a batch of 1 would be specialised).
        dynamic_batch: the batch dimension is dynamic (else fixed at ``batch_size``).
        outputs: ``"prediction"`` (the last output only; EMCADNet computes only its last head) or ``"all"``.
        opset: ONNX opset (default: the exporter's).
        check: run the exported file and compare it with the eager model; :class:`ExportCheckError` when
            ``max|exported - eager| > 5 * max|eager - eager64| + atol + rtol * max|eager|``, where ``eager64`` is
            the plain composition in float64: both sides carry the model's float32 rounding, which is large for
            some models (EGE-UNet's probabilities: 9e-5 eager, 1.5e-4 onnxruntime with its graph optimisations).

    The file is written atomically (a temporary sibling moved into place). Returns an :class:`ExportReport`.
    """
    path = os.fspath(path)
    format = _format_of(path, format)
    height, width = _check_size(size)
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < (2 if dynamic_batch else 1):
        raise ValueError(f"batch_size must be an int >= {2 if dynamic_batch else 1}"
                         f"{' with a dynamic batch (a batch of 1 is specialised)' if dynamic_batch else ''}, "
                         f"got {batch_size!r}")
    missing = missing_export_packages(format)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'emcad-kernels[export]' "
                          f"(or pip install {' '.join(missing)})")
    channels = int(in_channels or getattr(model, "in_channels", None) or 3)
    start = time.perf_counter()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, channels, height, width, generator=gen).to(device, dtype)

    plain = _Exported(plain_copy(model), outputs).eval()
    with torch.no_grad():
        count = len(_flatten(plain(example)))  # also checks the input against the model (clear errors)
    names = _output_names(model, outputs, count)
    _write_export(plain, example, path, format, names, dynamic_batch, opset)
    diff = tolerance = None
    if check:
        diff, tolerance = _check_exported(path, format, model, outputs, example, dynamic_batch, atol, rtol)
    return ExportReport(path=path, format=format, input_shape=tuple(example.shape), dynamic_batch=dynamic_batch,
                        output_names=names, max_abs_diff=diff, tolerance=tolerance,
                        seconds=time.perf_counter() - start)


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """The exporter prints progress lines and warns about every missing torchvision op; failures still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _write_export(plain: nn.Module, example: Tensor, path: str, format: str, names: list[str], dynamic_batch: bool,
                  opset: Optional[int]) -> None:
    from emcad.io_safety import atomic_write

    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch")}} if dynamic_batch else None
    if format == "onnx":
        with torch.no_grad(), _quiet_onnx_exporter():
            program = torch.onnx.export(plain, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=names, dynamic_shapes=dynamic, opset_version=opset,
                                        verbose=False)
        payload = program.model_proto.SerializeToString()
        atomic_write(path, lambda f: f.write(payload), what="ONNX model")
    else:
        with torch.no_grad():
            program = torch.export.export(plain, (example,), dynamic_shapes=dynamic)
        atomic_write(path, lambda f: torch._inductor.aoti_compile_and_package(program, package_path=f),
                     what="AOTInductor package")


def run_exported(path: str | os.PathLike, image: Tensor, format: Optional[str] = None) -> list[Tensor]:
    """Run an exported file on ``image`` (onnxruntime on CPU for ONNX, ``aoti_load_package`` for .pt2); returns
    its outputs as CPU tensors."""
    path = os.fspath(path)
    format = _format_of(path, format)
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: image.detach().cpu().float().numpy()}
        return [torch.from_numpy(a) for a in session.run(None, feed)]
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        return [t.cpu() for t in _flatten(runner(image))]


def _check_exported(path, format, model, outputs, example, dynamic_batch, atol, rtol) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(1)
    batch = example.shape[0] + 1 if dynamic_batch else example.shape[0]
    image = torch.randn(batch, *example.shape[1:], generator=gen).to(example.device, example.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = [t.cpu() for t in _flatten(_Exported(model, outputs)(image))]
    finally:
        model.train(was_training)
    with torch.no_grad():  # the float64 plain composition measures the eager model's own rounding error
        exact = [t.cpu() for t in _flatten(_Exported(plain_copy(model).double(), outputs)(image.double()))]
    got = run_exported(path, image, format)
    if len(got) != len(expected):
        raise ExportCheckError(f"{path}: {len(got)} outputs, the eager model gives {len(expected)}")
    diff = tolerance = 0.0
    for a, b, b64 in zip(got, expected, exact):
        if a.shape != b.shape:
            raise ExportCheckError(f"{path}: output shape {tuple(a.shape)}, the eager model gives {tuple(b.shape)}")
        diff = max(diff, (a.double() - b.double()).abs().max().item())
        rounding = (b.double() - b64).abs().max().item()
        # the exported program may round up to 4x worse than eager (onnxruntime's fused graph: 1.7x measured on
        # EGE-UNet), plus eager's own rounding
        tolerance = max(tolerance, 5 * rounding + atol + rtol * b.abs().max().item())
    if not diff <= tolerance:  # also catches NaN
        raise ExportCheckError(f"{path}: the exported {format} model differs from the eager model by {diff:.3g} "
                               f"(tolerance {tolerance:.3g})")
    return diff, tolerance
