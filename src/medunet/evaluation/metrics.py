"""Per-case segmentation metrics, spacing-aware, with documented empty-mask conventions.

Everything here works on plain numpy arrays of any spatial dimension (2D or 3D), so the
same code scores DRIVE vessels and left-atrium volumes.

Definitions (TP/FP/FN/TN counted inside the region mask when one is given):

* ``dice`` = 2TP/(2TP+FP+FN) (= F1), ``iou`` = TP/(TP+FP+FN),
  ``precision`` = TP/(TP+FP), ``sensitivity`` = TP/(TP+FN), ``specificity`` = TN/(TN+FP),
  ``accuracy`` = (TP+TN)/N.
* ``vol_gt`` / ``vol_pred``: foreground volume in physical units (mm^3, mm^2 or pixels),
  ``volume_diff`` = vol_pred - vol_gt (signed), ``rel_volume_diff`` = volume_diff / vol_gt.
* Surface voxels are the mask minus its erosion with face connectivity (outside the image
  counts as background). For every surface voxel of one mask we take the Euclidean distance,
  in physical units, to the nearest surface voxel of the other mask. ``hd95`` is the 95th
  percentile (linear interpolation) of the distances of *both* directions pooled (the medpy
  convention used by the LA literature and by the peer evaluator ``seg_eval.py``), ``hd`` the
  maximum, ``assd`` the mean of the pooled distances, and ``nsd`` (normalised surface Dice,
  Nikolov et al. 2021, voxel-counting variant) the fraction of surface voxels of both masks
  lying within ``tolerance`` of the other surface.
* ``roc_auc`` (ties averaged, = the Mann-Whitney statistic) and ``pr_auc`` (average precision,
  the step-wise sum of precision times recall increments) from foreground probabilities.

Empty-mask conventions (the same as nnU-Net, MONAI's defaults and ``seg_eval.py`` where they
define one):

* GT and prediction both empty: dice = iou = 1, hd95 = hd = assd = 0, nsd = 1,
  rel_volume_diff = 0; precision and sensitivity are 0/0 and therefore NaN.
* Exactly one empty: dice = iou = 0, nsd = 0, hd95 / hd / assd = NaN (there is no surface to
  measure against; summaries skip NaNs and report how many cases had them).
* Any other ratio with a zero denominator is NaN (e.g. roc_auc when the case has no positives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats

#: Metric names per case and class, in display order.
COUNT_METRICS: tuple[str, ...] = (
    "dice",
    "iou",
    "precision",
    "sensitivity",
    "specificity",
    "accuracy",
)
VOLUME_METRICS: tuple[str, ...] = ("vol_gt", "vol_pred", "volume_diff", "rel_volume_diff")
DISTANCE_METRICS: tuple[str, ...] = ("hd95", "hd", "assd", "nsd")
PROB_METRICS: tuple[str, ...] = ("roc_auc", "pr_auc")
COUNT_KEYS: tuple[str, ...] = ("tp", "fp", "fn", "tn")
NAN = float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else NAN


def count_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Overlap metrics from a confusion matrix (also used for the pooled summary)."""
    both_empty = tp + fp + fn == 0
    return {
        "dice": 1.0 if both_empty else _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": 1.0 if both_empty else _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


def class_counts(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> np.ndarray:
    """``(3, n_classes)`` TP, FP and FN per class index of two index maps; summed over cases
    they give the pooled Dice (:func:`pooled_dice`). Column 0 (background) stays zero."""
    counts = np.zeros((3, n_classes))
    for c in range(1, n_classes):
        p, g = pred == c, ref == c
        counts[:, c] = (np.count_nonzero(p & g), np.count_nonzero(p & ~g), np.count_nonzero(~p & g))
    return counts


def pooled_dice(counts: np.ndarray) -> list[float]:
    """Dice per foreground class from summed :func:`class_counts` (1 where both are empty)."""
    tp, fp, fn = counts
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)[1:].tolist()


def case_dice(counts: np.ndarray) -> np.ndarray:
    """Per case, the mean over foreground classes of its Dice, from counts ``(cases, 3, K)``."""
    return np.array([float(np.mean(pooled_dice(c))) for c in counts])


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """p-value of a one-sided paired t-test that ``a`` is greater than ``b`` (case by case): 1
    with fewer than two pairs or no difference, 0 when every pair gains the same amount."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2 or not d.any():
        return 1.0
    if np.ptp(d) < 1e-9:  # no spread (to rounding): the t statistic is infinite
        return 0.0 if d.mean() > 0 else 1.0
    return float(stats.ttest_rel(a, b, alternative="greater").pvalue)


def volume_metrics(n_gt: int, n_pred: int, spacing: Sequence[float]) -> dict[str, float]:
    """Volumes in physical units; the relative difference is 0 when both are empty."""
    voxel = float(np.prod(spacing)) if len(spacing) else 1.0
    vg, vp = n_gt * voxel, n_pred * voxel
    rel = (vp - vg) / vg if n_gt else (0.0 if n_pred == 0 else NAN)
    return {"vol_gt": vg, "vol_pred": vp, "volume_diff": vp - vg, "rel_volume_diff": rel}


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels plus ``margin``, clipped to the array."""
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other) if other else mask)
        if idx.size == 0:
            return None
        lo = max(int(idx[0]) - margin, 0)
        hi = min(int(idx[-1]) + 1 + margin, mask.shape[ax])
        box.append(slice(lo, hi))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its face-connected erosion (image edge = background)."""
    if not mask.any():
        return mask.copy()
    st = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=st, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed surface distances ``(pred -> gt, gt -> pred)`` in the units of ``spacing``.

    Both masks are cropped to the bounding box of their union (plus one voxel) first: every
    surface voxel lies inside it, so the distances are exact and the distance transforms
    only cover the object, not the whole volume. Returns two empty arrays when both masks
    are empty and ``None`` when exactly one is.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    box = _bbox(pred | gt)
    if box is None:
        return np.zeros(0), np.zeros(0)
    p, g = pred[box], gt[box]
    if not p.any() or not g.any():
        return None
    sp = tuple(float(s) for s in spacing)
    sp_p, sp_g = surface(p), surface(g)
    dist_to_g = ndimage.distance_transform_edt(~sp_g, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~sp_p, sampling=sp)
    return dist_to_g[sp_p], dist_to_p[sp_g]


def distance_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance: float = 1.0
) -> dict[str, float]:
    """HD95, HD, ASSD and normalised surface Dice with the module's empty conventions."""
    d = surface_distances(pred, gt, spacing)
    if d is None:
        return {"hd95": NAN, "hd": NAN, "assd": NAN, "nsd": 0.0}
    d_pg, d_gp = d
    if d_pg.size + d_gp.size == 0:
        return {"hd95": 0.0, "hd": 0.0, "assd": 0.0, "nsd": 1.0}
    both = np.concatenate([d_pg, d_gp])
    within = np.count_nonzero(d_pg <= tolerance) + np.count_nonzero(d_gp <= tolerance)
    return {
        "hd95": float(np.percentile(both, 95)),
        "hd": float(both.max()),
        "assd": float(both.mean()),
        "nsd": within / both.size,
    }


