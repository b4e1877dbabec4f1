"""Intensity normalisation per channel, as the plan says.

``medunet.inference.normalization.WindowNormalizer`` applies the same schemes window by
window at inference; the two must agree (tested), so a new scheme goes into both.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes


def nonzero_region(image: np.ndarray) -> np.ndarray:
    """Voxels non-zero in any channel of ``(C, *S)``, holes filled: the body region nnU-Net
    crops to and, for masked z-scoring, takes its statistics from."""
    mask = np.zeros(image.shape[1:], dtype=bool)
    for c in range(image.shape[0]):
        mask |= image[c] != 0
    return binary_fill_holes(mask)


def normalize(image: np.ndarray, schemes: list[dict]) -> np.ndarray:
    """Normalise a channel-first image; returns float32.

    Schemes: ``rgb`` (/255 then the dataset's per-channel mean/std), ``ct`` (clip to the
    foreground percentiles then the foreground mean/std), ``window`` (clip to a HU window
    ``[lower, upper]``, then rescale it to [0, 1]), ``zscore`` (this image's own mean/std: MR
    intensities are not comparable across scans; with ``"nonzero_mask": true`` the statistics
    come from the voxels != 0 and the zero voxels stay 0, so a large empty background, such as
    skull-stripped brains, neither dominates the statistics nor becomes a spurious intensity;
    ``"nonzero_mask": "filled"`` is nnU-Net's mask instead: voxels non-zero in any channel, holes
    filled, every voxel inside it normalised), ``minmax`` (this image rescaled to [0, 1]), ``none``.
    """
    if image.shape[0] != len(schemes):
        raise ValueError(f"image has {image.shape[0]} channels, plan expects {len(schemes)}")
    out = np.empty(image.shape, dtype=np.float32)
    filled = None
    for c, sch in enumerate(schemes):
        x = image[c].astype(np.float32, copy=False)
        kind = sch["scheme"]
        if kind == "rgb":
            out[c] = (x / 255.0 - sch["mean"]) / sch["std"]
        elif kind == "ct":
            out[c] = (np.clip(x, sch["lower"], sch["upper"]) - sch["mean"]) / sch["std"]
        elif kind == "window":
            lo, hi = float(sch["lower"]), float(sch["upper"])
            out[c] = (np.clip(x, lo, hi) - lo) / (hi - lo)
        elif kind == "zscore" and sch.get("nonzero_mask") == "filled":
            if filled is None:
                filled = nonzero_region(image)
            vals = x[filled].astype(np.float64)
            mean = float(vals.mean()) if vals.size else 0.0
            std = float(vals.std()) if vals.size else 1.0
            out[c] = np.where(filled, (x - mean) / max(std, 1e-8), x)
        elif kind == "zscore" and sch.get("nonzero_mask"):
            mask = x != 0
            vals = x[mask].astype(np.float64)
            mean = float(vals.mean()) if vals.size else 0.0
            std = float(vals.std()) if vals.size else 1.0
            out[c] = np.where(mask, (x - mean) / max(std, 1e-8), 0.0)
        elif kind == "zscore":
            out[c] = (x - x.mean()) / max(float(x.std()), 1e-8)
        elif kind == "minmax":
            lo = float(x.min())
            out[c] = (x - lo) / max(float(x.max()) - lo, 1e-8)
        elif kind == "none":
            out[c] = x
        else:
            raise ValueError(f"unknown normalisation scheme '{kind}'")
    return out
