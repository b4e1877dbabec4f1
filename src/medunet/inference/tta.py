"""Test-time augmentation and ensembling, applied window by window.

Each window batch is transformed (mirrored, rotated), run through every model, mapped back
and averaged before the sliding window accumulates it. Working per window (as nnU-Net does
for mirroring) keeps memory at one batch instead of one full-size probability map per pass.

Rotations are in-plane (the two finest-spaced axes), by grid_sample. Mapping rotated
probabilities back leaves the window's corners without a prediction; those pixels get weight
0 for that pass (the un-rotated passes always cover them), so no invented values are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medunet.errors import InputError
from medunet.inference.backends import Backend
from medunet.inference.sliding_window import WindowPredictor

TTA_MODES = ("none", "flip", "full")
ROTATION_DEGREES = 10.0
# Mirroring costs 2^dims passes. Training keeps it for a model only where it raised the mean
# validation Dice by this much: the default prediction is meant to stay within half a Dice point
# of the most accurate setting (BENCHMARKS.md, prediction speed), and no slower than needed.
TTA_MIN_GAIN = 0.005


def mean_dice(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], label_values: Sequence[int]) -> float:
    """Mean over foreground classes of the per-case mean Dice (a case where both are empty
    scores 1): the figure a TTA choice compares."""
    per_class = []
    for v in label_values[1:]:
        scores = []
        for p, r in zip(preds, refs, strict=True):
            pm, rm = np.asarray(p) == v, np.asarray(r) == v
            total = int(pm.sum()) + int(rm.sum())
            scores.append(1.0 if total == 0 else 2.0 * int(np.count_nonzero(pm & rm)) / total)
        per_class.append(float(np.mean(scores)))
    return float(np.mean(per_class)) if per_class else float("nan")


@dataclass(frozen=True)
class Transform:
    """Mirror ``flip`` (spatial axes, 0-based), then rotate by ``angle`` degrees in ``plane``."""

    flip: tuple[int, ...] = ()
    angle: float = 0.0
    plane: tuple[int, int] = (0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            x = torch.flip(x, [2 + a for a in self.flip])
        if self.angle:
            x = rotate(x, self.angle, self.plane, padding="reflection")
        return x

    def inverse(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Map predictions back; returns them and their validity weight (None = 1 everywhere)."""
        weight = None
        if self.angle:
            p = rotate(p, -self.angle, self.plane, padding="zeros")
            ones = torch.ones((1, 1, *p.shape[2:]), dtype=p.dtype, device=p.device)
            # where the rotated window did not reach, p faded to 0 just as this weight does
            weight = rotate(ones, -self.angle, self.plane, padding="zeros")
        if self.flip:
            p = torch.flip(p, [2 + a for a in self.flip])
            if weight is not None:
                weight = torch.flip(weight, [2 + a for a in self.flip])
        return p, weight


def rotate(x: torch.Tensor, degrees: float, plane: tuple[int, int], padding: str = "zeros") -> torch.Tensor:
    """Rotate ``(N, C, *S)`` about the centre of the spatial axes ``plane`` (bilinear).

    The angle is in voxel space (in-plane spacing is normally isotropic).
    """
    nsp = x.ndim - 2
    a, b = plane
    t = math.radians(degrees)
    m = np.eye(nsp)
    m[a, a], m[a, b], m[b, a], m[b, b] = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    # affine_grid works in normalised (-1..1) coordinates, last tensor axis first
    rev = np.eye(nsp)[::-1]
    half = np.array([max((n - 1) / 2, 1.0) for n in reversed(x.shape[2:])])
    theta = np.diag(1 / half) @ rev @ m @ rev @ np.diag(half)
    theta = np.concatenate([theta, np.zeros((nsp, 1))], axis=1)
    th = torch.as_tensor(theta, dtype=torch.float32, device=x.device).expand(x.shape[0], -1, -1)
    grid = F.affine_grid(th, list(x.shape), align_corners=True)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=padding, align_corners=True)


def rotation_plane(spacing: Sequence[float], dim: int) -> tuple[int, int]:
    """The two finest-spaced axes (the acquisition plane of anisotropic scans); ties: first axes."""
    if dim == 2:
        return (0, 1)
    sp = list(spacing)[:dim] if len(spacing) >= dim else [1.0] * dim
    order = sorted(range(dim), key=lambda i: (sp[i], i))
    return tuple(sorted(order[:2]))  # type: ignore[return-value]


def tta_transforms(mode: str, dim: int, plane: tuple[int, int] = (0, 1),
                   mirror_axes: Sequence[int] | None = None) -> list[Transform]:
    """``none``: identity; ``flip``: every mirror combination (4 in 2D, 8 in 3D; of
    ``mirror_axes`` only, when given: an imported nnU-Net model's allowed axes);
    ``full``: those plus +-10 degree in-plane rotations."""
    if mode not in TTA_MODES:
        raise InputError(f"unknown test-time augmentation '{mode}'", fix=f"use auto, {', '.join(TTA_MODES)}")
    if mode == "none":
        return [Transform()]
    axes = list(range(dim)) if mirror_axes is None else sorted({int(a) for a in mirror_axes})
    flips = [Transform(flip=tuple(a for i, a in enumerate(axes) if mask >> i & 1))
             for mask in range(2 ** len(axes))]
    if mode == "flip":
        return flips
    return flips + [Transform(angle=s * ROTATION_DEGREES, plane=plane) for s in (1, -1)]


AVERAGES = ("probabilities", "logits")


def window_predictor(backends: Sequence[Backend], transforms: Sequence[Transform] = (Transform(),),
                     average: str = "probabilities") -> WindowPredictor:
    """Average of softmax probabilities over every backend (model) and transform, per window;
    ``average="logits"`` averages the logits instead (nnU-Net's way, for imported models)."""
    if average not in AVERAGES:
        raise ValueError(f"unknown average '{average}' ({', '.join(AVERAGES)})")
    backends = list(backends)
    transforms = list(transforms)

    def predict(batch: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        weight: torch.Tensor | float = 0.0
        for backend in backends:
            for t in transforms:
                logits = backend(t.forward(batch)).float()
                p, w = t.inverse(logits if average == "logits" else torch.softmax(logits, dim=1))
                total = p if total is None else total + p
                weight = weight + (1.0 if w is None else w)
        assert total is not None
        return total / weight

    return predict
