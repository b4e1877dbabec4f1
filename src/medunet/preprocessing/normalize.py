"""Intensity normalisation per channel, as the plan says."""

from __future__ import annotations

import numpy as np


def normalize(image: np.ndarray, schemes: list[dict]) -> np.ndarray:
    """Normalise a channel-first image; returns float32.

    Schemes: ``rgb`` (/255 then the dataset's per-channel mean/std), ``ct`` (clip to the
    foreground percentiles then the foreground mean/std), ``zscore`` (this image's own
    mean/std: MR intensities are not comparable across scans), ``none``.
    """
    if image.shape[0] != len(schemes):
        raise ValueError(f"image has {image.shape[0]} channels, plan expects {len(schemes)}")
    out = np.empty(image.shape, dtype=np.float32)
    for c, sch in enumerate(schemes):
        x = image[c].astype(np.float32, copy=False)
        kind = sch["scheme"]
        if kind == "rgb":
            out[c] = (x / 255.0 - sch["mean"]) / sch["std"]
        elif kind == "ct":
            out[c] = (np.clip(x, sch["lower"], sch["upper"]) - sch["mean"]) / sch["std"]
        elif kind == "zscore":
            out[c] = (x - x.mean()) / max(float(x.std()), 1e-8)
        elif kind == "none":
            out[c] = x
        else:
            raise ValueError(f"unknown normalisation scheme '{kind}'")
    return out
