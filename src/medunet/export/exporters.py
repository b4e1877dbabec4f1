"""ONNX (fp32 and static int8) and TorchScript exports of a model directory.

The U-Net pads its input to the down-sampling divisor and crops the output back, behind a
Python ``if`` that tracing would freeze. :class:`PadCropNet` does the pad and crop as plain
tensor arithmetic on the input's shape (a pad of 0 when none is needed), so the traced graph
takes any batch and spatial size. Every export is run on a random input of a size it was not
traced with and compared with PyTorch; the numbers go to ``MODEL/export/export_check.json``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medunet.errors import InputError
from medunet.files import atomic_file, publish
from medunet.modeldir import current_onnx, export_path, load_network
from medunet.planning import Plan

EXPORT_FORMATS = ("onnx", "torchscript")
OPSET = 17
CHECK_FILE = "export_check.json"


class PadCropNet(nn.Module):
    """The network with its pad-to-divisor and crop-back expressed through traceable shape ops."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.divisor = tuple(int(d) for d in getattr(net, "divisor", ()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pads: list = []
        for n, d in zip(reversed(size), reversed(self.divisor), strict=True):
            pads += [0, (d - n % d) % d]
        y = self.net(F.pad(x, pads))
        return y[(slice(None), slice(None), *(slice(0, n) for n in size))]


@dataclass
class ExportResult:
    """Where an export went and how closely it matches PyTorch."""

    path: Path
    format: str
    int8: bool
    check: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.check.get("random", {})
        line = (f"max |dp| {c.get('max_abs_diff', float('nan')):.2e}, "
                f"mask agreement {100 * c.get('mask_agreement', float('nan')):.2f}% "
                f"on a random {tuple(c.get('input_shape', ()))} input")
        cal = self.check.get("calibration")
        if cal:
            line += f"; {100 * cal['mask_agreement']:.2f}% on {cal['patches']} calibration patches"
        return line


def default_export_path(model_dir: str | Path, fmt: str = "onnx", int8: bool = False,
                        checkpoint: str = "best") -> Path:
    """``MODEL/export/model[_last][_int8].onnx`` or ``model[_last].torchscript.pt``."""
    return export_path(model_dir, fmt, int8, checkpoint)


def _odd_shape(plan: Plan, batch: int = 2) -> tuple[int, ...]:
    """A batch of 2 and spatial sizes that are not the traced patch (nor divisor multiples)."""
    return (batch, plan.in_channels, *[max(1, int(p) - 3) for p in plan.patch_size])


