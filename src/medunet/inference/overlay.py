"""PNG overlays of a prediction on its image: a quick look without a viewer.

2D: the image with the contour of each class. 3D: three orthogonal slices through the
centre of the predicted foreground, drawn with the voxel spacing as aspect ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medunet.files import atomic_file

COLOURS = ["#ff00ff", "#00ff00", "#ffd700", "#00bfff", "#ff4500", "#7fff00", "#ff1493", "#1e90ff"]


def _display(image: np.ndarray) -> np.ndarray:
    """(C, *S) -> grey (*S) or RGB (*S, 3) in [0, 1], 1-99 percentile window."""
    if image.shape[0] == 3 and image.ndim == 3:
        rgb = np.moveaxis(image, 0, -1).astype(np.float32)
        return rgb / 255.0 if image.dtype == np.uint8 else _window(rgb)
    return _window(image[0].astype(np.float32))


def _window(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [1, 99])
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _panel(ax, image: np.ndarray, labels: np.ndarray, values: Sequence[int], aspect: float,
           origin: str = "upper") -> None:
    ax.imshow(image, cmap=None if image.ndim == 3 else "gray", aspect=aspect, origin=origin,
              interpolation="nearest")
    for i, v in enumerate(values):
        m = labels == v
        if m.any() and not m.all():
            ax.contour(m.astype(np.float32), levels=[0.5], colors=COLOURS[i % len(COLOURS)],
                       linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def write_overlay(image: np.ndarray, labels: np.ndarray, path: str | Path, label_values: Sequence[int],
                  spacing: Sequence[float] | None = None, title: str = "") -> Path:
    """Draw ``labels`` (raw values, spatial shape) over ``image`` (C, *S) into a PNG (atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    values = [int(v) for v in label_values[1:]]
    spacing = list(spacing) if spacing is not None and len(spacing) == labels.ndim else [1.0] * labels.ndim
    shown = _display(image)
    if labels.ndim == 2:
        h, w = labels.shape[0] * spacing[0], labels.shape[1] * spacing[1]
        fig = Figure(figsize=(6.0, max(2.0, min(12.0, 6.0 * h / max(w, 1e-6))) + 0.4))
        _panel(fig.subplots(1, 1), shown, labels, values, aspect=spacing[0] / spacing[1])
    else:
        fg = np.isin(labels, values)
        centre = ([int(round(float(np.mean(ix)))) for ix in np.nonzero(fg)] if fg.any()
                  else [s // 2 for s in labels.shape])
        ext = [n * sp for n, sp in zip(labels.shape, spacing, strict=True)]  # physical extent
        tallest = max(ext[b] / ext[a] for a, b in ((1, 2), (0, 2), (0, 1)))  # panel height / width
        fig = Figure(figsize=(12.0, 4.0 * min(max(tallest, 0.3), 1.5) + 0.6))
        for k, ax in enumerate(fig.subplots(1, 3)):
            a, b = [i for i in range(3) if i != k]
            idx: list = [slice(None)] * 3
            idx[k] = centre[k]
            t = tuple(idx)
            # rows = axis b, columns = axis a, origin lower: the usual radiological look
            _panel(ax, shown[t].T, labels[t].T, values, aspect=spacing[b] / spacing[a], origin="lower")
            ax.set_title(f"axis {k} = {centre[k]}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    FigureCanvasAgg(fig)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    return path
