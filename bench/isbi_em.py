"""ISBI 2012 EM membranes: train with a time budget, predict the 5 test slices, score membranes.

    python bench/isbi_em.py --budget 30m [--work /tmp/medunet_bench_isbi] [--out result.json]

Data: ../shared/data/Dataset002_ISBIEM, slices 0-24 for training, slices 25-29 (imagesTs) for
the test; label 1 = membrane, 0 = cell interior. Scores from the independent evaluator in
../shared/peers: membrane Dice pooled over the 5 slices and as the mean of per-slice Dice, and
the ISBI pixel error (1 - pixel accuracy, the challenge's "pixel error"), pooled and mean.
Prints JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, budget_args, emit, peer_eval, train_and_predict  # noqa: E402


def _one_minus(x: float | None) -> float | None:
    return None if x is None else round(1.0 - x, 6)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget_args(ap, "/tmp/medunet_bench_isbi")
    args = ap.parse_args(argv)
    ds = DATA / "Dataset002_ISBIEM"
    run = train_and_predict(ds, args)
    preds = run["predictions"]
    scores = peer_eval(preds, ds / "labelsTs")  # foreground label 1 = membrane
    pooled, mean = scores["pooled"], scores["mean"]
    result = {
        "benchmark": "isbi_em",
        **run["facts"],
        "test_membrane_dice_pooled": pooled.get("dice"),
        "test_membrane_dice_mean": mean.get("dice"),
        "test_pixel_error_pooled": _one_minus(pooled.get("accuracy")),
        "test_pixel_error_mean": _one_minus(mean.get("accuracy")),
        "test_pooled": {k: pooled.get(k) for k in ("iou", "sensitivity", "specificity", "precision")},
        "loadavg_end": os.getloadavg(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
