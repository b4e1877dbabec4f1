"""Distillation: shrink a trained model, then compare teacher and student on the test split.

    python bench/distill.py --teacher /tmp/drive30/model --budget 10m [--width 0.5]
        [--data ../shared/data/Dataset001_DRIVE] [--work /tmp/medunet_bench_distill] [--out r.json]

Distils TEACHER into a student of ``width`` times its channels within the budget
(``medunet.training.distill``), then predicts the dataset's test images (imagesTs) with both,
timed per image on the same machine, and scores both with the independent evaluator in
../shared/peers: pooled over the test set, inside the FOV masks (masksTs) where the dataset
has them (DRIVE). Post-processing is off for both, so the networks are compared. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, emit, machine, peer_eval  # noqa: E402


def _predict_and_score(models: dict[str, Path], ds: Path, work: Path, repeats: int) -> dict:
    """Predict imagesTs with each model (the first pass writes the files; passes interleave the
    models so a change of machine load hits both alike), time every pass, score the first."""
    from medunet.inference import Predictor

    predictors = {k: Predictor.load(m, postprocess="none") for k, m in models.items()}
    n = len(list((ds / "imagesTs").iterdir()))
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(repeats):
        for name, predictor in predictors.items():
            target = work / f"pred_{name}" if r == 0 else work / f"pred_{name}_repeat"
            t0 = time.perf_counter()
            predictor.predict(ds / "imagesTs", target, save_probabilities=r == 0, progress=False)
            times[name].append((time.perf_counter() - t0) / max(1, n))
            if r:
                shutil.rmtree(target)
    mask = ds / "masksTs" if (ds / "masksTs").is_dir() else None
    out = {}
    for name, predictor in predictors.items():
        scores = peer_eval(work / f"pred_{name}", ds / "labelsTs", mask=mask, prob=work / f"pred_{name}")
        pooled = scores["pooled"]
        out[name] = {
            "seconds_per_image": round(sorted(times[name])[len(times[name]) // 2], 4),
            "seconds_per_image_runs": [round(t, 4) for t in times[name]],
            "precision": predictor.precision,
            "test_pooled" + ("_in_fov" if mask else ""): {
                k: pooled.get(k) for k in ("dice", "auc", "accuracy", "sensitivity", "specificity")},
            "test_mean_dice": scores["mean"].get("dice"),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True, help="trained model directory")
    ap.add_argument("--data", type=Path, default=None,
                    help="dataset folder (default: the one the teacher records, else DRIVE)")
    ap.add_argument("--budget", default="10m", help="distillation time budget")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--init", default="prune", choices=["prune", "random"])
    ap.add_argument("--repeats", type=int, default=3, help="timed prediction passes per model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medunet_bench_distill"))
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from medunet.training.distill import distill, recorded_data

    ds = args.data or recorded_data(args.teacher) or DATA / "Dataset001_DRIVE"
    if not (ds / "imagesTs").is_dir() or not (ds / "labelsTs").is_dir():
        sys.exit(f"{ds} has no imagesTs/labelsTs: this benchmark needs a test split (../shared/data)")
    info = machine()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    student = args.work / "student"
    t0 = time.perf_counter()
    res = distill(args.teacher, student, ds, width=args.width, time_budget=args.budget,
                  temperature=args.temperature, alpha=args.alpha, init=args.init, seed=args.seed,
                  progress=False)
    t_distill = time.perf_counter() - t0
    summary = json.loads((student / "distill.json").read_text())
    test = _predict_and_score({"teacher": args.teacher, "student": student}, ds, args.work, args.repeats)
    speedup = test["teacher"]["seconds_per_image"] / max(test["student"]["seconds_per_image"], 1e-12)
    result = {
        "benchmark": "distill",
        "teacher": str(args.teacher),
        "data": str(ds),
        "budget": args.budget,
        "width": args.width,
        "init_used": res.init_used,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "distill_seconds": round(t_distill, 1),
        "epochs": res.epochs,
        "iterations": res.iterations,
        "teacher_params": res.teacher_params,
        "student_params": res.student_params,
        "val_dice": {"teacher": summary["teacher_val_dice"], "student": summary["student_val_dice"]},
        "val_seconds_per_image": {"teacher": summary["teacher_seconds_per_image"],
                                  "student": summary["student_seconds_per_image"]},
        "test": test,
        "test_speedup": round(speedup, 3),
        "machine": info,
        "loadavg_end": os.getloadavg(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
