"""Breast ultrasound (BUSI): train with the plan's defaults and a time budget, predict the 129
test images, report lesion Dice (mean per image and pooled), the steps, the validation share
and the plan chosen.

    python bench/busi.py --budget 30m [--work /tmp/medunet_bench_busi] [--out result.json]

Data: ../shared/data/Dataset004_BUSI (518 training / 129 test grey images of 190-1048 px, one
lesion class). Scores from the independent evaluator in ../shared/peers. The issue's goal is a
mean per-image Dice >= 0.80 with a 30-minute budget. Prints JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, budget_args, emit, peer_eval, train_and_predict  # noqa: E402


def run_log(model: Path) -> dict:
    """Steps, validation share and the per-epoch validation Dice from ``log.csv``."""
    with (model / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    out = {
        "log_epochs": len(rows),
        "val_share": float(last.get("val_share", "nan")),
        "val_cases_per_epoch": int(last.get("val_cases", 0) or 0) or None,
        "val_dice_per_epoch": [None if r["val_dice"] in ("", "nan") else round(float(r["val_dice"]), 4)
                               for r in rows],
        "val_seconds_total": round(sum(float(r["val_seconds"]) for r in rows), 1),
    }
    selection = model / "selection.json"
    if selection.is_file():
        out["final_choice"] = json.loads(selection.read_text())
    return out


def plan_summary(model: Path) -> dict:
    """What the planner chose and why (spacing, patch, batch, the resolution rule)."""
    plan = json.loads((model / "plan.json").read_text())
    res = {k: v for k, v in plan.get("resolution", {}).items() if k != "scales"}
    return {"spacing": plan["spacing"], "median_shape": plan["median_shape"],
            "patch_size": plan["patch_size"], "batch_size": plan["batch_size"],
            "features": plan["network"]["features"], "resolution": res,
            "scales": plan.get("resolution", {}).get("scales"),
            "why_resolution": plan["reasons"].get("resolution")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget_args(ap, "/tmp/medunet_bench_busi")
    args = ap.parse_args(argv)
    ds = DATA / "Dataset004_BUSI"
    run = train_and_predict(ds, args)
    scores = peer_eval(run["predictions"], ds / "labelsTs")
    pooled, mean = scores["pooled"], scores["mean"]
    # the other TTA on the same model: what the validation-chosen one gained or lost on the test set
    used = run["facts"]["tta_used"]
    other = "none" if used == "flip" else "flip"
    from medunet.inference import Predictor

    alt = run["predictions"].with_name(f"predictions_{other}")
    Predictor.load(run["model"]).predict(ds / "imagesTs", alt, progress=False, tta=other)
    fs = peer_eval(alt, ds / "labelsTs")
    flip = {f"test_dice_mean_tta_{other}": fs["mean"].get("dice"),
            f"test_dice_pooled_tta_{other}": fs["pooled"].get("dice")}
    result = {
        "benchmark": "busi",
        **run["facts"],
        "test_dice_mean": mean.get("dice"),
        "test_dice_pooled": pooled.get("dice"),
        "test_mean": {k: mean.get(k) for k in ("iou", "sensitivity", "precision", "hd95")},
        **flip,
        **run_log(run["model"]),
        "plan": plan_summary(run["model"]),
        "loadavg_end": os.getloadavg(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
