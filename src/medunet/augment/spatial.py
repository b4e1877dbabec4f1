"""Spatial augmentations applied to image and label together, per sample of a batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medunet.augment.config import anisotropic_axis
from medunet.augment.filters import gaussian_blur, resize_linear


def flip_rot90(images: torch.Tensor, labels: torch.Tensor, p_flip: float = 0.5,
               p_rot90: float = 0.5, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random mirroring along every spatial axis and 90-degree rotations in square planes.

    ``images`` is ``(B, C, *S)``, ``labels`` ``(B, *S)``. Rotations use only axis pairs of
    equal size so the patch shape is kept (for 2D: the only plane; for 3D: any square plane).
    Both tensors are transformed with the same draw, so they stay aligned.
    """
    nsp = images.ndim - 2
    out_i, out_l = [], []
    planes = [(a, b) for a in range(nsp) for b in range(a + 1, nsp)
              if images.shape[2 + a] == images.shape[2 + b]]
    for i in range(images.shape[0]):
        img, lab = images[i], labels[i]
        draws = torch.rand(nsp + 2, generator=generator)
        flip_axes = [a for a in range(nsp) if draws[a] < p_flip]
        if flip_axes:
            img = torch.flip(img, [1 + a for a in flip_axes])
            lab = torch.flip(lab, flip_axes)
        if planes and draws[nsp] < p_rot90:
            a, b = planes[int(draws[nsp + 1] * len(planes)) % len(planes)]
            k = int(torch.randint(1, 4, (1,), generator=generator))
            img = torch.rot90(img, k, (1 + a, 1 + b))
            lab = torch.rot90(lab, k, (a, b))
        out_i.append(img)
        out_l.append(lab)
    return torch.stack(out_i), torch.stack(out_l)


# ----------------------------------------------------------------------------------------------
# Composed spatial augmentation: one matrix (mirroring, rot90, rotation, scaling) plus an optional
# elastic field per sample, turned into one set of sampling positions that image and label share.
# ----------------------------------------------------------------------------------------------

PADDING_MODE = "reflection"
"""Out-of-patch samples mirror the patch, for the image and the label alike.

Every output voxel is then a real (image, label) pair from the patch: zero padding would put
an invented, flat "background" into the label beside a black image border, and the network
would learn that borders are background. Reflection keeps texture and labels consistent.
"""


@dataclass
class SpatialDraw:
    """Per-sample spatial parameters of one batch (CPU tensors)."""

    flips: torch.Tensor  # (B, n) bool
    rot90: torch.Tensor  # (B,) bool
    rot90_plane: torch.Tensor  # (B,) long, index into square planes
    rot90_k: torch.Tensor  # (B,) long in 1..3
    rotate: torch.Tensor  # (B,) bool
    angles: torch.Tensor  # (B, 3) radians, one per rotation plane
    scale: torch.Tensor  # (B,) bool
    factor: torch.Tensor  # (B,) float64
    elastic: torch.Tensor  # (B,) bool

    @property
    def resample(self) -> torch.Tensor:
        return self.rotate | self.scale | self.elastic


