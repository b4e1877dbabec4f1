"""Resampling of images, label maps and probabilities to another voxel spacing.

Grid convention: a voxel is a cell, and resampling keeps the physical extent of the array,
so output voxel ``j`` of an axis resized from ``n`` to ``m`` voxels samples the input at
``(j + 0.5) * n / m - 0.5`` (the convention of ``scipy.ndimage.zoom(grid_mode=True)`` and of
``torch.nn.functional.interpolate(align_corners=False)``). Coordinates past the first or
last voxel centre take the edge value. Reverting therefore lands on the original grid: the
first voxel's centre keeps its world position up to the half-voxel shift that every
cell-based resampler has, and the exact original shape can be asked for with ``shape``.

Anisotropic data (``separate_z`` = the index of the thick axis) is interpolated in-plane
with the requested order and along the thick axis with ``order_z`` (0 by default), as
nnU-Net does: interpolating across 3-5 mm slices blurs structures that change between
slices.

Speed: ``scipy.ndimage.zoom`` evaluates a 3D cubic spline with 4^3 = 64 taps per output
voxel (28 s for one 256x256x100 -> 512x512x200 channel on a 2-core CPU). A tensor-product
spline is separable, so it is evaluated here axis by axis after scipy's own 1D prefilter
(``spline_filter1d``): 4 taps per axis, equal to ``zoom`` to float32 rounding (tested) and
several times faster (hand-written for that reason: no maintained library does separable
spline resampling of numpy arrays). Linear interpolation goes through
``torch.nn.functional.interpolate`` (multi-threaded, identical numbers to ``zoom(order=1)``),
nearest neighbour through index arrays (exact, keeps the dtype). Channels and classes are
resampled one at a time to bound memory.

Size: every entry point checks the output grid against the readers' voxel limit
(:func:`medunet.io.image.max_voxels`) before allocating anything, so a wrong spacing in a
header (an 8^3 image at 250 mm resampled to 1 mm is a 2000^3 grid, 32 GB as float32) is
refused with a one-line :class:`~medunet.errors.InputError` instead of exhausting memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from medunet.errors import InputError
from medunet.io.image import max_voxels

__all__ = ["check_output_size", "resample_array", "resample_image", "resample_label",
           "resample_probabilities", "target_shape"]

_SPLINE_PAD = 12  # edge padding before the IIR prefilter, as scipy pads for mode="nearest"


def target_shape(shape: Sequence[int], spacing_from: Sequence[float],
                 spacing_to: Sequence[float]) -> list[int]:
    """``round(shape * spacing_from / spacing_to)`` per axis (at least 1 voxel)."""
    if not len(shape) == len(spacing_from) == len(spacing_to):
        raise ValueError(f"shape {tuple(shape)} and spacings {tuple(spacing_from)}, "
                         f"{tuple(spacing_to)} differ in length")
    return [max(1, round(n * a / b)) for n, a, b in zip(shape, spacing_from, spacing_to, strict=True)]


def check_output_size(shape: Sequence[int], channels: int = 1, spacing_from: Sequence[float] | None = None,
                      spacing_to: Sequence[float] | None = None, path: str | Path | None = None) -> None:
    """Refuse an output grid of more than the voxel limit (channels x voxels), before anything
    is allocated: the readers bound what a file may hold, and this bounds what resampling it
    may make (a header spacing off by a factor of 250 would ask for 250^3 times the memory)."""
    n = int(channels) * math.prod(int(d) for d in shape)
    limit = max_voxels()
    if n <= limit:
        return
    grid = "x".join(str(int(d)) for d in shape)
    frm = ""
    if spacing_from is not None and spacing_to is not None:
        frm = (f" from spacing {tuple(round(float(v), 6) for v in spacing_from)} to "
               f"{tuple(round(float(v), 6) for v in spacing_to)}")
    per = f" x {int(channels)} channels" if int(channels) > 1 else ""
    raise InputError(f"resampling{frm} would make a grid of {grid}{per} ({n:,} values), more than the "
                     f"limit of {limit:,}", path,
                     "check the voxel spacing in the image's header (a wrong unit or a typo is the usual "
                     "cause), or raise the limit (medunet --max-voxels N) on a machine with the memory")


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source voxel of each output voxel (the input cell that holds its centre)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _cubic_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Cubic B-spline resampling along one axis (scipy's prefilter, 4-tap evaluation)."""
    n_in = x.shape[axis]
    pad = [(_SPLINE_PAD, _SPLINE_PAD) if a == axis else (0, 0) for a in range(x.ndim)]
    coef = ndi.spline_filter1d(np.pad(x, pad, mode="edge"), 3, axis=axis, mode="mirror",
                               output=np.float32)
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5 + _SPLINE_PAD
    base = np.floor(pos)
    shape = [1] * x.ndim
    shape[axis] = n_out
    t = (pos - base).astype(np.float32).reshape(shape)
    first = base.astype(np.int64) - 1
    weights = ((1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6,
               (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6)
    out = np.take(coef, first, axis=axis)
    out *= weights[0]
    for k in range(1, 4):
        term = np.take(coef, first + k, axis=axis)
        term *= weights[k]
        out += term
    return out


def _axis_order(shape: Sequence[int], out: Sequence[int]) -> list[int]:
    """Axes that shrink first, those that grow last: smaller intermediate arrays."""
    return sorted((a for a in range(len(shape)) if shape[a] != out[a]), key=lambda a: out[a] / shape[a])


def _resample_uniform(x: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """One interpolation order on every axis."""
    if order == 0:
        for a in _axis_order(x.shape, shape):
            x = np.take(x, _nearest_index(x.shape[a], shape[a]), axis=a)
        return x
    x = x.astype(np.float32, copy=False)
    if order == 1 and x.ndim in (1, 2, 3):
        mode = ("linear", "bilinear", "trilinear")[x.ndim - 1]
        t = F.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None, None], size=tuple(shape),
                          mode=mode, align_corners=False)
        return t[0, 0].numpy()
    if order == 3:
        for a in _axis_order(x.shape, shape):
            x = _cubic_axis(x, a, shape[a])
        return x
    zoom = [m / n for m, n in zip(shape, x.shape, strict=True)]
    return ndi.zoom(x, zoom, order=order, mode="nearest", grid_mode=True, output=np.float32)


def resample_array(x: np.ndarray, shape: Sequence[int], order: int = 3, separate_z: int | None = None,
                   order_z: int = 0, clip: bool = False) -> np.ndarray:
    """Resample one spatial array ``(*S)`` to ``shape``.

    Order 0 keeps the dtype (nearest neighbour); other orders return float32. With
    ``separate_z`` the in-plane axes use ``order`` and that axis ``order_z``. ``clip``: keep
    the values inside the input's range (each slice's range for the in-plane step of
    ``separate_z``), as scikit-image's ``resize`` (and so nnU-Net) does against spline overshoot.
    """
    shape = [int(s) for s in shape]
    if len(shape) != x.ndim:
        raise ValueError(f"target shape {shape} does not match an array of shape {x.shape}")
    if list(x.shape) == shape:
        return x if order == 0 else x.astype(np.float32, copy=False)
    check_output_size(shape)
    if separate_z is not None and order != order_z and x.ndim > 1:
        z = separate_z % x.ndim
        inplane = list(shape)
        inplane[z] = x.shape[z]
        if inplane != list(x.shape):
            other = tuple(a for a in range(x.ndim) if a != z)
            lo = x.min(axis=other, keepdims=True) if clip else None
            hi = x.max(axis=other, keepdims=True) if clip else None
            x = _resample_uniform(x, inplane, order)
            if clip and order > 1:
                np.clip(x, lo, hi, out=x)
        if order_z != 0:
            x = x.astype(np.float32, copy=False)
        return _resample_uniform(x, shape, order_z) if x.shape[z] != shape[z] else x
    out = _resample_uniform(x, shape, order)
    if clip and order > 1:
        out = np.clip(out, x.min(), x.max(), out=out if out is not x else None)
    return out


def _out_shape(spatial: Sequence[int], spacing_from, spacing_to, shape) -> list[int]:
    if shape is not None:
        return [int(s) for s in shape]
    if spacing_from is None or spacing_to is None:
        raise ValueError("give spacing_from and spacing_to, or the target shape")
    return target_shape(spatial, spacing_from, spacing_to)


def resample_image(image: np.ndarray, spacing_from: Sequence[float] | None,
                   spacing_to: Sequence[float] | None, order: int = 3, separate_z: int | None = None,
                   shape: Sequence[int] | None = None, order_z: int = 0,
                   keep_zero: bool = False, clip: bool = False) -> np.ndarray:
    """Resample a channel-first image ``(C, *S)``; returns float32 ``(C, *shape)``.

    ``shape`` (spatial) overrides the size computed from the spacings, so a revert lands on
    the exact original shape. Channels are resampled one at a time (bounded temporaries).
    ``keep_zero``: output voxels whose nearest source voxel is 0 are set to exactly 0. A cubic
    spline rings, so without it a zero background (skull-stripped MR) becomes tiny non-zero
    values everywhere, which breaks "voxels != 0" masks such as masked z-scoring.
    ``clip``: see :func:`resample_array`.
    """
    out_shape = _out_shape(image.shape[1:], spacing_from, spacing_to, shape)
    check_output_size(out_shape, image.shape[0], spacing_from, spacing_to)
    out = np.empty((image.shape[0], *out_shape), dtype=np.float32)
    for c in range(image.shape[0]):
        out[c] = resample_array(image[c].astype(np.float32, copy=False), out_shape, order,
                                separate_z, order_z, clip=clip)
        if keep_zero:
            out[c][resample_array(image[c] == 0, out_shape, order=0)] = 0.0
    return out


def resample_label(label: np.ndarray, spacing_from: Sequence[float] | None,
                   spacing_to: Sequence[float] | None, mode: str = "nearest",
                   num_classes: int | None = None, shape: Sequence[int] | None = None,
                   separate_z: int | None = None) -> np.ndarray:
    """Resample a class-index map ``(*S)``; returns uint8 (uint16 above 256 classes).

    ``nearest`` copies the class of the source voxel; ``linear`` interpolates each class's
    one-hot mask linearly (order 0 along ``separate_z``) and takes the argmax, which gives
    smoother boundaries and keeps thin structures when downsampling.
    """
    if mode not in ("nearest", "linear"):
        raise ValueError(f"unknown label mode '{mode}' (use nearest or linear)")
    out_shape = _out_shape(label.shape, spacing_from, spacing_to, shape)
    check_output_size(out_shape, 1, spacing_from, spacing_to)
    k = int(num_classes) if num_classes is not None else int(label.max(initial=0)) + 1
    dtype = np.uint8 if k <= 256 else np.uint16
    if mode == "nearest":
        return resample_array(label, out_shape, order=0).astype(dtype, copy=False)
    best = np.full(out_shape, -1.0, dtype=np.float32)
    arg = np.zeros(out_shape, dtype=dtype)
    for c in range(k):
        mask = label == c
        if not mask.any():
            continue
        score = resample_array(mask.astype(np.float32), out_shape, order=1, separate_z=separate_z)
        better = score > best
        arg[better] = c
        np.maximum(best, score, out=best)
    return arg


def resample_probabilities(probs: np.ndarray | torch.Tensor, shape: Sequence[int],
                           separate_z: int | None = None) -> np.ndarray:
    """Resample class probabilities ``(K, *S)`` linearly to ``(K, *shape)`` (float32).

    Linear interpolation of probabilities that sum to one keeps them summing to one.
    """
    probs = probs.numpy() if isinstance(probs, torch.Tensor) else probs
    check_output_size(shape)  # the grid: K x the input's own size is the caller's choice
    out = np.empty((probs.shape[0], *shape), dtype=np.float32)
    for c in range(probs.shape[0]):
        out[c] = resample_array(probs[c], shape, order=1, separate_z=separate_z)
    return out
