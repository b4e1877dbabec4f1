"""Patch sampling from in-memory cases, with foreground oversampling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PatchSampler:
    """Draws ``(images, labels)`` patch batches from normalised cases.

    A share ``fg_oversample`` of patches is centred (with jitter) on a voxel of a randomly
    chosen foreground class present in the case; the rest are placed uniformly. Cases
    smaller than the patch are padded once here (image 0 = the normalised mean, label 0).
    ``ignore`` is a label value that is not a class (pseudo-labels' "no target"): patches are
    never centred on it.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 patch: Sequence[int], batch_size: int, fg_oversample: float = 1 / 3,
                 rng: np.random.Generator | None = None, max_fg_points: int = 20000,
                 ignore: int | None = None) -> None:
        self.patch = np.asarray(patch, dtype=int)
        self.batch_size = batch_size
        self.fg_oversample = fg_oversample
        self.rng = rng or np.random.default_rng()
        self.images, self.labels, self.fg_points = [], [], []
        for img, lab in zip(images, labels, strict=True):
            pad = np.maximum(self.patch - np.array(lab.shape), 0)
            if pad.any():
                widths = [(p // 2, p - p // 2) for p in pad]
                img = np.pad(img, [(0, 0), *widths])
                lab = np.pad(lab, widths)
            self.images.append(img)
            self.labels.append(lab)
            points = {}
            for c in np.unique(lab):
                if c == 0 or c == ignore:
                    continue
                pts = np.argwhere(lab == c)
                if len(pts) > max_fg_points:
                    pts = pts[self.rng.choice(len(pts), max_fg_points, replace=False)]
                points[int(c)] = pts
            self.fg_points.append(points)

    def _start(self, idx: int, force_fg: bool) -> np.ndarray:
        shape = np.array(self.labels[idx].shape)
        high = shape - self.patch
        points = self.fg_points[idx]
        if force_fg and points:
            cls = list(points)[self.rng.integers(len(points))]
            centre = points[cls][self.rng.integers(len(points[cls]))]
            jitter = self.rng.integers(-(self.patch // 4), self.patch // 4 + 1)
            start = centre - self.patch // 2 + jitter
        else:
            start = self.rng.integers(0, high + 1)
        return np.clip(start, 0, high)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One batch: images ``(B, C, *P)`` float32 and labels ``(B, *P)`` uint8."""
        imgs, labs = [], []
        for _ in range(self.batch_size):
            idx = int(self.rng.integers(len(self.images)))
            start = self._start(idx, self.rng.random() < self.fg_oversample)
            sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))
            imgs.append(self.images[idx][(slice(None), *sl)])
            labs.append(self.labels[idx][sl])
        return np.stack(imgs).astype(np.float32, copy=False), np.stack(labs)
