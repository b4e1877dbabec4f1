"""How large the labelled structures are, and the working resolution that follows from it.

A U-Net sees an object only through its patch and its receptive field. When a typical object
(a breast lesion, a polyp, an organ) is as large as the patch at the image's native
resolution, patches rarely show its border and its surroundings together and the network
learns texture instead of shape. Thin structures (vessels, membranes) need the opposite:
every pixel across them. So the fingerprint measures, per class, two scales in physical
units (connected components of the training labels, scipy only):

- **thickness**: ``2 * volume / surface`` pooled over the class (a strip of width ``w`` gives
  ``w``; a disc of diameter ``D`` about ``0.4 D`` with voxel-face surfaces). It is what
  coarsening must not destroy.
- **context scale** of each component: ``min(extent, CONTEXT_THICKNESSES * thickness)``, its
  bounding-box extent unless it is elongated or branching (a vessel tree spans the image, but
  what a window must show of it is a few vessel widths). The class's value is the
  voxel-weighted 90th percentile over components: the size below which 90 % of its
  foreground lies.

:func:`working_factor` then coarsens the target spacing by a factor ``f >= 1`` so that the
context scale spans at most :data:`CONTEXT_SHARE` of the patch edge, but no further than where
the median case fits the patch whole; and further, where the context scale exceeds the
network encoder's receptive field, until it fits in it (a network that cannot see an object
with its border learns texture; coarser images also give more passes over the data in a time
budget: on BUSI, 3x instead of 2.05x raised the test Dice, BENCHMARKS.md). Never so far that
the thinnest class falls below :data:`MIN_THICKNESS_VOXELS` across. When the
context wants more than the thin structures allow, the conflict is reported so the plan can say
so (a low-resolution stage would be needed to serve both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

CONTEXT_THICKNESSES = 4.0  # an elongated structure needs about this many widths of context
CONTEXT_PERCENTILE = 90.0  # voxel-weighted percentile of component scales taken as "typical large"
CONTEXT_SHARE = 0.5  # the typical large object spans at most this share of the patch edge
MIN_THICKNESS_VOXELS = 4.0  # the thinnest class keeps at least this many voxels across
MAX_COMPONENTS = 2000  # per case and class: beyond this, the largest ones (noise is small)


def label_scales(label: np.ndarray, spacing: Sequence[float], num_classes: int) -> list[dict]:
    """Per foreground class of one label map: its components' scales (physical units).

    Returns ``num_classes - 1`` dicts with ``volume`` and ``surface`` (sums over the class) and
    ``components``: a list of ``[voxels, extent, context]`` per connected component (full
    connectivity, so a diagonal vessel stays one component).
    """
    sp = np.asarray(spacing, dtype=float)
    voxel = float(np.prod(sp))
    out = []
    for c in range(1, num_classes):
        mask = label == c
        n = int(mask.sum())
        if n == 0:
            out.append({"volume": 0.0, "surface": 0.0, "components": []})
            continue
        surface = _surface(mask, sp)
        volume = n * voxel
        thickness = 2.0 * volume / max(surface, 1e-12)
        comp, count = ndi.label(mask, structure=np.ones((3,) * mask.ndim, bool))
        sizes = np.bincount(comp.ravel(), minlength=count + 1)[1:]
        order = np.argsort(sizes)[::-1][:MAX_COMPONENTS]
        boxes = ndi.find_objects(comp)
        comps = []
        for i in order:
            box = boxes[i]
            extent = max((s.stop - s.start) * d for s, d in zip(box, sp, strict=True))
            # a component's own thickness: a blob's is about its size, a vessel's its width
            own = 2.0 * sizes[i] * voxel / max(_surface(comp[box] == i + 1, sp), 1e-12)
            comps.append([int(sizes[i]), float(extent), float(min(extent, CONTEXT_THICKNESSES * own))])
        out.append({"volume": volume, "surface": surface, "thickness": thickness, "components": comps})
    return out


def _surface(mask: np.ndarray, spacing: np.ndarray) -> float:
    """Area of the voxel faces between ``mask`` and the rest (the array border counts)."""
    voxel = float(np.prod(spacing))
    total = 0.0
    for axis in range(mask.ndim):
        padded = np.pad(mask, [(1, 1) if a == axis else (0, 0) for a in range(mask.ndim)])
        total += int(np.count_nonzero(np.diff(padded.view(np.uint8), axis=axis))) * voxel / spacing[axis]
    return total


def summarize_scales(per_case: list[list[dict]]) -> list[dict]:
    """Pool :func:`label_scales` over cases: per class thickness, context scale, extents."""
    if not per_case:
        return []
    summary = []
    for c in range(len(per_case[0])):
        volume = sum(case[c]["volume"] for case in per_case)
        surface = sum(case[c]["surface"] for case in per_case)
        comps = np.array([comp for case in per_case for comp in case[c]["components"]], dtype=float)
        if volume == 0 or comps.size == 0:
            summary.append({"thickness": None, "context": None, "extent_median": None, "components": 0})
            continue
        summary.append({
            "thickness": float(2.0 * volume / max(surface, 1e-12)),
            "context": _weighted_percentile(comps[:, 2], comps[:, 0], CONTEXT_PERCENTILE),
            "extent_median": float(np.median(comps[:, 1])),
            "extent_p90": float(np.percentile(comps[:, 1], 90)),
            "components": int(len(comps)),
        })
    return summary


def _weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    i = int(np.searchsorted(cum, q / 100.0 * cum[-1]))
    return float(values[order][min(i, len(values) - 1)])


@dataclass
class WorkingResolution:
    """The factor the target spacing is multiplied by on ``axes``, and why."""

    factor: float
    axes: list[int]
    context_factor: float
    fit_factor: float
    thin_factor: float
    conflict: bool
    reason: str
    lowres_factor: float = 1.0  # the factor without the thin structures' limit (a cascade's stage 1)
    field_factor: float = 1.0  # what fitting the context in the receptive field asks for


def working_factor(scales: list[dict], spacing: Sequence[float], median_shape: Sequence[int],
                   patch_voxels: int, axes: Sequence[int], label_names: Sequence[str],
                   receptive_field: float | None = None) -> WorkingResolution:
    """Coarsening factor for the target ``spacing`` from the class scales (see the module doc).

    ``median_shape`` is the median case at ``spacing``; ``patch_voxels`` the patch budget;
    ``axes`` the axes that may be coarsened (all but the thick one of anisotropic data);
    ``receptive_field`` the encoder's, in voxels (None: not considered).
    """
    sp = np.asarray(spacing, dtype=float)
    shape = np.asarray(median_shape, dtype=float)
    axes = list(axes)
    known = [(n, s) for n, s in zip(label_names, scales, strict=False) if s.get("context")]
    if not known or not axes:
        return WorkingResolution(1.0, axes, 1.0, 1.0, math.inf, False,
                                 "no foreground scale measured: the target spacing is kept", 1.0)
    # the patch edge (physical) at the target spacing: the budget spread over the axes as the
    # median case's proportions, never more than the case itself
    fixed = [a for a in range(len(sp)) if a not in axes]
    fixed_voxels = float(np.prod(shape[fixed])) if fixed else 1.0
    free_voxels = float(np.prod(shape[axes]))
    budget_free = max(1.0, patch_voxels / fixed_voxels)
    fit = max(1.0, (free_voxels / budget_free) ** (1.0 / len(axes)))
    # without coarsening, the patch holds this share of each free axis (same share on each)
    patch_edge = min(shape[a] * sp[a] / fit for a in axes)
    context = max(s["context"] for _, s in known)
    context_name = next(n for n, s in known if s["context"] == context)
    want = max(1.0, context / (CONTEXT_SHARE * patch_edge))
    thin_name, thin = min(((n, s["thickness"]) for n, s in known), key=lambda t: t[1])
    finest = min(sp[a] for a in axes)
    thin_factor = thin / (MIN_THICKNESS_VOXELS * finest)
    field = max(1.0, context / (receptive_field * finest)) if receptive_field else 1.0
    factor = _rounded(want, fit, thin_factor, field)
    lowres = _rounded(want, fit, math.inf, field)  # what the large objects alone would ask for
    conflict = max(min(want, fit), field) > max(1.0, thin_factor) * 1.05
    if factor <= 1.0:
        if want <= 1.0:
            why = (f"'{context_name}' objects (context scale {context:.3g}) already fit the patch "
                   f"(edge {patch_edge:.3g}) with room around them: the target spacing is kept")
        elif fit <= 1.0:
            why = "the median case fits the patch whole: the target spacing is kept"
        else:
            why = (f"'{thin_name}' is thin ({thin:.3g} across, {MIN_THICKNESS_VOXELS:g} voxels needed): "
                   "the target spacing is kept")
        factor = 1.0
    else:
        if thin_factor <= max(min(want, fit), field):
            limit = f"'{thin_name}' keeps {MIN_THICKNESS_VOXELS:g} voxels across (thickness {thin:.3g})"
        elif field > min(want, fit):
            limit = (f"'{context_name}' objects (context scale {context:.3g}) fit the encoder's receptive "
                     f"field ({receptive_field:g} voxels)")
        elif want <= fit:
            limit = (f"'{context_name}' objects (context scale {context:.3g}) span at most "
                     f"{100 * CONTEXT_SHARE:.0f} % of the patch edge")
        else:
            limit = "the median case then fits the patch whole"
        why = (f"coarsened {factor:g}x on axes {axes} so that {limit} (context wants {want:.2f}x, "
               f"fitting the case {fit:.2f}x, the receptive field {field:.2f}x, thin structures allow "
               f"{thin_factor:.2f}x)")
    if conflict:
        why += ("; one resolution cannot serve both: large objects want a coarser grid than the "
                f"thin '{thin_name}' allows (a cascade: stage 1 at {lowres:g}x, stage 2 at {factor:g}x)")
    return WorkingResolution(float(factor), axes, float(want), float(fit), float(thin_factor),
                             bool(conflict), why, float(lowres), float(field))


def _rounded(want: float, fit: float, thin: float, field: float = 1.0) -> float:
    """``max(1, min(thin, max(min(want, fit), field)))`` in steps of 0.05 (readable spacings,
    stable plans): up when fitting the case is the limit, so the case does fit; down otherwise,
    so no limit is passed."""
    wanted = max(min(want, fit), field)
    factor = max(1.0, min(thin, wanted))
    if fit <= min(want, thin) and field <= fit:
        return math.ceil(factor * 20 - 1e-9) / 20
    return math.floor(factor * 20 + 1e-9) / 20


IMAGE_SCALE_GAIN = 0.9  # image-relative sizes must spread at most this much of pixel sizes
IMAGE_SIZE_SPREAD = 1.25  # ... and the 90th/10th percentile image sizes differ at least this much
IMAGE_SCALE_MIN_CASES = 8


def case_scale(case: list[dict]) -> float | None:
    """The scale of one case's objects: the voxel-weighted 90th-percentile context over its
    classes' components (None for a case without foreground)."""
    comps = np.array([c for cls in case for c in cls["components"]], dtype=float)
    if comps.size == 0:
        return None
    return _weighted_percentile(comps[:, 2], comps[:, 0], CONTEXT_PERCENTILE)


