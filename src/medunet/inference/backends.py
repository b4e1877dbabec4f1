"""Backends run a network on a batch of windows and return logits.

Everything around them (normalisation, sliding window, test-time augmentation, ensembling,
post-processing) is shared, so the PyTorch and ONNX Runtime paths differ only here.
"""

from __future__ import annotations

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
