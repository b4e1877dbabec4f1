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


def validation_by_epoch(log: Path) -> dict[int, float | None]:
    """``log.csv``'s validation Dice per epoch; None where the epoch was not validated (with
    ``val_every`` > 1 the cell is empty)."""
    with log.open(newline="") as f:
        return {int(r["epoch"]): float(r["val_dice"]) if r["val_dice"] else None for r in csv.DictReader(f)}


def score(run: Path, labels: Path) -> dict:
    """Test Dice and HD95 of both checkpoints of ``run``, with their epochs."""
    from medunet.inference import Predictor

    val = validation_by_epoch(run / "model" / "log.csv")
    row: dict = {"run": str(run), "epochs": max(val, default=0)}
    for which in ("best", "last"):
        ckpt = torch.load(run / "model" / f"checkpoint_{which}.pt", map_location="cpu", weights_only=True)
        epoch = int(ckpt["state"]["epoch"])
        preds = run / f"predictions_{which}"
        Predictor.load(run / "model", checkpoint=which).predict(run / "data" / "imagesTs", preds,
                                                                progress=False, tta="none")
        mean = peer_eval(preds, labels)["mean"]
        row[which] = {"epoch": epoch, "val_dice": val.get(epoch), "test_dice": mean["dice"],
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