def _planes(shape: Sequence[int]) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Active axes, rotation planes (within the active axes) and square planes (for rot90)."""
    n = len(shape)
    thin = anisotropic_axis(shape)
    active = [a for a in range(n) if a != thin]
    rot_planes = [(a, b) for i, a in enumerate(active) for b in active[i + 1:]]
    square = [(a, b) for a in range(n) for b in range(a + 1, n) if shape[a] == shape[b]]
    return active, rot_planes, square


def draw_spatial(batch: int, shape: Sequence[int], cfg: dict, generator: torch.Generator) -> SpatialDraw:
    """Draw every sample's spatial parameters: a fixed number of uniforms per sample."""
    n = len(shape)
    _, rot_planes, square = _planes(shape)
    u = torch.rand(batch, n + 10, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    degrees = cfg["rotation"]["degrees"]
    if degrees is None:  # in-plane rotations turn freely; across slices of a volume, a little
        degrees = 180.0 if len(rot_planes) == 1 else 30.0
    lo, hi = cfg["scaling"]["range"]
    return SpatialDraw(
        flips=u[:, :n] < cfg["flip"],
        rot90=(u[:, n] < cfg["rot90"]) & bool(square),
        rot90_plane=(u[:, n + 1] * max(1, len(square))).long().clamp(max=max(0, len(square) - 1)),
        rot90_k=1 + (u[:, n + 2] * 3).long().clamp(max=2),
        rotate=u[:, n + 3] < cfg["rotation"]["p"],
        angles=(2 * u[:, n + 4:n + 7] - 1) * math.radians(degrees),
        scale=u[:, n + 7] < cfg["scaling"]["p"],
        factor=lo + (hi - lo) * u[:, n + 8],
        elastic=u[:, n + 9] < cfg["elastic"]["p"],
    )


def _plane_rotation(n: int, a: int, b: int, cos: float, sin: float) -> torch.Tensor:
    m = torch.eye(n, dtype=torch.float64)
    m[a, a], m[a, b], m[b, a], m[b, b] = cos, -sin, sin, cos
    return m


def sample_matrix(d: SpatialDraw, i: int, shape: Sequence[int]) -> torch.Tensor:
    """Voxel-space matrix (axis order of the tensor, centred) mapping output to input positions.

    Mirroring and rot90 are folded in, so a sample that is resampled anyway is interpolated once.
    """
    n = len(shape)
    active, rot_planes, square = _planes(shape)
    m = torch.diag(torch.where(d.flips[i], -1.0, 1.0).to(torch.float64))
    if d.rot90[i]:
        a, b = square[int(d.rot90_plane[i])]
        k = int(d.rot90_k[i])
        m = m @ _plane_rotation(n, a, b, round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2)))
    if d.rotate[i]:
        for j, (a, b) in enumerate(rot_planes):
            t = float(d.angles[i, j])
            m = m @ _plane_rotation(n, a, b, math.cos(t), math.sin(t))
    if d.scale[i]:
        inv = torch.ones(n, dtype=torch.float64)
        inv[active] = 1.0 / float(d.factor[i])  # > 1 enlarges: the output samples a smaller region
        m = m @ torch.diag(inv)
    return m


CHUNK_VOXELS = 1 << 16
"""Output voxels resampled at a time: the temporaries (positions, grid) then stay in the CPU's
cache, and no allocation is large enough to be handed back to the OS and faulted in again
(measured several times faster than whole-volume ops on a busy 2-core machine)."""


