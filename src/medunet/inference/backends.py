"""Backends run a network on a batch of windows and return logits.

Everything around them (normalisation, sliding window, test-time augmentation, ensembling,
post-processing) is shared, so the PyTorch, ONNX Runtime and OpenVINO paths differ only here.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from medunet.errors import InputError
from medunet.runtime import autocast, memory_format


class Backend(Protocol):
    """``backend(batch)`` -> logits ``(N, K, *S)`` for a float32 batch ``(N, C, *S)``."""

    name: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


def channels_last_pays(net: torch.nn.Module) -> bool:
    """Whether ``net`` runs faster channels_last: not with instance norm, whose PyTorch kernel
    copies a channels_last activation into a contiguous one (and the next conv copies it back):
    an imported nnU-Net network ran ~10 % faster contiguous, in fp32 and bf16 (BENCHMARKS.md)."""
    return not any(isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) for m in net.modules())


class TorchBackend:
    """A PyTorch module on a device, with autocast precision and channels_last on 2D/3D
    (where :func:`channels_last_pays`)."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, device: torch.device, precision: str = "fp32") -> None:
        self.net = net
        self.device = device
        self.precision = precision
        self.channels_last = channels_last_pays(net)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        nsp = x.ndim - 2
        if nsp in (2, 3) and self.channels_last:
            x = x.contiguous(memory_format=memory_format(nsp))
        with autocast(self.device, self.precision):
            logits = self.net(x)
        return logits.float()


class OnnxBackend:
    """An ONNX Runtime session (fp32 or int8 QDQ model) on the CPU.

    The exported graph pads to the network's divisor and crops back itself, so any window
    size works (see :mod:`medunet.export`).
    """

    name = "onnx"
    PRECISIONS = ("fp32",)  # what --precision may ask of it (int8 is the export's, --int8)

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency, but be clear if missing
            raise InputError("onnxruntime is not installed", fix="pip install onnxruntime") from exc
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"cannot load the ONNX model ({exc})".replace("\n", " "), self.path,
                             "re-export it with 'medunet export MODEL --format onnx'") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.device = torch.device("cpu")
        self.precision = "int8" if "int8" in self.path.name else "fp32"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        (logits,) = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(logits)


class OpenVinoBackend:
    """OpenVINO on the CPU, running the same ONNX export as :class:`OnnxBackend`.

    Why a third backend: OpenVINO's CPU plugin fuses instance norm into its neighbours and runs
    convolutions in bf16 where the CPU has native bf16 (AVX512-BF16, AMX). One window of an
    nnU-Net network (instance norm after every conv) ran 1.8-2.1x faster than PyTorch bf16, and
    2.2-2.4x faster than PyTorch in fp32 (``bench/openvino_window.py``, BENCHMARKS.md). The
    graph keeps the export's dynamic batch and spatial axes (as fast as a graph compiled for the
    window's shape there) and is compiled once; infer requests are per thread, as
    ``medunet serve`` calls one backend from several worker threads.
    """

    name = "openvino"
    PRECISIONS = ("fp32", "bf16")

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise InputError("OpenVINO is not installed", fix="pip install 'medunet[openvino]'") from exc
        if precision not in self.PRECISIONS:
            raise InputError(f"the OpenVINO backend runs {' or '.join(self.PRECISIONS)}, not {precision}",
                             fix=f"use --precision {', '.join(self.PRECISIONS)} or auto")
        self.path = Path(path)
        int8 = "int8" in self.path.name
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            precision = "fp32"  # OpenVINO has no bf16 kernels for this CPU: say what runs
        if int8:  # the quantised convs run in int8; a bf16 hint on top does not compile with dynamic axes
            precision = "fp32"
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
                  "PERFORMANCE_HINT": "LATENCY"}
        try:
            self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        except Exception as exc:
            raise InputError(f"OpenVINO cannot load the ONNX model ({exc})".replace("\n", " "), self.path,
                             "re-export it with 'medunet export MODEL --format onnx'") from exc
        self.device = torch.device("cpu")
        self.precision = "int8" if int8 else precision
        self._local = threading.local()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        out = request.infer({0: x})[0]
        return torch.from_numpy(np.array(out, dtype=np.float32))  # a copy: the request reuses its buffer
