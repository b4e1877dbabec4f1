"""Left Atrium 3D MRI: train the 3D configuration with a time budget, predict the 20 test
volumes, report Dice and HD95 (mm).

    python bench/leftatrium.py --budget 30m [--work /tmp/medunet_bench_la] [--out result.json]

Scores: mean over the 20 test cases of Dice and HD95 (medpy convention, physical units), from
the independent evaluator in ../shared/peers, and from medunet.evaluation as a cross-check.
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
    ap.add_argument("--work", type=Path, default=Path("/tmp/medunet_bench_la"))
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="plan override key=value (as for medunet train --set)")
    ap.add_argument("--tta", default="none", help="test-time augmentation for the test cases")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from medunet.cli import parse_overrides
    from medunet.evaluation import evaluate
    from medunet.inference import Predictor
    from medunet.training import train

    ds = DATA / "Dataset003_LeftAtrium"
    if not ds.is_dir():
        sys.exit(f"{ds} not found: this benchmark needs ../shared/data")
    info = machine()
    if args.work.exists():
        shutil.rmtree(args.work)
    model, preds = args.work / "model", args.work / "predictions"
    t0 = time.perf_counter()
    res = train(ds, model, time_budget=args.budget, seed=args.seed,
                overrides=parse_overrides(args.overrides), progress=False, report=False)
    t_train = time.perf_counter() - t0
    predictor = Predictor.load(model)
    t1 = time.perf_counter()
    predictor.predict(ds / "imagesTs", preds, progress=False, tta=args.tta)
    t_pred = time.perf_counter() - t1
    peer = peer_eval(preds, ds / "labelsTs")
    ours = evaluate(preds, ds / "labelsTs", labels=[1], progress=False, workers=1)
    result = {
        "benchmark": "leftatrium",
        "budget": args.budget,
        "overrides": args.overrides,
        "tta": args.tta,
        "train_seconds": round(t_train, 1),
        "epochs": res.epochs,
        "iterations": res.iterations,
        "best_val_dice": res.best_dice,
        "patch_size": predictor.plan.patch_size,
        "batch_size": predictor.plan.batch_size,
        "precision": predictor.precision,
        "predict_seconds_per_case": round(t_pred / 20, 3),
        "test_mean": {k: peer["mean"].get(k) for k in ("dice", "iou", "hd95", "asd")},
        "medunet_eval_mean": {k: ours.metric(1, k, kind="mean") for k in ("dice", "hd95", "assd")},
        "machine": info,
        "loadavg_end": os.getloadavg(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
