"""How sure a finished run's model is of its test volumes: uncertain voxels, false positives and negatives.

    python bench/certainty.py RUN [RUN ...] --data ../shared/data/Dataset003_LeftAtrium
                              [--cases VDOF02 VQ2L3W] [--checkpoint last] [--out result.json]

RUN is a run directory of a ``bench/`` script (``RUN/model``) or a model directory. Each model
predicts the probabilities of the dataset's labelled test cases (imagesTs with labelsTs;
``--cases``: only ids starting with these; no TTA).
Why: a semi-supervised student that learns a teacher's soft targets can become less sure near
the object's border, and a voxel whose foreground probability drifts from 0.3 to 0.6 turns into a
false positive; counting the voxels with a top-class probability under ``--sure`` (0.9) shows
whether a run's losses come with such softening. Binary and multi-class labels (foreground =
any class > 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402


def band_counts(probs: np.ndarray, label: np.ndarray, sure: float = 0.9) -> dict:
    """Counts for one volume from class probabilities ``(K, *S)`` and its label map ``S``: the
    prediction's true/false positives and false negatives (foreground = argmax > 0), the voxels
    whose top-class probability is below ``sure`` (and how many of them are labelled foreground),
    and the median top-class probability at the false positives."""
    pred = probs.argmax(0) > 0
    fg = label > 0
    top = probs.max(0)
    unsure = top < sure
    fp = pred & ~fg
    tp, fn = int((pred & fg).sum()), int((~pred & fg).sum())
    denom = int(pred.sum()) + int(fg.sum())
    return {"dice": 2 * tp / denom if denom else 1.0, "tp": tp, "fp": int(fp.sum()), "fn": fn,
            "unsure": int(unsure.sum()), "unsure_foreground": int((unsure & fg).sum()),
            "fp_median_top": float(np.median(top[fp])) if fp.any() else None}


def probe(model: Path, data: Path, cases: list[str] | None, checkpoint: str, sure: float) -> dict:
    """``band_counts`` of every (chosen) labelled test case of ``data`` for one model, and their sums."""
    from medunet.datasets import find_dataset, load_case
    from medunet.errors import InputError
    from medunet.inference import Predictor

    dataset = find_dataset(data)
    chosen = [c for c in dataset.test if c.label_path is not None
              and (not cases or any(c.case_id.startswith(p) for p in cases))]
    if not chosen:
        raise InputError("no labelled test case (imagesTs with labelsTs) matches", data,
                         "point --data at a dataset with labelsTs, or widen --cases")
    predictor = Predictor.load(model, checkpoint=checkpoint)
    rows = {}
    for case in chosen:
        image, label, geom = load_case(case, dataset)
        probs = np.asarray(predictor.predict_probabilities(image, spacing=geom.spacing))
        rows[case.case_id] = band_counts(probs, label, sure)
    total = {k: sum(r[k] for r in rows.values()) for k in ("tp", "fp", "fn", "unsure", "unsure_foreground")}
    return {"model": str(model), "cases": rows, "sum": total}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="the dataset (its imagesTs and labelsTs)")
    ap.add_argument("--cases", nargs="*", help="only case ids starting with these")
    ap.add_argument("--checkpoint", default="best", choices=("best", "last"),
                    help="best: the weights the model directory serves")
    ap.add_argument("--sure", type=float, default=0.9, help="top-class probability counted as sure")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        model = run / "model" if (run / "model").is_dir() else run
        rows.append(probe(model, args.data, args.cases, args.checkpoint, args.sure))
    result = {"benchmark": "certainty", "machine": machine(), "sure": args.sure, "results": rows}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    from medunet.errors import InputError

    try:
        main()
    except InputError as e:  # a bad --data or --cases: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