def positions(matrix: torch.Tensor, shape: Sequence[int], rows: slice, device: torch.device,
              displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Input positions ``(n, rows, *shape[1:])`` (voxel units) read by a slab of output voxels.

    ``matrix`` acts on offsets from the patch centre (rotations and scalings about the
    centre); the sums run from the smallest broadcast to the largest, so only the last add is
    full-size. ``displacement`` ``(n, *shape)`` (elastic) is added in voxels.
    """
    n = len(shape)
    m = matrix.tolist()
    centre = [(s - 1) / 2 for s in shape]
    axes = []
    for i, s in enumerate(shape):
        r = range(s)[rows] if i == 0 else range(s)
        offset = torch.arange(r.start, r.stop, dtype=torch.float32, device=device) - centre[i]
        axes.append(offset.view([-1 if a == i else 1 for a in range(n)]))
    out = torch.empty(n, len(axes[0]), *shape[1:], device=device)
    for j in range(n):
        acc = axes[0] * m[j][0] + centre[j]
        for i in range(1, n):
            acc = acc + axes[i] * m[j][i]
        out[j] = acc
    if displacement is not None:
        out += displacement[:, rows]
    return out


def reflect(pos: torch.Tensor, shape: Sequence[int], reach: Sequence[float] | None = None) -> torch.Tensor:
    """Fold positions into the patch by mirroring at its faces (-0.5 and N - 0.5), in place.

    The rule of ``grid_sample(padding_mode="reflection", align_corners=False)``. ``reach``
    (per axis, the largest distance of a position from the patch centre) picks the cheapest
    exact way: nothing when all are inside, two folds (abs) when none is more than one patch
    width outside, the general ``remainder`` (several times slower) otherwise.
    """
    for j, s in enumerate(shape):
        c = pos[j]
        if s == 1:
            c.zero_()
            continue
        r = math.inf if reach is None else reach[j]
        if r <= (s - 1) / 2:
            continue
        c.add_(0.5)
        if r + s / 2 <= 2 * s:  # |c| <= 2s: fold at 0, then at s
            c.abs_().sub_(s).abs_().neg_().add_(s - 0.5)
        else:
            c.remainder_(2 * s)
            torch.minimum(c, 2 * s - c, out=c)
            c.sub_(0.5)
        c.clamp_(0, s - 1)
    return pos


def gather_nearest(x: torch.Tensor, pos: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x`` (``(*S)`` or ``(C, *S)``, any dtype) read at the voxel nearest to in-range ``pos``.

    A gather of the rounded positions: exact, keeps the dtype (labels stay integers).
    """
    r = pos.round()
    flat = r[0]
    for j in range(1, len(shape)):
        flat = flat * shape[j] + r[j]  # exact in float32 below 2^24 voxels (checked by the caller)
    index = flat.long().view(-1)
    out_shape = pos.shape[1:]
    if x.ndim == len(shape):
        return x.reshape(-1).index_select(0, index).view(out_shape)
    return x.reshape(x.shape[0], -1).index_select(1, index).view(x.shape[0], *out_shape)


def tile_slices(x: torch.Tensor) -> torch.Tensor:
    """``(C, S0, S1, S2)`` -> ``(1, C, S0 * (S1 + 2), S2)``: slices stacked as one 2D image.

    Each slice gets a copy of its first and last rows around it, so a bilinear read at a
    slice's edge (with float rounding) never mixes in the neighbouring slice.
    """
    c, s0, s1, s2 = x.shape
    return F.pad(x.reshape(1, c * s0, s1, s2), (0, 0, 1, 1), mode="replicate").view(1, c, s0 * (s1 + 2), s2)


def sample_linear(x: torch.Tensor, pos: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x`` read bi/trilinearly at in-range ``pos``; ``x`` is ``(1, C, *S)``, or tiled for 3D.

    2D: ``grid_sample``. 3D: torch's 3D ``grid_sample`` on CPUs is a scalar loop about 10x
    slower than its vectorised 2D kernel, so the volume is read as the 2D image of its stacked
    slices (:func:`tile_slices`) at the two slices around each position and blended along the
    first axis: the same trilinear interpolation.
    """
    c = x.shape[1]
    rest = pos.shape[1:]
    if len(shape) == 2:
        grid = torch.empty(1, *rest, 2, device=pos.device)
        torch.mul(pos[1], 2 / max(shape[1] - 1, 1), out=grid[0, ..., 0]).sub_(1)
        torch.mul(pos[0], 2 / max(shape[0] - 1, 1), out=grid[0, ..., 1]).sub_(1)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                             align_corners=True)[0]
    s0, s1, s2 = shape
    rows = x.shape[2]
    z0 = pos[0].floor()
    w = pos[0] - z0
    z1 = (z0 + 1).clamp_(max=s0 - 1)
    grid = torch.empty(2, *rest, 2, device=pos.device)
    torch.mul(pos[2], 2 / max(s2 - 1, 1), out=grid[0, ..., 0]).sub_(1)
    grid[1, ..., 0] = grid[0, ..., 0]
    ys = pos[1] + (1 - (rows - 1) / 2)  # row inside the tiled image, centred
    for g, z in zip(grid, (z0, z1), strict=True):  # row z * (S1 + 2) + 1 + y, normalised
        torch.add(ys, z, alpha=s1 + 2, out=g[..., 1]).mul_(2 / (rows - 1))
    out = F.grid_sample(x, grid.view(1, 2 * rest[0] * rest[1], rest[2], 2).to(x.dtype), mode="bilinear",
                        padding_mode="border", align_corners=True).view(c, 2, *rest)
    return torch.lerp(out[:, 0], out[:, 1], w.to(x.dtype))


def resample_sample(image: torch.Tensor, label: torch.Tensor, matrix: torch.Tensor,
                    displacement: torch.Tensor | None = None, image_mode: str = "linear"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample, image ``(C, *S)`` and label ``(*S)``, read at the same positions.

    The image bi/trilinearly (or nearest), the label at the nearest voxel; outside the patch
    both mirror it (:data:`PADDING_MODE`). Worked through in slabs of :data:`CHUNK_VOXELS`.
    """
    shape = list(label.shape)
    if math.prod(shape) >= 1 << 24:
        raise ValueError(f"patch {shape} too large to augment (at most 2^24 voxels)")
    out_i, out_l = torch.empty_like(image), torch.empty_like(label)
    source = tile_slices(image) if len(shape) == 3 and image_mode == "linear" else image[None]
    step = max(1, CHUNK_VOXELS // math.prod(shape[1:]))
    reach = (matrix.abs() @ torch.tensor([(s - 1) / 2 for s in shape], dtype=matrix.dtype)).tolist()
    if displacement is not None:
        reach = [r + float(d.abs().max()) for r, d in zip(reach, displacement, strict=True)]
    for r0 in range(0, shape[0], step):
        rows = slice(r0, min(r0 + step, shape[0]))
        pos = reflect(positions(matrix, shape, rows, image.device, displacement), shape, reach)
        if image_mode == "linear":
            out_i[:, rows] = sample_linear(source, pos, shape)
        else:
            out_i[:, rows] = gather_nearest(image, pos, shape)
        out_l[rows] = gather_nearest(label, pos, shape)
    return out_i, out_l


def elastic_field(count: int, shape: Sequence[int], active: Sequence[int], alpha: float, sigma: float,
                  generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Smooth random displacements ``(count, n, *shape)`` in voxels (zero on inactive axes).

    Simard et al.'s field (uniform noise in [-1, 1], Gaussian-smoothed with ``sigma``, times
    ``alpha``), made on a grid ``f`` times coarser (sigma / f >= 2 coarse voxels, so the field
    is still smooth there) and linearly up-sampled. The amplitude is divided by f^(d/2), as
    the coarse noise is averaged over f^d times fewer samples: this keeps the variance of the
    full-resolution field, so alpha and sigma keep their classic meaning at a fraction of the
    cost.
    """
    n = len(shape)
    f = max(1, int(sigma // 2))
    coarse = [max(1, math.ceil(shape[a] / f)) if a in active else 1 for a in range(n)]
    noise = torch.rand(count, len(active), *coarse, generator=generator, device=generator.device)
    noise = (2 * noise - 1).to(device)
    blurred = [2 + a for a in range(n) if coarse[a] > 1]
    noise = gaussian_blur(noise, sigma / f, blurred)
    noise = noise * (alpha / f ** (len(blurred) / 2))
    noise = resize_linear(noise, shape)
    field = torch.zeros(count, n, *shape, device=device)
    field[:, list(active)] = noise
    return field


def _exact(img: torch.Tensor, lab: torch.Tensor, d: SpatialDraw, i: int, shape: Sequence[int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirroring and rot90 without interpolation (index permutations: exact and cheap)."""
    axes = [a for a in range(len(shape)) if d.flips[i, a]]
    if axes:
        img, lab = torch.flip(img, [1 + a for a in axes]), torch.flip(lab, axes)
    if d.rot90[i]:
        a, b = _planes(shape)[2][int(d.rot90_plane[i])]
        k = int(d.rot90_k[i])
        img, lab = torch.rot90(img, k, (1 + a, 1 + b)), torch.rot90(lab, k, (a, b))
    return img, lab


def spatial_augment(images: torch.Tensor, labels: torch.Tensor, cfg: dict, generator: torch.Generator,
                    field_generator: torch.Generator | None = None, image_mode: str = "linear"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirroring, rot90, rotation, scaling and elastic deformation of a batch, image and label together.

    ``cfg`` is a validated config (:func:`validate_augmentation`). Samples with a rotation,
    scaling or elastic draw are resampled once (image ``image_mode`` ``linear`` or ``nearest``,
    label nearest, same grid, :data:`PADDING_MODE`); the others are only mirrored / turned.
    When nothing was drawn the inputs are returned as they are.
    """
    shape = list(images.shape[2:])
    d = draw_spatial(images.shape[0], shape, cfg, generator)
    resample = d.resample
    touched = resample | d.flips.any(1) | d.rot90
    if not touched.any():
        return images, labels
    out_i, out_l = list(images.unbind(0)), list(labels.unbind(0))
    for i in torch.nonzero(touched & ~resample).flatten().tolist():
        out_i[i], out_l[i] = _exact(out_i[i], out_l[i], d, i, shape)
    active = _planes(shape)[0]
    for i in torch.nonzero(resample).flatten().tolist():
        disp = None
        if d.elastic[i]:
            disp = elastic_field(1, shape, active, cfg["elastic"]["alpha"], cfg["elastic"]["sigma"],
                                 field_generator or generator, images.device)[0]
        matrix = sample_matrix(d, i, shape)
        out_i[i], out_l[i] = resample_sample(images[i], labels[i], matrix, disp, image_mode)
    return torch.stack(out_i), torch.stack(out_l)
