"""Left Atrium 3D MRI: train the 3D configuration with a time budget, predict the 20 test
volumes, report Dice and HD95 (mm).

    python bench/leftatrium.py --budget 30m [--work /tmp/medunet_bench_la] [--out result.json]

Scores: mean over the 20 test cases of Dice and HD95 (medpy convention, physical units), from
the independent evaluator in ../shared/peers, and from medunet.evaluation as a cross-check.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, budget_args, emit, peer_eval, train_and_predict  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    from medunet.evaluation import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget_args(ap, "/tmp/medunet_bench_la")
    args = ap.parse_args(argv)
    ds = DATA / "Dataset003_LeftAtrium"
    run = train_and_predict(ds, args)
    preds = run["predictions"]
    peer = peer_eval(preds, ds / "labelsTs")
    ours = evaluate(preds, ds / "labelsTs", labels=[1], progress=False, workers=1)
    result = {
        "benchmark": "leftatrium",
        **run["facts"],
        "test_mean": {k: peer["mean"].get(k) for k in ("dice", "iou", "hd95", "asd")},
        "medunet_eval_mean": {k: ours.metric(1, k, kind="mean") for k in ("dice", "hd95", "assd")},
        "loadavg_end": os.getloadavg(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
