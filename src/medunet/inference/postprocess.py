"""Post-processing of label maps, chosen per class on the validation cases.

Steps (per foreground class, on raw label values):

* ``largest_component``: keep the largest connected component (full connectivity) of the
  class, the rest becomes background. Right for one organ per image (left atrium, liver).
* ``fill_holes``: background enclosed by the class becomes the class (other classes inside
  it, e.g. a tumour in an organ, are left alone).
* ``remove_small=N``: remove connected components of fewer than ``N`` voxels.

A choice is a dict ``{"classes": {"1": ["fill_holes", "largest_component"]}, ...}`` stored in
``plan.json`` under ``inference.postprocessing``. :func:`choose_postprocessing` keeps a step
for a class only where it raised that class's mean validation Dice: a step that helps one
structure (a single organ) can ruin another (a vessel tree), so nothing is applied blindly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medunet.errors import InputError

STEPS = ("largest_component", "fill_holes", "remove_small")
MIN_GAIN = 1e-6  # a step must raise the mean Dice by more than float noise to be kept


def _structure(ndim: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, ndim)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component ids and their sizes (index 0 = background, size 0)."""
    lab, n = ndimage.label(mask, structure=_structure(mask.ndim))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    return lab, sizes


def _parse_step(step: str) -> tuple[str, int]:
    name, _, arg = step.partition("=")
    name = name.strip()
    if name not in STEPS:
        raise InputError(f"unknown post-processing step '{step}'",
                         fix="use largest_component, fill_holes or remove_small=N")
    if name == "remove_small":
        try:
            return name, int(arg)
        except ValueError as exc:
            raise InputError(f"post-processing step '{step}' needs a voxel count",
                             fix="write it as remove_small=N, e.g. remove_small=50") from exc
    if arg:
        raise InputError(f"post-processing step '{step}' takes no value")
    return name, 0


def apply_step(labels: np.ndarray, value: int, step: str, background: int = 0) -> np.ndarray:
    """One step for one class value; returns a new label map."""
    name, arg = _parse_step(step)
    mask = labels == value
    if not mask.any():
        return labels
    out = labels.copy()
    if name == "fill_holes":
        holes = ndimage.binary_fill_holes(mask, structure=_structure(mask.ndim)) & ~mask
        out[holes & (labels == background)] = value
        return out
    lab, sizes = _components(mask)
    if name == "largest_component":
        drop = mask & (lab != int(sizes.argmax()))
    else:
        drop = mask & (sizes[lab] < arg)
    out[drop] = background
    return out


def apply_postprocessing(labels: np.ndarray, choice: dict | None, background: int = 0) -> np.ndarray:
    """Apply a choice (``{"classes": {"VALUE": [steps...]}}``) to a raw-valued label map."""
    if not choice:
        return labels
    for value, steps in (choice.get("classes") or {}).items():
        for step in steps:
            labels = apply_step(labels, int(value), step, background)
    return labels


def parse_postprocessing(spec: str, label_values: Sequence[int]) -> dict:
    """``--postprocess`` text -> a choice. Items are comma-separated, ``[VALUE:]step``; an item
    without ``VALUE:`` applies to every foreground class.

    Example: ``"largest_component,2:remove_small=50"``.
    """
    fg = [int(v) for v in label_values[1:]]
    classes: dict[str, list[str]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        target, sep, step = item.partition(":")
        if not sep:
            values, step = fg, target
        else:
            try:
                values = [int(target)]
            except ValueError as exc:
                raise InputError(f"cannot read the post-processing item '{item}'",
                                 fix="write [LABEL:]step, e.g. 1:largest_component") from exc
            if values[0] not in fg:
                raise InputError(f"post-processing names label {values[0]}, which the model does not "
                                 f"predict", fix=f"use one of {', '.join(map(str, fg))}")
        _parse_step(step)
        for v in values:
            classes.setdefault(str(v), []).append(step.strip())
    return {"classes": classes, "source": "user"}


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    inter = np.count_nonzero(pred & ref)
    total = np.count_nonzero(pred) + np.count_nonzero(ref)
    return 1.0 if total == 0 else 2.0 * inter / total


def _mean_dice(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], value: int) -> float:
    return float(np.mean([_dice(p == value, r == value) for p, r in zip(preds, refs, strict=True)]))


def _size_candidates(refs: Sequence[np.ndarray], value: int) -> list[int]:
    """Thresholds below the smallest true object: removing less than that cannot hurt much."""
    smallest = None
    for r in refs:
        _, sizes = _components(r == value)
        real = sizes[1:]
        if real.size:
            smallest = int(real.min()) if smallest is None else min(smallest, int(real.min()))
    if not smallest or smallest < 4:
        return []
    return sorted({max(2, int(smallest * f)) for f in (0.1, 0.25, 0.5, 0.9)})


def choose_postprocessing(predictions: Sequence[np.ndarray], references: Sequence[np.ndarray],
                          label_values: Sequence[int]) -> dict:
    """Greedily pick steps per class that raise the mean validation Dice of that class.

    Tries ``fill_holes``, then ``largest_component``, then (when the largest component was not
    kept) ``remove_small`` with thresholds below the smallest true object; each step is
    tried on top of the steps kept before it. Returns the choice with the Dice before and after.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError("choose_postprocessing needs as many predictions as references (>= 1)")
    background = int(label_values[0])
    preds = [np.asarray(p) for p in predictions]
    refs = [np.asarray(r) for r in references]
    classes: dict[str, list[str]] = {}
    dice: dict[str, dict] = {}
    for value in (int(v) for v in label_values[1:]):
        current = preds
        best = _mean_dice(current, refs, value)
        record = {"none": round(best, 6), "tried": {}}
        kept: list[str] = []
        candidates = ["fill_holes", "largest_component"]
        for step in candidates + ["remove_small"]:
            if step == "remove_small":
                if "largest_component" in kept:
                    break
                options = [f"remove_small={n}" for n in _size_candidates(refs, value)]
            else:
                options = [step]
            trial_best, trial_step, trial_maps = best, None, None
            for opt in options:
                maps = [apply_step(p, value, opt, background) for p in current]
                d = _mean_dice(maps, refs, value)
                record["tried"][opt] = round(d, 6)
                if d > trial_best + MIN_GAIN:
                    trial_best, trial_step, trial_maps = d, opt, maps
            if trial_step is not None and trial_maps is not None:
                kept.append(trial_step)
                best, current = trial_best, trial_maps
        record["chosen"] = round(best, 6)
        dice[str(value)] = record
        if kept:
            classes[str(value)] = kept
    return {"classes": classes, "validation_dice": dice, "source": "validation",
            "cases": len(preds)}
