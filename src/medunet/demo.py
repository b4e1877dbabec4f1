"""``medunet demo``: the whole pipeline on a synthetic dataset, in about a minute on a CPU."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError

# a folder holding this file was made by the demo: a new demo run may replace DEMO_ENTRIES in it
DEMO_MARKER = ".medunet-demo.json"
DEMO_ENTRIES = ("data", "model", "predictions", "overlay.png")


@dataclass
class DemoResult:
    out_dir: Path
    dice: float
    overlay: Path
    seconds_train: float
    evaluation: object = None  # the EvaluationResult of the test images


def run_demo(out_dir: str | Path = "medunet_demo", time_budget: str = "60s", seed: int = 0,
             n_train: int = 24, n_test: int = 8, size: int = 128, progress: bool = True,
             epochs: int | None = None) -> DemoResult:
    """Generate data, train, predict the held-out images, evaluate and draw an overlay."""
    from medunet.evaluation import evaluate
    from medunet.inference import Predictor
    from medunet.training import train

    out = Path(out_dir)
    claim_demo_dir(out)
    data, model, preds = out / "data", out / "model", out / "predictions"
    make_synthetic_dataset(data, n_train=n_train, n_test=n_test, shape=(size, size), seed=seed)
    overrides = {"training.iterations_per_epoch": 25}
    result = train(data, model, time_budget=None if epochs else time_budget, epochs=epochs,
                   seed=seed, overrides=overrides, progress=progress)
    Predictor.load(model).predict(data / "imagesTs", preds, progress=progress)
    res = evaluate(preds, data / "labelsTs", progress=False)
    overlay = draw_overlay(data, preds, out / "overlay.png")
    return DemoResult(out, res.metric(1, "dice", kind="mean"), overlay, result.seconds, res)


def claim_demo_dir(out: Path) -> None:
    """Make ``out`` the demo's folder: a missing or empty folder gets the marker file, a
    previous demo's folder (it has the marker) loses what the demo wrote there before.

    Anything else is refused: ``-o`` pointing at the user's project must never lose its
    ``data/`` or ``predictions/`` to the demo.
    """
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", out, "choose another --output folder")
    marker = out / DEMO_MARKER
    if out.is_dir() and not marker.is_file() and any(out.iterdir()):
        raise InputError("folder is not empty and is not a medunet demo output", out,
                         "choose a new or empty --output folder")
    for name in DEMO_ENTRIES:
        entry = out / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"written_by": "medunet demo", "entries": list(DEMO_ENTRIES)}) + "\n")


def draw_overlay(data: Path, preds: Path, path: Path, n: int = 4) -> Path:
    """A row of test images with ground-truth (green) and predicted (red) outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medunet.io import read_image, read_label

    cases = sorted(p.name[: -len("_0000.png")] for p in (data / "imagesTs").glob("*_0000.png"))[:n]
    fig, axes = plt.subplots(1, len(cases), figsize=(3 * len(cases), 3.2), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        img, _ = read_image(data / "imagesTs" / f"{case}_0000.png")
        gt, _ = read_label(data / "labelsTs" / f"{case}.png")
        pr, _ = read_label(preds / f"{case}.png")
        ax.imshow(img[0], cmap="gray")
        ax.contour(gt, levels=[0.5], colors="lime", linewidths=1.2)
        ax.contour(pr, levels=[0.5], colors="red", linewidths=1.0, linestyles="--")
        inter = np.logical_and(gt > 0, pr > 0).sum()
        dice = 2 * inter / max(1, (gt > 0).sum() + (pr > 0).sum())
        ax.set_title(f"{case}  Dice {dice:.3f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("medunet demo: ground truth (green) vs prediction (red dashed)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
