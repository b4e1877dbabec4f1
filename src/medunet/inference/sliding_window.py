"""Sliding-window inference with Gaussian weighting, for 2D and 3D alike.

Windows overlap (50% by default) and each window's softmax is weighted by a Gaussian
centred on the window, because predictions near a window's border see less context.

Memory: windows are visited in order of their start on one spatial axis (the one where a
window covers the smallest share of the image), so the weighted sums only need a buffer one
window thick along that axis. As soon as the next row of windows starts further on, the slab
before it is final: it is normalised and written out (as probabilities, as a label map, or
both) and the buffer moves on. A 512x512x300 volume with two classes and a 128x128x64 patch
needs a ~200 MB buffer instead of ~900 MB of full-size float32 sums, and when only labels
are wanted nothing of size ``K x volume`` is ever allocated.

The model is any callable ``predict(batch) -> probabilities`` on ``(N, C, *patch)``
tensors: a PyTorch net, an ONNX Runtime session, an ensemble with test-time augmentation
(:func:`medunet.inference.tta.window_predictor`) all go through this one code path.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

FLUSH_VOXELS = 1 << 22  # voxels per finalising step (a few 10 MB of temporaries)

WindowPredictor = Callable[[torch.Tensor], torch.Tensor]
"""``(N, C, *patch)`` float32 -> ``(N, K, *patch)`` class probabilities."""


WEIGHTS = ("medunet", "nnunet")
PADS = ("end", "center")


@functools.lru_cache(maxsize=8)
def gaussian_weights(patch: tuple[int, ...], sigma_scale: float = 0.125,
                     kind: str = "medunet") -> torch.Tensor:
    """Gaussian importance map of the patch size, max 1, min clamped above 0.

    ``medunet``: separable, centred between the middle voxels, clamped at 1e-3. ``nnunet``:
    nnU-Net v2's map (a delta at ``n // 2`` blurred by ``scipy.ndimage.gaussian_filter``,
    truncated at 4 sigma, stored as float16, zeros raised to the smallest non-zero value), so
    that imported nnU-Net models weigh their windows exactly as nnU-Net does.
    """
    if kind == "nnunet":
        from scipy.ndimage import gaussian_filter

        delta = np.zeros(patch)
        delta[tuple(n // 2 for n in patch)] = 1.0
        g = gaussian_filter(delta, [n * sigma_scale for n in patch], 0, mode="constant", cval=0)
        g = torch.from_numpy(g / g.max() * 10.0).to(torch.float16)
        g[g == 0] = g[g > 0].min()
        return g.float()
    if kind != "medunet":
        raise ValueError(f"unknown window weights '{kind}' ({', '.join(WEIGHTS)})")
    axes = []
    for n in patch:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0]
    for a in axes[1:]:
        w = w.unsqueeze(-1) * a
    w = w / w.max()
    return w.clamp_min(1e-3)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread window starts covering ``size`` with at least ``overlap`` between windows."""
    if size <= patch:
        return [0]
    step = max(1.0, patch * (1 - overlap))
    n = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


def _window_batch(image: np.ndarray | torch.Tensor, slices: list[tuple[slice, ...]],
                  patch: tuple[int, ...]) -> torch.Tensor:
    """Stack the windows as float32 (raw values: normalisation happens afterwards)."""
    parts = []
    for sl in slices:
        w = image[(slice(None), *sl)]
        # np.array copies: the window becomes float32 and writable (files may be read-only maps)
        w = torch.from_numpy(np.array(w, dtype=np.float32)) if isinstance(w, np.ndarray) else w
        parts.append(w.to(torch.float32))
    return torch.stack(parts)


