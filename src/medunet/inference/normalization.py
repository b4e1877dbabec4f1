"""Normalisation applied window by window, so a large raw image is never copied as float32.

Every scheme of :func:`medunet.preprocessing.normalize` is an affine map after an optional
clip, ``(clip(x, lo, hi) - shift) * scale``, and for ``zscore`` with ``nonzero_mask`` a final
``where(x != 0, ..., 0)``: all of it is per voxel, so it can run on each window as the
sliding window cuts it, and only one window is ever held as float32. The per-image
statistics that ``zscore`` needs are computed here in float64 chunks (numpy's ``x.std()``,
or ``x[x != 0]``, would allocate a full-size temporary). The result equals ``normalize()`` to
float32 rounding (tested).
"""

from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK = 1 << 22


def _chunks(x: np.ndarray, nonzero: bool):
    flat = x.reshape(-1)
    for i in range(0, flat.size, _CHUNK):
        part = flat[i : i + _CHUNK]
        yield part[part != 0] if nonzero else part


def _mean_std(x: np.ndarray, nonzero: bool = False) -> tuple[float, float]:
    """Two-pass mean and standard deviation in float64 chunks, without a full-size copy;
    with ``nonzero`` over the voxels != 0 only (0, 1 when there are none)."""
    n, total = 0, 0.0
    for part in _chunks(x, nonzero):
        n += part.size
        total += float(part.sum(dtype=np.float64))
    if n == 0:
        return 0.0, 1.0
    mean = total / n
    sq = 0.0
    for part in _chunks(x, nonzero):
        d = part.astype(np.float64) - mean
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
        lo, hi, shift, scale, masked = [], [], [], [], []
        for c, sch in enumerate(schemes):
            kind = sch["scheme"]
            low, high, sh, sc = -math.inf, math.inf, 0.0, 1.0
            if kind == "rgb":
                sh, sc = 255.0 * sch["mean"], 1.0 / (255.0 * sch["std"])
            elif kind == "ct":
                low, high, sh, sc = sch["lower"], sch["upper"], sch["mean"], 1.0 / sch["std"]
            elif kind == "window":
                low, high = float(sch["lower"]), float(sch["upper"])
                sh, sc = low, 1.0 / (high - low)
            elif kind == "zscore":
                if sch.get("nonzero_mask") == "filled":  # needs the whole image's filled mask
                    raise ValueError("the filled non-zero mask is not per voxel")
                mean, std = _mean_std(image[c], nonzero=bool(sch.get("nonzero_mask")))
                sh, sc = mean, 1.0 / max(std, 1e-8)
            elif kind == "minmax":
                lo_c, hi_c = float(image[c].min()), float(image[c].max())
                sh, sc = lo_c, 1.0 / max(hi_c - lo_c, 1e-8)
            elif kind != "none":
                raise ValueError(f"unknown normalisation scheme '{kind}'")
            masked.append(kind == "zscore" and bool(sch.get("nonzero_mask")))
            lo.append(low)
            hi.append(high)
            shift.append(sh)
            scale.append(sc)
        self.clip = any(math.isfinite(v) for v in lo + hi)
        self.lo, self.hi = torch.tensor(lo), torch.tensor(hi)
        self.shift = torch.tensor(shift, dtype=torch.float64)
        self.scale = torch.tensor(scale, dtype=torch.float64)
        self.masked = torch.tensor(masked) if any(masked) else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (batch.ndim - 2)
        raw = batch.to(torch.float32)
        x = raw
        if self.clip:
            x = torch.maximum(torch.minimum(x, self.hi.view(shape)), self.lo.view(shape))
        # float64 for the affine step: CT and raw MR values are large, their z-scores small
        out = ((x.double() - self.shift.view(shape)) * self.scale.view(shape)).float()
        if self.masked is not None:  # zscore inside the non-zero region: zero voxels stay 0
            out = torch.where(self.masked.view(shape) & (raw == 0), 0.0, out)
        return out
