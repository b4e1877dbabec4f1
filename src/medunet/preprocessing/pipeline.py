"""One case through the plan's preprocessing, and predictions back to the case's own grid.

Order: crop to the non-zero box -> resample to ``plan.spacing`` -> normalise. Training
(the cache) and inference run the same steps, and :class:`PreprocessInfo` records what was
done so that a prediction made on the preprocessed grid can be reverted exactly onto the
input's shape (resampled back to ``shape_after_crop``, then un-cropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from medunet.preprocessing.crop import crop, is_full, nonzero_bbox, uncrop
from medunet.preprocessing.resample import (
    resample_array,
    resample_image,
    resample_label,
    resample_probabilities,
    target_shape,
)

__all__ = ["PreprocessInfo", "auto_separate_z", "case_spacing", "needs_resampling", "prepare_geometry",
           "preprocess_case", "preprocessing_options", "revert_labels", "revert_probabilities",
           "revert_to_indices", "target_spacing"]

SPACING_TOLERANCE = 0.01  # relative: spacings closer than 1 % are the same grid

_DEFAULTS = {"crop_nonzero": False, "resample": False, "image_order": 3, "label_mode": "nearest",
             "separate_z": None, "image_size": None, "normalize_first": False, "clip_resampled": False,
             "keep_spacing_axes": []}
# nnU-Net's anisotropy rule (separate_z "auto"): an axis coarser than 3x the finest is resampled apart
ANISOTROPY = 3.0


def preprocessing_options(plan) -> dict:
    """``plan.preprocessing`` with defaults for missing keys (plans older than the field)."""
    return {**_DEFAULTS, **(getattr(plan, "preprocessing", None) or {})}


def needs_resampling(spacing: Sequence[float] | None, target: Sequence[float] | None,
                     tolerance: float = SPACING_TOLERANCE) -> bool:
    """Whether some axis's spacing differs from the target by more than ``tolerance``."""
    if spacing is None or target is None or len(spacing) != len(target):
        return False
    return any(abs(float(s) - float(t)) > tolerance * float(t) for s, t in zip(spacing, target, strict=True))


def auto_separate_z(spacing: Sequence[float], target: Sequence[float]) -> int | None:
    """The thick axis for ``separate_z: "auto"`` (nnU-Net's per-case rule): the case's coarsest
    axis when the case is anisotropic, else the target's when that is; None when neither is,
    or when two axes share the coarsest spacing."""
    for sp in (spacing, target):
        sp = [float(v) for v in sp]
        if max(sp) / min(sp) > ANISOTROPY:
            thick = [a for a, v in enumerate(sp) if v == max(sp)]
            return thick[0] if len(thick) == 1 else None
    return None


def target_spacing(plan, spacing: Sequence[float] | None) -> list[float]:
    """The spacing a case is resampled to: the plan's, except on ``keep_spacing_axes``, where
    the case keeps its own (the slice axis of an imported nnU-Net ``2d`` configuration, which
    nnU-Net never resamples)."""
    target = [float(s) for s in plan.spacing]
    if spacing is not None:
        for a in preprocessing_options(plan)["keep_spacing_axes"] or []:
            target[int(a)] = float(spacing[int(a)])
    return target


def case_spacing(spacing: Sequence[float] | None, shape: Sequence[int], plan) -> list[float] | None:
    """The spacing a case is planned and resampled with: its own, or, when the plan scales
    every image to one size (``preprocessing.image_size``: images without a physical pixel
    size whose objects follow the image's size), the pixel size that brings it there."""
    size = preprocessing_options(plan)["image_size"]
    if not size:
        return None if spacing is None else [float(s) for s in spacing]
    edge = float(np.sqrt(np.prod([float(n) for n in shape])))
    return [float(size) / edge] * len(shape)


