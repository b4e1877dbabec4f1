"""Separable Gaussian smoothing on torch tensors (any number of spatial axes).

Hand-written because torch has no n-D Gaussian filter and torchvision (2D only) cannot be
used here; separable 1-D convolutions keep it cheap: O(kernel) per voxel and axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float, truncate: float = 3.0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius ``ceil(truncate * sigma)``."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def smooth_axis(x: torch.Tensor, axis: int, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve ``x`` along ``axis`` with a symmetric 1-D kernel; borders mirrored.

    Written as shifted multiply-adds: for the short kernels used here this is several times
    faster on CPUs than ``conv1d`` with one channel (measured 2-5x on 256² and 96²x48).
    """
    n = x.shape[axis]
    r = kernel.numel() // 2
    if r < n:
        lo, hi = x.narrow(axis, 1, r).flip(axis), x.narrow(axis, n - 1 - r, r).flip(axis)
    else:  # too short to mirror: repeat the edge values
        lo = x.narrow(axis, 0, 1).expand(*x.shape[:axis], r, *x.shape[axis + 1:])
        hi = x.narrow(axis, n - 1, 1).expand(*x.shape[:axis], r, *x.shape[axis + 1:])
    padded = torch.cat([lo, x, hi], axis)
    weights = kernel.tolist()
    out = padded.narrow(axis, 0, n) * weights[0]
    for j in range(1, 2 * r + 1):
        out.add_(padded.narrow(axis, j, n), alpha=weights[j])
    return out


def gaussian_blur(x: torch.Tensor, sigma: float, axes: Sequence[int], truncate: float = 3.0) -> torch.Tensor:
    """Gaussian blur of ``x`` over the given axes (all with the same ``sigma``, in voxels)."""
    if sigma <= 0:
        return x
    kernel = gaussian_kernel(sigma, truncate, x.dtype, x.device)
    for a in axes:
        if x.shape[a] > 1:
            x = smooth_axis(x, a, kernel)
    return x


def resize_linear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bi/trilinear resize of ``x`` ``(N, C, *S)`` to ``size`` (``align_corners=False``).

    3D is done as two bilinear passes (axes 1-2, then axis 0): the same separable result as
    ``trilinear``, but torch's vectorised 2D kernel is several times faster on CPUs.
    """
    size = [int(s) for s in size]
    if list(x.shape[2:]) == size:
        return x
    if x.ndim == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    n, c, s0, s1, s2 = x.shape
    y = F.interpolate(x.reshape(n, c * s0, s1, s2), size=size[1:], mode="bilinear", align_corners=False)
    y = y.view(n, c, s0, size[1] * size[2])
    y = F.interpolate(y, size=[size[0], size[1] * size[2]], mode="bilinear", align_corners=False)
    return y.view(n, c, *size)