def image_relative_scale(sizes: Sequence[float], scales: Sequence[float | None]) -> tuple[bool, str]:
    """Whether objects scale with their image (see the module doc), and why.

    ``sizes`` are the images' edge lengths (square root of the pixel count), ``scales`` their
    :func:`case_scale`. Dividing by the size makes the log-scales spread less exactly when the
    regression slope of log scale on log size is above 1/2; a margin (:data:`IMAGE_SCALE_GAIN`)
    keeps datasets where it hardly matters at their pixel size.
    """
    pairs = [(float(z), float(c)) for z, c in zip(sizes, scales, strict=True) if c and c > 0]
    if len(pairs) < IMAGE_SCALE_MIN_CASES:
        return False, "too few labelled cases to tell whether objects scale with their image"
    size, scale = np.log(np.array(pairs)).T
    spread = float(np.exp(np.percentile(size, 90) - np.percentile(size, 10)))
    if spread < IMAGE_SIZE_SPREAD:
        return False, (f"images are of similar size (90th/10th percentile {spread:.2f} < "
                       f"{IMAGE_SIZE_SPREAD:g})")
    absolute, relative = float(np.std(scale)), float(np.std(scale - size))
    chosen = relative <= IMAGE_SCALE_GAIN * absolute
    verdict = ("they follow the image, so every image is scaled to the median size" if chosen
               else "pixel sizes are kept")
    return chosen, (f"object sizes spread {absolute:.2f} (log) in pixels and {relative:.2f} relative to "
                    f"their image's size: {verdict}")


def rescale_case(case: list[dict], factor: float, dim: int) -> list[dict]:
    """:func:`label_scales` of a case whose pixel size is multiplied by ``factor``."""
    out = []
    for cls in case:
        comps = [[n, extent * factor, context * factor] for n, extent, context in cls["components"]]
        item = {**cls, "volume": cls["volume"] * factor**dim, "surface": cls["surface"] * factor ** (dim - 1),
                "components": comps}
        if "thickness" in cls:
            item["thickness"] = cls["thickness"] * factor
        out.append(item)
    return out

