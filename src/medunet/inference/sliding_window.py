"""Sliding-window inference with Gaussian weighting, for 2D and 3D alike.

Windows overlap (50% by default) and each window's softmax is weighted by a Gaussian
centred on the window, because predictions near a window's border see less context.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medunet.runtime import autocast, memory_format


@functools.lru_cache(maxsize=8)
def gaussian_weights(patch: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian importance map of the patch size, max 1, min clamped above 0."""
    axes = []
    for n in patch:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0]
    for a in axes[1:]:
        w = w.unsqueeze(-1) * a
    w = w / w.max()
    return w.clamp_min(1e-3)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread window starts covering ``size`` with at least ``overlap`` between windows."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


@torch.inference_mode()
def sliding_window_inference(net: torch.nn.Module, image: torch.Tensor, patch: Sequence[int],
                             num_classes: int, overlap: float = 0.5, batch_size: int = 4,
                             sigma_scale: float = 0.125, precision: str = "fp32",
                             device: torch.device | None = None) -> torch.Tensor:
    """Class probabilities ``(K, *S)`` (float32, on the CPU) for one image ``(C, *S)``.

    Images smaller than the patch are padded (and cropped back). Windows are run in batches
    of ``batch_size`` on ``device`` and accumulated on the CPU in float32.
    """
    device = device or next(net.parameters()).device
    nsp = image.ndim - 1
    patch = tuple(int(p) for p in patch)
    size = tuple(image.shape[1:])
    pad = [max(0, p - s) for p, s in zip(patch, size, strict=True)]
    if any(pad):
        image = F.pad(image, [q for ax in reversed(pad) for q in (0, ax)])
    full = tuple(image.shape[1:])
    win = tuple(min(p, s) for p, s in zip(patch, full, strict=True))
    weight = gaussian_weights(win, sigma_scale)
    probs = torch.zeros((num_classes, *full), dtype=torch.float32)
    norm = torch.zeros(full, dtype=torch.float32)
    starts = list(itertools.product(*[window_starts(s, w, overlap) for s, w in zip(full, win, strict=True)]))
    mf = memory_format(nsp)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        slices = [tuple(slice(s, s + w) for s, w in zip(st, win, strict=True)) for st in chunk]
        batch = torch.stack([image[(slice(None), *sl)] for sl in slices]).to(device)
        if device.type == "cpu" or nsp in (2, 3):
            batch = batch.contiguous(memory_format=mf)
        with autocast(device, precision):
            logits = net(batch)
        p = torch.softmax(logits.float(), dim=1).cpu()
        for j, sl in enumerate(slices):
            probs[(slice(None), *sl)] += p[j] * weight
            norm[sl] += weight
    probs /= norm
    if any(pad):
        probs = probs[(slice(None), *[slice(0, s) for s in size])]
    return probs


def probabilities_to_labels(probs: torch.Tensor | np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Argmax over classes, mapped back to the raw label values of the dataset."""
    idx = probs.argmax(0)
    idx = idx.numpy() if isinstance(idx, torch.Tensor) else idx
    values = np.asarray(label_values)
    dtype = np.uint8 if values.max() <= 255 else np.uint16
    return values.astype(dtype)[idx]