# ------------------------------------------------------------------------------ ROC / PR
def _rank_counts(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending) with the positives and negatives at each score."""
    y = np.asarray(y, dtype=bool).ravel()
    score = np.asarray(score).ravel()
    values, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    pos = np.bincount(inverse, weights=y, minlength=values.size)
    return values[::-1], pos[::-1], (counts - pos)[::-1]


def curves_from_counts(pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray | float]:
    """ROC and PR curves from positives/negatives per threshold, highest threshold first.

    Ties (pixels sharing a threshold) move the curve diagonally, which makes the trapezoid
    ROC area equal the Mann-Whitney statistic with averaged ranks, and the average
    precision equal scikit-learn's step-wise definition.
    """
    tps = np.cumsum(pos, dtype=float)
    fps = np.cumsum(neg, dtype=float)
    n_pos = tps[-1] if tps.size else 0.0
    n_neg = fps[-1] if fps.size else 0.0
    if n_pos == 0 or n_neg == 0:
        empty = np.zeros(0)
        return {"roc_auc": NAN, "pr_auc": NAN, "fpr": empty, "tpr": empty,
                "recall": empty, "precision": empty}
    tpr = np.concatenate([[0.0], tps / n_pos])
    fpr = np.concatenate([[0.0], fps / n_neg])
    roc_auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    prec = tps / (tps + fps)  # every threshold holds at least one pixel: never 0/0
    recall = tps / n_pos
    ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * prec))
    return {"roc_auc": roc_auc, "pr_auc": ap, "fpr": fpr, "tpr": tpr,
            "recall": recall, "precision": prec}


def roc_pr_auc(y_true: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """Exact ROC-AUC and average precision of scores against binary labels (NaN if one class)."""
    _, pos, neg = _rank_counts(y_true, score)
    c = curves_from_counts(pos, neg)
    return float(c["roc_auc"]), float(c["pr_auc"])


class PooledCurve:
    """ROC/PR over the pixels of many cases without keeping all of them forever.

    Pixels are kept exactly (float32 scores) up to ``exact_limit`` in total; past it the
    curve falls back to a 65,536-bin histogram of the scores clipped to [0, 1], which moves
    the AUC by at most the share of positive/negative pairs that fall into one bin.
    """

    BINS = 65536

    def __init__(self, exact_limit: int = 100_000_000) -> None:
        self.exact_limit = exact_limit
        self._y: list[np.ndarray] = []
        self._s: list[np.ndarray] = []
        self._n = 0
        self._pos = np.zeros(self.BINS, dtype=np.int64)
        self._neg = np.zeros(self.BINS, dtype=np.int64)

    @property
    def exact(self) -> bool:
        return self._n <= self.exact_limit

    def add(self, y: np.ndarray, score: np.ndarray) -> None:
        y = np.asarray(y, dtype=bool).ravel()
        score = np.asarray(score, dtype=np.float32).ravel()
        idx = np.clip((np.clip(score, 0.0, 1.0) * self.BINS).astype(np.int64), 0, self.BINS - 1)
        self._pos += np.bincount(idx[y], minlength=self.BINS)
        self._neg += np.bincount(idx[~y], minlength=self.BINS)
        self._n += y.size
        if self.exact:
            self._y.append(y)
            self._s.append(score)
        else:
            self._y, self._s = [], []

    def curves(self) -> dict[str, np.ndarray | float | str]:
        """ROC-AUC, average precision and the curve points, plus the method used."""
        if self._n and self.exact:
            _, pos, neg = _rank_counts(np.concatenate(self._y), np.concatenate(self._s))
            out: dict = curves_from_counts(pos, neg)
            out["method"] = "exact"
        else:
            keep = (self._pos + self._neg)[::-1] > 0  # empty bins are no threshold
            out = curves_from_counts(self._pos[::-1][keep], self._neg[::-1][keep])
            out["method"] = f"histogram ({self.BINS} bins)"
        return out


# ----------------------------------------------------------------------------- one case
def _label_probability(probs: np.ndarray, label: int, shape: tuple[int, ...], n_labels: int):
    """The probability map of one label from a class-first array (or a single foreground map)."""
    if probs.shape == shape:
        if n_labels != 1:
            raise ValueError(
                "a single probability map without a class axis can only score one label"
            )
        return probs
    if probs.shape[1:] != shape:
        raise ValueError(f"probabilities of shape {probs.shape} do not fit labels of shape {shape}")
    if label >= probs.shape[0]:
        raise ValueError(
            f"no probability channel for label {label} (only {probs.shape[0]} channels)"
        )
    return probs[label]


def compute_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None,
    labels: Sequence[int],
    mask: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    tolerance: float = 1.0,
) -> dict[int, dict[str, float | int]]:
    """Score one case: ``{label: {metric: value, ..., "tp":.., "fp":.., "fn":.., "tn":..}}``.

    Args:
        pred, gt: integer label maps of the same spatial shape.
        spacing: physical size of a voxel per array axis (``None``: 1 per axis).
        labels: label values to score, each as "this value vs everything else".
        mask: optional region (non-zero = inside); counts, AUCs and distances use only it
            (both masks are cut to the region before their surfaces are taken).
        probs: optional foreground probabilities, class axis first with channel ``k`` for
            label value ``k`` (a map of the label shape is accepted when one label is scored).
        tolerance: surface Dice tolerance in the units of ``spacing``.

    Example:
        >>> compute_metrics(np.array([[0, 1]]), np.array([[1, 1]]), None, [1])[1]["dice"]
        0.6666666666666666
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * gt.ndim
    if len(sp) != gt.ndim:
        raise ValueError(f"spacing {sp} has {len(sp)} entries for a {gt.ndim}D array")
    roi = None
    if mask is not None:
        roi = np.asarray(mask) > 0
        if roi.shape != gt.shape:
            raise ValueError(f"mask shape {roi.shape} != ground-truth shape {gt.shape}")
    if probs is not None:
        probs = np.asarray(probs)
    gt_r = gt[roi] if roi is not None else gt.ravel()
    pred_r = pred[roi] if roi is not None else pred.ravel()
    n = int(gt_r.size)
    out: dict[int, dict[str, float | int]] = {}
    for lab in labels:
        lab = int(lab)
        g, p = gt_r == lab, pred_r == lab
        tp = int(np.count_nonzero(g & p))
        n_g, n_p = int(np.count_nonzero(g)), int(np.count_nonzero(p))
        fp, fn = n_p - tp, n_g - tp
        tn = n - tp - fp - fn
        res: dict[str, float | int] = dict(count_metrics(tp, fp, fn, tn))
        res.update(volume_metrics(n_g, n_p, sp))
        gm, pm = gt == lab, pred == lab
        if roi is not None:
            gm &= roi
            pm &= roi
        res.update(distance_metrics(pm, gm, sp, tolerance))
        if probs is not None:
            pr = _label_probability(probs, lab, gt.shape, len(labels))
            pr = pr[roi] if roi is not None else pr.ravel()
            res["roc_auc"], res["pr_auc"] = roc_pr_auc(g, pr)
        res.update(tp=tp, fp=fp, fn=fn, tn=tn)
        out[lab] = res
    return out


def empty_label_metrics(n_roi: int, spacing: Sequence[float], with_probs: bool = False):
    """Metrics of a label absent from both GT and prediction (fills cases without it)."""
    res: dict[str, float | int] = dict(count_metrics(0, 0, 0, n_roi))
    res.update(volume_metrics(0, 0, spacing))
    res.update({"hd95": 0.0, "hd": 0.0, "assd": 0.0, "nsd": 1.0})
    if with_probs:
        res.update(roc_auc=NAN, pr_auc=NAN)
    res.update(tp=0, fp=0, fn=0, tn=n_roi)
    return res


def is_nan(x: object) -> bool:
    """True for float NaN (and None), for NaN-aware summaries and JSON output."""
    return x is None or (isinstance(x, float) and math.isnan(x))
