"""Synthetic datasets for the demo and the tests: textured background, noise and blob "lesions".

The same generator makes 2D (PNG) and 3D (NIfTI) sets, so both code paths are exercised by
data the package makes itself (no downloads).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from medunet.io import Geometry, write_image


def synthetic_case(shape: tuple[int, ...], rng: np.random.Generator, n_blobs: tuple[int, int] = (2, 5),
                   noise: float = 0.25, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One image (float, roughly zero-mean) and its label map.

    Background: smooth random texture plus a gradient; blobs: irregular ellipsoids (radius
    perturbed by smooth noise) whose contrast varies per blob; then white noise on top.
    With ``num_classes > 2`` blobs get classes 1..K-1 and class-specific brightness.
    """
    nd = len(shape)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 16)
    texture /= texture.std() + 1e-8
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    gradient = sum(rng.uniform(-0.5, 0.5) * g for g in grid)
    image = 0.5 * texture + gradient
    label = np.zeros(shape, dtype=np.uint8)
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 24)
    wobble /= np.abs(wobble).max() + 1e-8
    for _ in range(rng.integers(n_blobs[0], n_blobs[1] + 1)):
        centre = [rng.uniform(0.15, 0.85) * n for n in shape]
        radii = [rng.uniform(0.05, 0.13) * max(shape) for _ in shape]
        dist = sum(((np.arange(n).reshape([-1 if a == i else 1 for a in range(nd)]) - c) / r) ** 2
                   for i, (n, c, r) in enumerate(zip(shape, centre, radii, strict=True)))
        blob = dist + 0.6 * wobble < 1.0
        cls = int(rng.integers(1, num_classes))
        contrast = rng.uniform(1.2, 2.2) * (1.0 if cls % 2 else -1.0) * (1 + 0.4 * (cls - 1))
        image = image + contrast * blob
        label[blob] = cls
    image = image + noise * rng.standard_normal(shape)
    return image, label


def make_synthetic_dataset(root: str | Path, n_train: int = 24, n_test: int = 8,
                           shape: tuple[int, ...] = (128, 128), seed: int = 0,
                           num_classes: int = 2) -> Path:
    """Write an nnU-Net v2 raw dataset: PNG for 2D, NIfTI (1.5 x 1 x 1 mm) for 3D."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    is3d = len(shape) == 3
    ending = ".nii.gz" if is3d else ".png"
    geom = Geometry(spacing=(1.5, 1.0, 1.0)) if is3d else Geometry.identity(2)
    for split, n in (("Tr", n_train), ("Ts", n_test)):
        for i in range(n):
            image, label = synthetic_case(shape, rng, num_classes=num_classes)
            if is3d:
                img = image.astype(np.float32)
            else:  # 8-bit, as real PNGs are
                img = np.clip(image * 40 + 128, 0, 255).astype(np.uint8)
            case = f"synth_{split.lower()}{i:03d}"
            write_image(root / f"images{split}" / f"{case}_0000{ending}", img, geom)
            write_image(root / f"labels{split}" / f"{case}{ending}", label, geom)
    labels = {"background": 0, **{f"lesion{c}" if num_classes > 2 else "lesion": c
                                  for c in range(1, num_classes)}}
    meta = {
        "name": root.name,
        "description": "synthetic blobs on a textured background (medunet demo)",
        "channel_names": {"0": "MRI" if is3d else "grey"},
        "labels": labels,
        "numTraining": n_train,
        "numTest": n_test,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