@torch.inference_mode()
def sliding_window(predict: WindowPredictor, image: np.ndarray | torch.Tensor, patch: Sequence[int],
                   num_classes: int, *, overlap: float = 0.5, batch_size: int = 4,
                   sigma_scale: float = 0.125,
                   prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   probabilities: bool = True, labels: bool = False,
                   prob_dtype: torch.dtype = torch.float32, weights: str = "medunet", pad: str = "end",
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Probabilities ``(K, *S)`` and/or a class-index map ``(*S)`` for one image ``(C, *S)``.

    Args:
        predict: maps a window batch ``(N, C, *patch)`` to probabilities ``(N, K, *patch)``.
        image: channel-first numpy array or tensor, of any dtype; windows are cut from it as
            they are needed, so a raw image need not be normalised (or copied) as a whole.
        prepare: applied to each float32 window batch before ``predict`` (normalisation).
        probabilities: return the full probability map (in ``prob_dtype``).
        labels: return the argmax class-index map (uint8 up to 256 classes), computed slab by
            slab, so that with ``probabilities=False`` no full-size ``K``-channel array exists.
        weights: the Gaussian, see :func:`gaussian_weights`.
        pad: where an image smaller than the patch gets its zeros: ``end`` (after the image)
            or ``center`` (split before and after, as nnU-Net pads; the network then sees the
            image in the middle of its window).

    Images smaller than the patch are padded (after ``prepare``) and the output cropped.
    ``predict`` may return logits instead of probabilities: the sums are then weighted means
    of logits (the argmax is the same either way).
    """
    if not (0.0 <= overlap < 1.0):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    patch = tuple(int(p) for p in patch)
    size = tuple(int(s) for s in image.shape[1:])
    if len(patch) != len(size):
        raise ValueError(f"patch {patch} does not match the image's {len(size)} spatial axes")
    if pad not in PADS:
        raise ValueError(f"unknown pad '{pad}' ({', '.join(PADS)})")
    ext = tuple(min(p, s) for p, s in zip(patch, size, strict=True))  # window extent in the image
    padding = [p - e for p, e in zip(patch, ext, strict=True)]
    before = [q // 2 if pad == "center" else 0 for q in padding]
    crop = (slice(None), slice(None), *(slice(b, b + e) for b, e in zip(before, ext, strict=True)))
    weight = gaussian_weights(patch, sigma_scale, weights)[crop[2:]]
    # roll along the axis where a window covers the smallest share of the image: the
    # buffers are one window thick along it
    r = min(range(len(size)), key=lambda a: (ext[a] / size[a], a))
    order = [r] + [a for a in range(len(size)) if a != r]
    per_axis = [window_starts(s, p, overlap) for s, p in zip(size, patch, strict=True)]
    starts = []
    for st in itertools.product(*[per_axis[a] for a in order]):
        back = [0] * len(size)
        for a, v in zip(order, st, strict=True):
            back[a] = v
        starts.append(tuple(back))

    buf = list(size)
    buf[r] = ext[r]
    acc = torch.zeros((num_classes, *buf), dtype=torch.float32)
    norm = torch.zeros(buf, dtype=torch.float32)
    out_probs = torch.empty((num_classes, *size), dtype=prob_dtype) if probabilities else None
    label_dtype = torch.uint8 if num_classes <= 256 else torch.int16
    out_labels = torch.empty(size, dtype=label_dtype) if labels else None
    base = 0  # index along axis r of acc's first slice
    step = max(1, FLUSH_VOXELS // max(1, math.prod(size) // size[r]))  # bounds the temporaries

    def flush(upto: int) -> None:
        """Finalise the slab [base, upto) along axis r and slide the buffers to start at ``upto``."""
        nonlocal base
        n = upto - base
        if n <= 0:
            return
        for a in range(0, n, step):
            m = min(step, n - a)
            part = acc.narrow(1 + r, a, m)
            if out_probs is not None:
                out_probs.narrow(1 + r, base + a, m).copy_(part / norm.narrow(r, a, m))
            if out_labels is not None:  # the weights are positive: argmax needs no division
                out_labels.narrow(r, base + a, m).copy_(part.argmax(0))
        keep = ext[r] - n
        if keep > 0:  # overlapping source and target (overlap > 50%) need a copy in between
            src_acc, src_norm = acc.narrow(1 + r, n, keep), norm.narrow(r, n, keep)
            if keep > n:
                src_acc, src_norm = src_acc.clone(), src_norm.clone()
            acc.narrow(1 + r, 0, keep).copy_(src_acc)
            norm.narrow(r, 0, keep).copy_(src_norm)
        keep = max(keep, 0)
        acc.narrow(1 + r, keep, ext[r] - keep).zero_()
        norm.narrow(r, keep, ext[r] - keep).zero_()
        base = upto

    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        slices = [tuple(slice(s, s + e) for s, e in zip(st, ext, strict=True)) for st in chunk]
        batch = _window_batch(image, slices, patch)
        if prepare is not None:
            batch = prepare(batch)
        if any(padding):  # F.pad lists the last axis first
            batch = F.pad(batch, [q for b, ax in zip(reversed(before), reversed(padding), strict=True)
                                  for q in (b, ax - b)])
        probs = predict(batch)
        if any(padding):
            probs = probs[crop]
        probs = probs.to("cpu", torch.float32)
        for j, st in enumerate(chunk):
            if st[r] > base:
                flush(st[r])
            sl = list(slices[j])
            sl[r] = slice(0, ext[r])
            acc[(slice(None), *sl)] += probs[j] * weight
            norm[tuple(sl)] += weight
    flush(size[r])
    return out_probs, out_labels


def probabilities_to_labels(probs: torch.Tensor | np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Argmax over classes, mapped back to the raw label values of the dataset."""
    idx = probs.argmax(0)
    idx = idx.numpy() if isinstance(idx, torch.Tensor) else idx
    return indices_to_labels(idx, label_values)


def indices_to_labels(idx: np.ndarray | torch.Tensor, label_values: Sequence[int]) -> np.ndarray:
    """Class indices -> the raw label values of the dataset (uint8 where they fit)."""
    idx = idx.numpy() if isinstance(idx, torch.Tensor) else idx
    values = np.asarray(label_values)
    dtype = np.uint8 if values.max() <= 255 else np.uint16
    return values.astype(dtype)[idx]
