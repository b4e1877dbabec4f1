"""A grid of augmented training patches with their labels: check the settings by eye.

``medunet augment-preview DATA -o grid.png`` draws exactly what the trainer would feed the
network (same plan; the same crop, resampling and normalisation as the training cache; same
sampler and augmentation), so a too-strong setting is seen before a run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from medunet.augment import augment_batch, validate_augmentation
from medunet.errors import InputError
from medunet.files import atomic_file

TILE_PX = 200
"""Each sample is drawn in a TILE_PX x TILE_PX square: the PNG is (rows * TILE_PX) high and
(cols * TILE_PX) wide, with cols = ceil(sqrt(n)) and rows = ceil(n / cols)."""
MAX_CASES = 8
COLOURS = ["#ff00ff", "#00ff00", "#ffd700", "#00bfff", "#ff4500", "#7fff00", "#ff1493", "#1e90ff"]
_DPI = 100


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the preview grid for n samples."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def slice_axis(patch: list[int] | tuple[int, ...]) -> int:
    """The axis a 3D patch is cut across for display: the thinnest (the last one on ties)."""
    return min(range(len(patch)), key=lambda a: (patch[a], -a))


def _display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised -> grey (H, W) or RGB (H, W, 3) in [0, 1], 1-99 percentile window."""
    x = np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image[0]
    lo, hi = np.percentile(x, [1, 99])
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _draw_tile(ax, image: np.ndarray, label: np.ndarray, num_classes: int, title: str) -> None:
    from matplotlib.colors import to_rgba

    shown = _display(image)
    ax.imshow(shown, cmap=None if shown.ndim == 3 else "gray", interpolation="nearest", vmin=0, vmax=1)
    overlay = np.zeros((*label.shape, 4))
    for c in range(1, num_classes):
        mask = label == c
        if not mask.any():
            continue
        colour = COLOURS[(c - 1) % len(COLOURS)]
        overlay[mask] = to_rgba(colour, 0.25)
        if not mask.all():
            ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
    ax.imshow(overlay, interpolation="nearest")
    ax.text(0.02, 0.98, title, color="white", fontsize=8, ha="left", va="top", transform=ax.transAxes)
    ax.set_axis_off()


def augment_preview(data: str | Path, out_png: str | Path, n: int = 16, seed: int = 0,
                    overrides: dict | None = None) -> Path:
    """Write a PNG grid of ``n`` augmented patches of the dataset at ``data``.

    The plan is derived as for training (``overrides`` as with ``--set``, e.g.
    ``{"training.augment.rotation.p": 1.0}``); up to 8 training cases are loaded and
    preprocessed as the training cache does it (crop, resampling to the working resolution,
    normalisation), ``n`` patches sampled (foreground oversampling as in training) and augmented
    with ``plan.training["augment"]``. Each tile shows the image (3D: the middle slice across
    the patch's thinnest axis) with each label class as a coloured fill and contour. The PNG
    is ``grid_shape(n)`` tiles of :data:`TILE_PX` pixels, written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medunet.datasets import load_case
    from medunet.planning import prepare_plan
    from medunet.preprocessing.pipeline import preprocess_case
    from medunet.training.sampler import PatchSampler

    out_png = Path(out_png)
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}", fix="ask for 1 or more samples, e.g. --n 16")
    if out_png.is_dir():
        raise InputError("the output is a directory", out_png, "give a file name such as grid.png")
    dataset, plan = prepare_plan(data, overrides=overrides)
    config = plan.training.get("augment", {})
    validate_augmentation(config)  # a bad setting fails before any case is loaded
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(dataset.train), size=min(MAX_CASES, len(dataset.train)), replace=False))
    images, labels = [], []
    for i in chosen:
        raw, lab, geom = load_case(dataset.train[int(i)], dataset)
        img, seg, _ = preprocess_case(raw, list(geom.spacing[-(raw.ndim - 1):]), plan, label=lab)
        images.append(img)
        labels.append(seg)
    sampler = PatchSampler(images, labels, plan.patch_size, n, plan.training.get("fg_oversample", 1 / 3), rng)
    x, y = sampler.sample()
    generator = torch.Generator().manual_seed(seed)
    xa, ya = augment_batch(torch.from_numpy(x), torch.from_numpy(y), config, generator)
    xa, ya = xa.numpy(), ya.numpy()
    if plan.dim == 3:
        axis = slice_axis(plan.patch_size)
        mid = plan.patch_size[axis] // 2
        xa, ya = np.take(xa, mid, axis=2 + axis), np.take(ya, mid, axis=1 + axis)

    rows, cols = grid_shape(n)
    fig = Figure(figsize=(cols * TILE_PX / _DPI, rows * TILE_PX / _DPI), dpi=_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    for k in range(n):
        r, c = divmod(k, cols)
        ax = fig.add_axes((c / cols, 1 - (r + 1) / rows, 1 / cols, 1 / rows))
        _draw_tile(ax, xa[k], ya[k], plan.num_classes, f"#{k}")
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=_DPI, facecolor="black", format="png")
    return out_png
