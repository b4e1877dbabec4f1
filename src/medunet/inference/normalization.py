"""Normalisation applied window by window, so a large raw image is never copied as float32.

Every scheme of :func:`medunet.preprocessing.normalize` is an affine map after an optional
clip: ``(clip(x, lo, hi) - shift) * scale``. The per-image statistics that ``zscore`` needs
are computed here in float64 chunks (numpy's ``x.std()`` would allocate a full-size
temporary). The result equals ``normalize()`` to float32 rounding (tested).
"""

from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK = 1 << 22


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    """Two-pass mean and standard deviation in float64 chunks, without a full-size copy."""
    flat = x.reshape(-1)
    n = flat.size
    total = 0.0
    for i in range(0, n, _CHUNK):
        total += float(flat[i : i + _CHUNK].sum(dtype=np.float64))
    mean = total / n
    sq = 0.0
    for i in range(0, n, _CHUNK):
        d = flat[i : i + _CHUNK].astype(np.float64) - mean
        sq += float(np.dot(d, d))
    return mean, math.sqrt(sq / n)


class WindowNormalizer:
    """``normalizer(batch)`` normalises a float32 window batch ``(N, C, *S)`` like the plan says.

    Args:
        image: the whole raw image ``(C, *S)`` (only read here, for ``zscore`` statistics).
        schemes: ``plan.normalization``, one dict per channel.
    """

    def __init__(self, image: np.ndarray, schemes: list[dict]) -> None:
        if image.shape[0] != len(schemes):
            raise ValueError(f"image has {image.shape[0]} channels, plan expects {len(schemes)}")
        lo, hi, shift, scale = [], [], [], []
        for c, sch in enumerate(schemes):
            kind = sch["scheme"]
            low, high, sh, sc = -math.inf, math.inf, 0.0, 1.0
            if kind == "rgb":
                sh, sc = 255.0 * sch["mean"], 1.0 / (255.0 * sch["std"])
            elif kind == "ct":
                low, high, sh, sc = sch["lower"], sch["upper"], sch["mean"], 1.0 / sch["std"]
            elif kind == "zscore":
                mean, std = _mean_std(image[c])
                sh, sc = mean, 1.0 / max(std, 1e-8)
            elif kind != "none":
                raise ValueError(f"unknown normalisation scheme '{kind}'")
            lo.append(low)
            hi.append(high)
            shift.append(sh)
            scale.append(sc)
        self.clip = any(math.isfinite(v) for v in lo + hi)
        self.lo, self.hi = torch.tensor(lo), torch.tensor(hi)
        self.shift = torch.tensor(shift, dtype=torch.float64)
        self.scale = torch.tensor(scale, dtype=torch.float64)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (batch.ndim - 2)
        x = batch.to(torch.float32)
        if self.clip:
            x = torch.maximum(torch.minimum(x, self.hi.view(shape)), self.lo.view(shape))
        # float64 for the affine step: CT and raw MR values are large, their z-scores small
        return ((x.double() - self.shift.view(shape)) * self.scale.view(shape)).float()
