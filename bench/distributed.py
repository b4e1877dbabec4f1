"""Data-parallel training on one CPU: 1 process x N threads against N Gloo processes x 1 thread.

    python bench/distributed.py --budget 10m [--nproc 2] [--work /tmp/bench_ddp] [--out r.json]

Both train DRIVE with every default and the same time budget through the command line
(``medunet train`` and ``medunet train --nproc N``), then predict the 20 test images with the
same command and are scored in the FOV by ../shared/peers/seg_eval.py. Reports training steps
per second (validation excluded), patches per second (steps x processes x batch) and the test
F1/AUC, whatever they show: on a 2-core CPU the two processes share the same cores, so the
comparison measures Gloo's overhead against one process's threading.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, emit, log_steps, machine, peer_eval  # noqa: E402


def run(name: str, nproc: int, args: argparse.Namespace) -> dict:
    ds = DATA / "Dataset001_DRIVE"
    model, preds = args.work / name / "model", args.work / name / "predictions"
    shutil.rmtree(args.work / name, ignore_errors=True)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "medunet", "train", str(ds), "-o", str(model), "--time-budget", args.budget,
           "--quiet", "--no-report", "--nproc", str(nproc)]
    subprocess.run(cmd, env=env, check=True)
    log = log_steps(model)
    from medunet.planning import Plan

    plan = Plan.load(model)
    subprocess.run([sys.executable, "-m", "medunet", "predict", str(model), str(ds / "imagesTs"), "-o",
                    str(preds), "--save-probabilities", "--quiet"], env={**os.environ}, check=True)
    scores = peer_eval(preds, ds / "labelsTs", mask=ds / "masksTs", prob=preds)
    return {"processes": nproc, "threads_each": threads, "steps": log["steps"], "epochs": log["epochs"],
            "steps_per_second": log["steps_per_second"],
            "patches_per_second": round(log["steps"] * nproc * plan.batch_size / log["step_seconds"], 2),
            "global_batch": nproc * plan.batch_size, "best_val_dice": log["best_val_dice"],
            "test_f1_in_fov": scores["pooled"].get("dice"), "test_auc_in_fov": scores["pooled"].get("auc")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_ddp"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = {"benchmark": "distributed", "dataset": "Dataset001_DRIVE", "budget": args.budget,
              "machine": machine()}
    result["one_process"] = run("one", 1, args)
    result["gloo"] = run(f"gloo{args.nproc}", args.nproc, args)
    result["loadavg_end"] = list(os.getloadavg())
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
