"""The U-Net family on DRIVE, Left Atrium and ISBI EM: every variant (--arch) under one CPU budget.

    python bench/archs.py [--archs unet,resenc,...] [--datasets drive,la,em] [--budget 10m]
                          [--work /tmp/medunet_bench_archs] [--out result.json]

Per variant and dataset: parameters, training iterations per second, prediction seconds per
test case, and the test scores from the independent evaluator in ../shared/peers: DRIVE pooled
F1 (= Dice) and AUC inside the FOV masks, Left Atrium mean Dice and HD95 (mm), ISBI EM
membrane Dice pooled and per slice (the screening's default is DRIVE and LA; ``em`` joins
for the 30-minute comparison of the best variant with the default). Each run is a
plain ``medunet.train`` with ``network.arch`` set (the plan is otherwise the default one), so
the variants differ in the network only. ``resenc-L`` names resenc at size L. Prints JSON
(one entry per run; a run that fails is recorded with its error and the others go on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, budget_args, emit, machine, peer_eval  # noqa: E402

DATASETS = {"drive": "Dataset001_DRIVE", "la": "Dataset003_LeftAtrium", "em": "Dataset002_ISBIEM"}
# pseudo names for the variants' sizes: name -> (arch, extra plan overrides)
ALIASES = {"resenc-L": ("resenc", {"network.size": "L"})}


def _arch_names() -> list[str]:
    from medunet.nets import ARCH_NAMES

    cut = ARCH_NAMES.index("resenc") + 1
    return [*ARCH_NAMES[:cut], "resenc-L", *ARCH_NAMES[cut:]]


def run_one(name: str, key: str, args: argparse.Namespace) -> dict:
    """Train ``name`` on dataset ``key`` within the budget, predict its test split, score it."""
    from medunet.cli import parse_overrides
    from medunet.inference import Predictor
    from medunet.training import train

    arch, extra = ALIASES.get(name, (name, {}))
    ds = DATA / DATASETS[key]
    work = args.work / f"{key}_{name}"
    if work.exists():
        shutil.rmtree(work)
    model, preds = work / "model", work / "predictions"
    overrides = {**parse_overrides(args.overrides), "network.arch": arch, **extra}
    t0 = time.perf_counter()
    res = train(ds, model, time_budget=args.budget, seed=args.seed, overrides=overrides, progress=False,
                report=False)
    t_train = time.perf_counter() - t0
    predictor = Predictor.load(model)
    net = predictor.nets[0]
    n_test = len(list((ds / "imagesTs").iterdir()))
    t1 = time.perf_counter()
    predictor.predict(ds / "imagesTs", preds, save_probabilities=key == "drive", progress=False, tta=args.tta)
    t_pred = time.perf_counter() - t1
    out = {
        "arch": name,
        "dataset": key,
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_seconds": round(t_train, 1),
        "loop_seconds": round(res.seconds, 1),
        "iterations": res.iterations,
        "epochs": res.epochs,
        # steps over the loop's own time (validation included, preprocessing and set-up not)
        "train_it_per_s": round(res.iterations / res.seconds, 3) if res.seconds else None,
        "best_val_dice": res.best_dice,
        "patch_size": predictor.plan.patch_size,
        "batch_size": predictor.plan.batch_size,
        "precision": predictor.precision,
        "predict_seconds_per_case": round(t_pred / max(1, n_test), 3),
    }
    if key == "drive":
        scores = peer_eval(preds, ds / "labelsTs", mask=ds / "masksTs", prob=preds)
        out["test_pooled_in_fov"] = {"f1": scores["pooled"].get("dice"), "auc": scores["pooled"].get("auc")}
    elif key == "em":  # label 1 = membrane
        scores = peer_eval(preds, ds / "labelsTs")
        out["test_membrane_dice"] = {"pooled": scores["pooled"].get("dice"),
                                     "mean": scores["mean"].get("dice")}
    else:
        scores = peer_eval(preds, ds / "labelsTs")
        out["test_mean"] = {"dice": scores["mean"].get("dice"), "hd95": scores["mean"].get("hd95")}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="all", help="comma-separated variants (default all; resenc-L = "
                                                   "resenc at size L); see 'medunet archs'")
    ap.add_argument("--datasets", default="drive,la", help=f"comma-separated: {', '.join(DATASETS)}")
    budget_args(ap, "/tmp/medunet_bench_archs")  # --budget --work --out --set --tta --seed
    ap.set_defaults(budget="10m", tta="none")  # screening; trained with report=False: no TTA choice
    args = ap.parse_args(argv)

    known = _arch_names()
    names = known if args.archs == "all" else [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        sys.exit(f"unknown arch {', '.join(bad)}: use {', '.join(known)}")
    keys = [k.strip() for k in args.datasets.split(",") if k.strip()]
    if any(k not in DATASETS for k in keys):
        sys.exit(f"unknown dataset in {args.datasets}: use {', '.join(DATASETS)}")
    for k in keys:
        if not (DATA / DATASETS[k]).is_dir():
            sys.exit(f"{DATA / DATASETS[k]} not found: this benchmark needs ../shared/data")

    result: dict = {"benchmark": "archs", "budget": args.budget, "overrides": args.overrides, "tta": args.tta,
                    "machine": machine(), "runs": []}
    for key in keys:
        for name in names:
            try:
                result["runs"].append(run_one(name, key, args))
            except Exception as exc:  # one variant failing must not lose the others' numbers
                result["runs"].append({"arch": name, "dataset": key, "error": f"{type(exc).__name__}: {exc}",
                                       "traceback": traceback.format_exc(limit=3)})
            print(f"done {key} {name}", file=sys.stderr)
            if args.out:  # a long screening: keep what is done if the run is stopped
                args.out.write_text(json.dumps(result, indent=2))
    result["loadavg_end"] = os.getloadavg()
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