@dataclass
class PreprocessInfo:
    """What preprocessing did to one case (JSON-friendly, stored beside cached cases).

    ``target_spacing`` is the spacing of the preprocessed array: the plan's when the case
    was resampled, the case's own when it was already within 1 % of it. ``separate_z`` is the
    axis resampled with order 0 (None: none), needed to revert the same way.
    """

    original_shape: list[int]
    original_spacing: list[float]
    bbox: list[list[int]]
    target_spacing: list[float]
    shape_after_crop: list[int]
    shape_after_resample: list[int]
    separate_z: int | None = None

    @property
    def cropped(self) -> bool:
        return not is_full(self.bbox, self.original_shape)

    @property
    def resampled(self) -> bool:
        return list(self.shape_after_resample) != list(self.shape_after_crop)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def prepare_geometry(image: np.ndarray, spacing: Sequence[float] | None, plan, normalise: bool = False,
                     ) -> tuple[np.ndarray, PreprocessInfo]:
    """Crop and resample a raw ``(C, *S)`` image as the plan says.

    Returns the image (a view of the input when only cropped, float32 when resampled, the
    input itself when nothing applies) and the record to revert predictions with.
    ``normalise``: normalise it too (float32), before resampling when the plan says
    ``normalize_first`` (nnU-Net's order, kept by imported nnU-Net models: statistics and CT
    clipping then see the original voxels), else after.
    """
    opts = preprocessing_options(plan)
    spatial = [int(n) for n in image.shape[1:]]
    spacing = case_spacing(spacing, spatial, plan)
    spacing_l = [float(s) for s in spacing] if spacing is not None else [float(s) for s in plan.spacing]
    bbox = nonzero_bbox(image) if opts["crop_nonzero"] else [[0, n] for n in spatial]
    cropped = crop(image, bbox) if not is_full(bbox, spatial) else image
    after_crop = [int(n) for n in cropped.shape[1:]]
    target = target_spacing(plan, spacing_l)
    separate_z = opts["separate_z"]
    if separate_z == "auto":
        separate_z = auto_separate_z(spacing_l, target)
    separate_z = None if separate_z is None else int(separate_z)
    resample = bool(opts["resample"]) and needs_resampling(spacing_l, target)
    first = normalise and resample and bool(opts["normalize_first"])
    if first:
        from medunet.preprocessing.normalize import normalize

        cropped = normalize(cropped, plan.normalization)
    if resample:
        shape = target_shape(after_crop, spacing_l, target)
        # masked normalisation counts voxels != 0: keep the zero background exactly zero
        keep_zero = not first and any(bool(s.get("nonzero_mask")) for s in plan.normalization)
        out = resample_image(cropped, spacing_l, target, order=int(opts["image_order"]),
                             separate_z=separate_z, shape=shape, keep_zero=keep_zero,
                             clip=bool(opts["clip_resampled"]))
        out_spacing = target
    else:
        out, shape, out_spacing = cropped, after_crop, spacing_l
    if normalise and not first:
        from medunet.preprocessing.normalize import normalize

        out = normalize(out, plan.normalization)
    info = PreprocessInfo(original_shape=spatial, original_spacing=spacing_l, bbox=bbox,
                          target_spacing=out_spacing, shape_after_crop=after_crop,
                          shape_after_resample=list(shape), separate_z=separate_z)
    return out, info


def preprocess_case(image: np.ndarray, spacing: Sequence[float], plan, label: np.ndarray | None = None,
                    normalise: bool = True) -> tuple[np.ndarray, np.ndarray | None, PreprocessInfo]:
    """Crop, resample and normalise one case; returns float32 image, uint8 label (or None), info.

    ``image`` is channel-first raw intensities, ``label`` the class-index map of the same
    spatial shape (as :func:`medunet.datasets.load_case` returns them).
    """
    if label is not None and tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[1:]}")
    out, info = prepare_geometry(image, spacing, plan, normalise=normalise)
    out = np.asarray(out, dtype=np.float32)
    seg = None
    if label is not None:
        seg = crop(label, info.bbox)
        if info.resampled:
            opts = preprocessing_options(plan)
            seg = resample_label(seg, None, None, mode=opts["label_mode"], num_classes=plan.num_classes,
                                 shape=info.shape_after_resample, separate_z=info.separate_z)
        seg = np.ascontiguousarray(seg, dtype=np.uint8)
    return np.ascontiguousarray(out, dtype=np.float32), seg, info


def revert_labels(labels: np.ndarray, info: PreprocessInfo, background: int = 0) -> np.ndarray:
    """A label map on the preprocessed grid back on the original one (nearest neighbour),
    with ``background`` outside the crop box. Keeps the dtype."""
    labels = np.asarray(labels)
    if info.resampled:
        labels = resample_array(labels, info.shape_after_crop, order=0)
    if info.cropped:
        labels = uncrop(labels, info.bbox, info.original_shape, fill=background)
    return labels


def revert_probabilities(probs: np.ndarray | torch.Tensor, info: PreprocessInfo) -> np.ndarray:
    """``(K, *S)`` probabilities on the preprocessed grid -> ``(K, *original_shape)`` float32.

    Resampled back linearly (order 0 along ``separate_z``); outside the crop box the
    background class (index 0) has probability 1.
    """
    probs = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if info.resampled:
        probs = resample_probabilities(probs, info.shape_after_crop, separate_z=info.separate_z)
    else:
        probs = probs.astype(np.float32, copy=False)
    if info.cropped:
        fill = [1.0] + [0.0] * (probs.shape[0] - 1)
        probs = uncrop(probs, info.bbox, info.original_shape, fill=fill)
    return probs


def revert_to_indices(probs: np.ndarray | torch.Tensor, info: PreprocessInfo) -> np.ndarray:
    """The argmax of :func:`revert_probabilities` without its ``K x original`` float array.

    Classes are resampled back one at a time while a running maximum and argmax are kept,
    so the memory at the original resolution is one float32 volume plus the index map.
    """
    probs = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    k = probs.shape[0]
    dtype = np.uint8 if k <= 256 else np.uint16
    if not info.resampled:
        idx = probs.argmax(0).astype(dtype)
    else:
        shape = info.shape_after_crop
        best = np.full(shape, -np.inf, dtype=np.float32)
        idx = np.zeros(shape, dtype=dtype)
        for c in range(k):
            score = resample_array(probs[c], shape, order=1, separate_z=info.separate_z)
            better = score > best
            idx[better] = c
            np.maximum(best, score, out=best)
            del score, better
    if info.cropped:
        idx = uncrop(idx, info.bbox, info.original_shape, fill=0)
    return idx
