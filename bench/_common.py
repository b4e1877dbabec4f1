"""Helpers shared by the benchmarks: paths, machine facts, load, JSON output."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
PEERS = SHARED / "peers"


def machine() -> dict:
    """CPU model, core count, load average and the commit: BENCHMARKS.md needs all four."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=REPO, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "commit": commit + ("+dirty" if dirty else ""),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def peer_eval(pred: Path, gt: Path, mask: Path | None = None, prob: Path | None = None) -> dict:
    """Score with the independent evaluator in ../shared/peers (pooled and mean metrics)."""
    out = pred.parent / f"{pred.name}_seg_eval.json"
    cmd = [sys.executable, str(PEERS / "seg_eval.py"), "--pred", str(pred), "--gt", str(gt),
           "--out", str(out)]
    if mask:
        cmd += ["--mask", str(mask)]
    if prob:
        cmd += ["--prob", str(prob)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def log_steps(model: Path) -> dict:
    """A run's training steps from its ``log.csv``: steps, epochs, step seconds (validation
    excluded), steps per second, the last training loss and the best validation Dice."""
    with (model / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    steps = int(rows[-1]["iterations"])
    step_s = sum(float(r["epoch_seconds"]) - float(r["val_seconds"]) for r in rows)
    dice = [float(r["val_dice"]) for r in rows if r["val_dice"] not in ("", "nan")]
    return {"steps": steps, "epochs": len(rows), "step_seconds": round(step_s, 1),
            "steps_per_second": round(steps / step_s, 3), "last_train_loss": float(rows[-1]["train_loss"]),
            "best_val_dice": max(dice) if dice else None,
            "data_wait_share": float(rows[-1].get("data_wait_share") or 0.0)}


def emit(result: dict, path: Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text)


def budget_args(ap: argparse.ArgumentParser, work: str) -> None:
    """The options every train-then-predict benchmark takes."""
    ap.add_argument("--budget", default="30m", help="training time budget")
    ap.add_argument("--work", type=Path, default=Path(work))
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="plan override key=value (as for medunet train --set)")
    ap.add_argument("--tta", default="auto", help="test-time augmentation for the test cases (auto: the "
                                                   "plan's, which training chooses on the validation cases)")
    ap.add_argument("--seed", type=int, default=0)


def train_and_predict(dataset: Path, args: argparse.Namespace, save_probabilities: bool = False) -> dict:
    """Train on the dataset's training split within the budget, then predict its test split.

    Returns the run facts every benchmark reports, plus the predictions folder and predictor.
    """
    import shutil
    import time

    from medunet.cli import parse_overrides
    from medunet.inference import Predictor
    from medunet.training import train

    if not dataset.is_dir():
        sys.exit(f"{dataset} not found: this benchmark needs ../shared/data")
    info = machine()
    if args.work.exists():
        shutil.rmtree(args.work)
    model, preds = args.work / "model", args.work / "predictions"
    t0 = time.perf_counter()
    # report=True: the validation report and the choices it makes (TTA, post-processing), as
    # `medunet train` does for a user
    res = train(dataset, model, time_budget=args.budget, seed=args.seed,
                overrides=parse_overrides(args.overrides), progress=False, report=True)
    t_train = time.perf_counter() - t0
    predictor = Predictor.load(model)
    n_test = len(list((dataset / "imagesTs").iterdir()))
    t1 = time.perf_counter()
    predictor.predict(dataset / "imagesTs", preds, save_probabilities=save_probabilities,
                      progress=False, tta=args.tta)
    t_pred = time.perf_counter() - t1
    facts = {
        "budget": args.budget,
        "overrides": args.overrides,
        "tta": args.tta,
        "tta_used": predictor.plan.inference.get("tta") if args.tta == "auto" else args.tta,
        "tta_choice": predictor.plan.inference.get("tta_choice"),
        "postprocessing": (predictor.plan.inference.get("postprocessing") or {}).get("classes"),
        "train_seconds": round(t_train, 1),
        "epochs": res.epochs,
        "iterations": res.iterations,
        "best_val_dice": res.best_dice,
        "patch_size": predictor.plan.patch_size,
        "batch_size": predictor.plan.batch_size,
        "precision": predictor.precision,
        "predict_seconds_per_case": round(t_pred / max(1, n_test), 3),
        "machine": info,
    }
    return {"facts": facts, "predictions": preds, "model": model}
