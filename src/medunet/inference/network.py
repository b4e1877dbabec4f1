"""A plain PyTorch network over a whole image: the sliding window without a Predictor (for
training-time validation, distillation timing and simple uses)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medunet.inference.backends import TorchBackend
from medunet.inference.sliding_window import WindowPredictor, sliding_window
from medunet.inference.tta import window_predictor


def sliding_window_inference(net: torch.nn.Module | WindowPredictor, image: torch.Tensor | np.ndarray,
                             patch: Sequence[int], num_classes: int, overlap: float = 0.5,
                             batch_size: int = 4, sigma_scale: float = 0.125, precision: str = "fp32",
                             device: torch.device | None = None) -> torch.Tensor:
    """Class probabilities ``(K, *S)`` (float32, on the CPU) for one normalised image ``(C, *S)``.

    ``net`` is a PyTorch module (run on ``device`` with ``precision``) or a window predictor
    (see :func:`sliding_window`). Kept for training-time validation and simple uses.
    """
    if isinstance(net, torch.nn.Module):
        dev = device or next(net.parameters()).device
        net = window_predictor([TorchBackend(net, dev, precision)])
    probs, _ = sliding_window(net, image, patch, num_classes, overlap=overlap, batch_size=batch_size,
                              sigma_scale=sigma_scale)
    assert probs is not None
    return probs
