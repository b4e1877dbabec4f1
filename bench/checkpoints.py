"""Which checkpoint generalises: a finished run's best-by-validation and last weights on its test set.

    python bench/checkpoints.py RUN [RUN ...] --labels ../shared/data/Dataset003_LeftAtrium/labelsTs
                                [--out result.json]

RUN is a run directory of a ``bench/`` script: ``RUN/model`` (a model directory) and
``RUN/data/imagesTs``. Both checkpoints predict the test images (no TTA), scored by the independent
evaluator ``../shared/peers/seg_eval.py``; the row also names the epoch each checkpoint holds and
the validation Dice that chose the best one, read from ``log.csv``. A run trained before
``checkpoint_best.pt`` became the final choice's (the last weights unless validation shows the best
better case by case) holds the highest single validation score there.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, peer_eval  # noqa: E402


def score(run: Path, labels: Path) -> dict:
    """Test Dice and HD95 of both checkpoints of ``run``, with their epochs."""
    from medunet.inference import Predictor

    with (run / "model" / "log.csv").open(newline="") as f:
        val = [float(r["val_dice"]) for r in csv.DictReader(f)]
    row: dict = {"run": str(run), "epochs": len(val)}
    for which in ("best", "last"):
        ckpt = torch.load(run / "model" / f"checkpoint_{which}.pt", map_location="cpu", weights_only=True)
        epoch = int(ckpt["state"]["epoch"])
        preds = run / f"predictions_{which}"
        Predictor.load(run / "model", checkpoint=which).predict(run / "data" / "imagesTs", preds,
                                                                progress=False, tta="none")
        mean = peer_eval(preds, labels)["mean"]
        row[which] = {"epoch": epoch, "val_dice": val[epoch - 1], "test_dice": mean["dice"],
                      "test_hd95": mean["hd95"]}
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", type=Path, required=True, help="the test labels (labelsTs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = [score(run, args.labels) for run in args.runs]
    result = {"benchmark": "checkpoints", "machine": machine(), "results": rows}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