def _compare(reference: nn.Module, run: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> dict:
    with torch.inference_mode():
        ref = torch.softmax(reference(torch.from_numpy(x)).float(), 1)
    got = torch.softmax(torch.from_numpy(np.asarray(run(x))).float(), 1)
    if got.shape != ref.shape:
        raise RuntimeError(f"exported model returned shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    diff = (got - ref).abs()
    return {
        "input_shape": list(x.shape),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "mask_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
    }


def check_export(reference: nn.Module, run: Callable[[np.ndarray], np.ndarray], plan: Plan,
                 calibration: Sequence[np.ndarray] = (), seed: int = 0) -> dict:
    """Probabilities of the export vs PyTorch (fp32) on a random input of an untraced size,
    and (for int8) on the calibration patches, which look like real data."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(_odd_shape(plan)).astype(np.float32)
    result = {"random": _compare(reference, run, x)}
    if calibration:
        batch = np.concatenate(list(calibration[:4]), axis=0)
        result["calibration"] = {**_compare(reference, run, batch), "patches": int(batch.shape[0])}
    return result


def _record_check(model_dir: Path, path: Path, entry: dict) -> None:
    """Merge this export's check into ``MODEL/export/export_check.json`` (atomic write)."""
    check_path = Path(model_dir) / "export" / CHECK_FILE
    try:
        data = json.loads(check_path.read_text())
    except (OSError, ValueError):
        data = {}
    data[path.name] = entry
    with atomic_file(check_path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _export_onnx(net: nn.Module, plan: Plan, path: Path) -> None:
    import onnx

    wrapper = PadCropNet(net).eval()
    example = torch.zeros((1, plan.in_channels, *plan.patch_size))
    axes = {0: "batch", **{i + 2: f"size{i}" for i in range(plan.dim)}}
    with atomic_file(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings: the check below is the test
            torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": axes, "logits": axes},
                              opset_version=OPSET, do_constant_folding=True)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        meta = {"medunet.plan": json.dumps(plan.to_dict()), "medunet.output": "logits"}
        for k, v in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(model, str(tmp))


def _quantize_int8(fp32: Path, path: Path, patches: list[np.ndarray]) -> None:
    """Static QDQ quantisation (int8 weights per channel, int8 activations, min-max calibrated)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(patches)

        def get_next(self) -> dict | None:
            x = next(self.it, None)
            return None if x is None else {"image": x}

    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        source = fp32
        try:  # recommended pre-step: shape inference + graph optimisation (BN folding)
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(work) / "pre.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            source = pre
        except Exception:  # noqa: BLE001 - the pre-step is an optimisation, not a requirement
            source = fp32
        tmp = Path(work) / "int8.onnx"
        quantize_static(str(source), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)
        publish(tmp, path)


def _onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from medunet.inference.backends import OnnxBackend

    backend = OnnxBackend(path)
    return lambda x: backend(torch.from_numpy(x)).numpy()


def export_model(model_dir: str | Path, fmt: str = "onnx", *, int8: bool = False,
                 output: str | Path | None = None, calibration: str | Path | None = None,
                 checkpoint: str = "best", seed: int = 0) -> ExportResult:
    """Export ``checkpoint`` of a model directory and check it against PyTorch.

    Args:
        fmt: ``onnx`` (dynamic batch and spatial axes, opset 17) or ``torchscript`` (traced).
        int8: ONNX only: static QDQ quantisation calibrated on random patches of
            ``calibration`` images (default: the model's validation inputs); the fp32 ONNX
            model is exported first (to its default place) when missing.
        output: file to write (default ``MODEL/export/model[_int8].onnx`` /
            ``model.torchscript.pt``); the check always goes to ``MODEL/export/export_check.json``.
    """
    model_dir = Path(model_dir)
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown export format '{fmt}'", fix=f"use {' or '.join(EXPORT_FORMATS)}")
    if int8 and fmt != "onnx":
        raise InputError("int8 quantisation is for ONNX exports", fix="use --format onnx --int8")
    plan, net, ckpt = load_network(model_dir, checkpoint)
    net = net.float().eval()
    path = Path(output) if output else default_export_path(model_dir, fmt, int8, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    patches: list[np.ndarray] = []
    if fmt == "torchscript":
        with atomic_file(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(PadCropNet(net).eval(),
                                     torch.zeros((1, plan.in_channels, *plan.patch_size)), check_trace=False)
            traced.save(str(tmp))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path))

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return loaded(torch.from_numpy(x)).numpy()
    elif not int8:
        _export_onnx(net, plan, path)
        run = _onnx_runner(path)
    else:
        from medunet.export.calibration import calibration_patches

        patches = calibration_patches(model_dir, plan, calibration, seed=seed)
        fp32 = ensure_onnx(model_dir, checkpoint=checkpoint)
        _quantize_int8(fp32, path, patches)
        run = _onnx_runner(path)
    check = check_export(net, run, plan, patches, seed=seed)
    entry = {"format": fmt, "int8": int8, "path": str(path.resolve()), "checkpoint": ckpt.name,
             "checked_against": "PyTorch fp32 softmax probabilities", **check}
    _record_check(model_dir, path, entry)
    return ExportResult(path, fmt, int8, check)


def ensure_onnx(model_dir: str | Path, checkpoint: str = "best", int8: bool = False,
                calibration: str | Path | None = None) -> Path:
    """The default ONNX export of a model directory, (re-)exported when missing or older than
    its checkpoint."""
    current = current_onnx(model_dir, checkpoint, int8)
    if current is not None:
        return current
    return export_model(model_dir, "onnx", int8=int8, calibration=calibration, checkpoint=checkpoint).path


def ensure_onnx_all(model_dirs: str | Path | list[str | Path], checkpoint: str = "best", int8: bool = False,
                    calibration: str | Path | None = None) -> list[Path]:
    """:func:`ensure_onnx` for every network ``Predictor.load(model_dirs, backend="onnx")``
    will run: each fold of a cross-validation directory, both stages of a cascade."""
    from medunet.inference import expand_model_dirs
    from medunet.modeldir import is_cascade

    given = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    dirs: list[Path] = []
    for d in map(Path, given):
        if is_cascade(d):
            stages = Plan.load(d).cascade.get("stages") or {}
            dirs += [d / stages.get(s, s) for s in ("lowres", "fullres") if (d / stages.get(s, s)).is_dir()]
        else:
            dirs += expand_model_dirs(d)
    return [ensure_onnx(d, checkpoint, int8, calibration) for d in dirs]
