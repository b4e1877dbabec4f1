"""Self-training's teacher: a pseudo-label run's frozen model, scored where its student is.

    python bench/pseudo_teacher.py RUN [RUN ...] --data ../shared/data/Dataset003_LeftAtrium
                                   [--out result.json]

RUN is a run directory of ``bench/semisup.py --method pseudo`` (``RUN/model``). The model its last
round froze (``checkpoint_last.pt``'s ``pseudo_model``, the one that made that round's targets)
predicts the test images and the run's unlabelled cases (with the round's ``pseudo_tta``), scored
by the independent evaluator ``../shared/peers/seg_eval.py`` against ``labelsTs`` and against the
labels the benchmark withheld from the unlabelled cases (``labelsTr``): how good the targets were,
and whether the student (the run's own ``predictions_seg_eval.json``) ended above or below the
model that taught it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, peer_eval  # noqa: E402


def teacher_dir(model: Path, dest: Path) -> int:
    """A model directory at ``dest`` that serves ``model``'s frozen pseudo-label network; returns
    the round it made targets for."""
    from medunet.errors import InputError

    ckpt = torch.load(model / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    if ckpt.get("pseudo_model") is None:
        raise InputError("the run holds no frozen pseudo-label model", model / "checkpoint_last.pt",
                         "point at a run of bench/semisup.py --method pseudo that reached a round")
    dest.mkdir(parents=True)
    for name in ("plan.json", "splits.json"):
        shutil.copy(model / name, dest / name)
    torch.save({"model": ckpt["pseudo_model"], "ema_model": None, "state": ckpt["state"]},
               dest / "checkpoint_best.pt")
    return int(ckpt["pseudo_round"])


def score(run: Path, data: Path, work: Path) -> dict:
    """The frozen model's mean test and unlabelled-case metrics, next to the student's test ones."""
    from medunet.datasets import find_dataset
    from medunet.inference import Predictor
    from medunet.planning import Plan

    model = run / "model"
    row: dict = {"run": str(run), "pseudo_round": teacher_dir(model, work / "teacher")}
    split = json.loads((model / "splits.json").read_text())
    unlabeled = set(split["unlabeled"]["cases"])
    dataset = find_dataset(data)
    cases = [c for c in dataset.train if c.case_id in unlabeled and c.label_path is not None]
    images, labels = work / "unlabeled_images", work / "unlabeled_labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for case in cases:  # the unlabelled cases' images and their withheld labels, linked
        for path in case.image_paths:
            (images / path.name).symlink_to(path.resolve())
        (labels / case.label_path.name).symlink_to(case.label_path.resolve())
    predictor = Predictor.load(work / "teacher")
    # the round's own targets: with every mirroring averaged when the run set pseudo_tta
    row["tta"] = tta = Plan.load(model).training["semi"].get("pseudo_tta", "none")
    keys = ("dice", "sensitivity", "precision", "hd95")
    for name, source, truth in (("test", data / "imagesTs", data / "labelsTs"),
                                ("unlabeled", images, labels)):
        preds = work / f"teacher_{name}"
        predictor.predict(source, preds, progress=False, tta=tta)
        scored = peer_eval(preds, truth)
        row[f"teacher_{name}"] = {k: scored["mean"][k] for k in keys} | {"cases": scored["n_cases"]}
    student = run / "predictions_seg_eval.json"
    if student.is_file():
        mean = json.loads(student.read_text())["mean"]
        row["student_test"] = {k: mean[k] for k in keys}
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True,
                    help="the dataset the runs were trained on (imagesTs, labelsTs, labelsTr)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(score(run, args.data, Path(tmp)))
    result = {"benchmark": "pseudo_teacher", "machine": machine(), "results": rows}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    from medunet.errors import InputError

    try:
        main()
    except InputError as e:  # a run without a frozen pseudo-label model: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
