"""Crop to the non-zero region and put a cropped result back.

Many scans (skull-stripped MR, masked images) are surrounded by zeros that carry nothing to
learn; cropping them away before resampling saves time and memory in training and inference
(nnU-Net's "crop to non-zero"). Boxes are ``[[start, stop], ...]`` per spatial axis, in voxels
of the uncropped array (JSON-friendly, stored in the preprocessing info).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["crop", "is_full", "nonzero_bbox", "uncrop"]


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Box around the voxels that are non-zero in any channel of ``image`` ``(C, *S)``.

    An image without any non-zero voxel gives the whole image (there is nothing to crop to).
    """
    spatial = image.shape[1:]
    mask = np.zeros(spatial, dtype=bool)
    for c in range(image.shape[0]):  # channel by channel: one bool volume, no (C, *S) temporary
        mask |= image[c] != 0
    bbox = []
    for axis in range(len(spatial)):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(len(spatial)) if a != axis)))
        if hit.size == 0:
            return [[0, int(n)] for n in spatial]
        bbox.append([int(hit[0]), int(hit[-1]) + 1])
    return bbox


def _spatial_offset(array: np.ndarray, bbox: Sequence[Sequence[int]]) -> int:
    lead = array.ndim - len(bbox)
    if lead not in (0, 1):
        raise ValueError(f"box with {len(bbox)} axes does not fit an array of shape {array.shape}")
    return lead


def crop(array: np.ndarray, bbox: Sequence[Sequence[int]]) -> np.ndarray:
    """The box of ``array`` (``(C, *S)`` or ``(*S)``), as a view."""
    lead = _spatial_offset(array, bbox)
    return array[(slice(None),) * lead + tuple(slice(int(a), int(b)) for a, b in bbox)]


def is_full(bbox: Sequence[Sequence[int]], shape: Sequence[int]) -> bool:
    """Whether the box covers the whole spatial ``shape`` (cropping would change nothing)."""
    return all(int(a) == 0 and int(b) == int(n) for (a, b), n in zip(bbox, shape, strict=True))


def uncrop(array: np.ndarray, bbox: Sequence[Sequence[int]], full_shape: Sequence[int],
           fill: float | Sequence[float] = 0) -> np.ndarray:
    """Place a cropped array back into an array of ``full_shape`` filled with ``fill``.

    ``full_shape`` is the spatial shape (or the whole shape including channels); for a
    channel-first array ``fill`` may give one value per channel (e.g. probability 1 for the
    background class and 0 for the others).
    """
    lead = _spatial_offset(array, bbox)
    full = tuple(int(n) for n in full_shape)
    if len(full) == len(bbox):
        full = array.shape[:lead] + full
    out = np.empty(full, dtype=array.dtype)
    if np.ndim(fill) == 0:
        out[...] = fill
    else:
        if not lead or len(fill) != array.shape[0]:
            raise ValueError(f"{len(fill)} fill values for an array of shape {array.shape}")
        for c, v in enumerate(fill):
            out[c] = v
    out[(slice(None),) * lead + tuple(slice(int(a), int(b)) for a, b in bbox)] = array
    return out
