"""DRIVE retinal vessels: train with a time budget, predict the 20 test images, score in the FOV.

    python bench/drive.py --budget 30m [--work /tmp/drive_bench] [--out result.json]

Scores (pooled over the test set, inside the FOV masks, as DRIVE papers report): F1, AUC,
accuracy, sensitivity, specificity, from the independent evaluator in ../shared/peers.
Prints JSON. DRIVE files are read in place; only predictions are written to the work folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, budget_args, emit, peer_eval, train_and_predict  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget_args(ap, "/tmp/medunet_bench_drive")
    args = ap.parse_args(argv)
    ds = DATA / "Dataset001_DRIVE"
    run = train_and_predict(ds, args, save_probabilities=True)
    preds = run["predictions"]
    scores = peer_eval(preds, ds / "labelsTs", mask=ds / "masksTs", prob=preds)
    pooled = scores["pooled"]
    result = {
        "benchmark": "drive",
        **run["facts"],
        "test_pooled_in_fov": {k: pooled.get(k) for k in
                               ("dice", "auc", "accuracy", "sensitivity", "specificity")},
        "test_mean_dice": scores["mean"].get("dice"),
        "loadavg_end": os.getloadavg(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
