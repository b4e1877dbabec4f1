"""DRIVE retinal vessels: train with a time budget, predict the 20 test images, score in the FOV.

    python bench/drive.py --budget 30m [--work /tmp/drive_bench] [--out result.json]

Scores (pooled over the test set, inside the FOV masks, as DRIVE papers report): F1, AUC,
accuracy, sensitivity, specificity, from the independent evaluator in ../shared/peers.
Prints JSON. Never copies DRIVE files anywhere but the work folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, emit, machine, peer_eval  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="30m", help="training time budget")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medunet_bench_drive"))
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="plan override key=value (as for medunet train --set)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from medunet.cli import parse_overrides
    from medunet.inference import Predictor
    from medunet.training import train

    ds = DATA / "Dataset001_DRIVE"
    if not ds.is_dir():
        sys.exit(f"{ds} not found: this benchmark needs ../shared/data")
    info = machine()
    if args.work.exists():
        shutil.rmtree(args.work)
    model, preds = args.work / "model", args.work / "predictions"
    t0 = time.perf_counter()
    res = train(ds, model, time_budget=args.budget, seed=args.seed,
                overrides=parse_overrides(args.overrides), progress=False)
    t_train = time.perf_counter() - t0
    predictor = Predictor.load(model)
    t1 = time.perf_counter()
    predictor.predict(ds / "imagesTs", preds, save_probabilities=True, progress=False)
    t_pred = time.perf_counter() - t1
    scores = peer_eval(preds, ds / "labelsTs", mask=ds / "masksTs", prob=preds)
    pooled = scores["pooled"]
    result = {
        "benchmark": "drive",
        "budget": args.budget,
        "overrides": args.overrides,
        "train_seconds": round(t_train, 1),
        "epochs": res.epochs,
        "iterations": res.iterations,
        "best_val_dice": res.best_dice,
        "patch_size": predictor.plan.patch_size,
        "batch_size": predictor.plan.batch_size,
        "precision": predictor.precision,
        "predict_seconds_per_image": round(t_pred / 20, 3),
        "test_pooled_in_fov": {k: pooled.get(k) for k in
                               ("dice", "auc", "accuracy", "sensitivity", "specificity")},
        "test_mean_dice": scores["mean"].get("dice"),
        "machine": info,
        "loadavg_end": os.getloadavg(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
