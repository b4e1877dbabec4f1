"""How long does ``medunet.evaluation.evaluate()`` take on the shared datasets? Prints JSON.

    .venv/bin/python bench/eval_speed.py [--data ../shared/data] [--workers 0 1 2] [--repeat 3]

* Left Atrium (3D, 20 test labels, 1.25 mm): each label against a perturbed copy of itself
  (eroded, dilated or shifted by one voxel in turn, written to a temporary folder), with
  HD95, ASSD and surface Dice (2 mm), as a 3D model would be scored.
* DRIVE (2D, 20 test images, FOV mask): the second observer against the first, with ROC-AUC
  and PR-AUC from a probability map made by blurring the second observer's mask.

Each configuration is run ``--repeat`` times and the fastest run is reported (the machine is
shared; the load average before and after is recorded too), then once more with the HTML
report to time that separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from medunet.evaluation import evaluate
from medunet.io import read_label, write_image

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def make_la_predictions(labels: Path, out: Path) -> int:
    """Perturbed copies of the LA test labels: erode, dilate or shift by one voxel in turn."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in labels.iterdir() if p.name.endswith(".nii.gz"))
    for i, f in enumerate(files):
        lab, geom = read_label(f)
        m = lab > 0
        kind = i % 3
        if kind == 0:
            m = ndimage.binary_erosion(m)
        elif kind == 1:
            m = ndimage.binary_dilation(m)
        else:  # shift by one voxel along one axis (no wrap-around)
            ax = i % m.ndim
            shifted = np.zeros_like(m)
            dst = [slice(None)] * m.ndim
            src = [slice(None)] * m.ndim
            dst[ax], src[ax] = slice(1, None), slice(None, -1)
            shifted[tuple(dst)] = m[tuple(src)]
            m = shifted
        write_image(out / f.name, m.astype(np.uint8), geom)
    return len(files)


def make_drive_probabilities(labels: Path, out: Path) -> int:
    """Class-first probability maps (background, vessel) from the blurred 2nd-observer mask."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(labels.glob("*.png"))
    for f in files:
        lab, _ = read_label(f)
        p = ndimage.gaussian_filter(lab.astype(np.float32), 1.5)
        np.savez(out / f"{f.stem}.npz", probabilities=np.stack([1.0 - p, p]))
    return len(files)


def _time(label: str, repeat: int, **kwargs) -> dict:
    best, res = float("inf"), None
    load_before = _load()
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = evaluate(progress=False, **kwargs)
        best = min(best, time.perf_counter() - t0)
    n = len(res.cases)
    out = {
        "dataset": label,
        "workers": kwargs.get("workers") or "default",
        "cases": n,
        "seconds": round(best, 3),
        "seconds_per_case": round(best / n, 4),
        "load_before": load_before,
        "load_after": _load(),
        "dice_mean": round(res.metric(1, "dice"), 4),
        "hd95_mean": round(res.metric(1, "hd95"), 4),
        "nsd_mean": round(res.metric(1, "nsd"), 4),
        "dice_pooled": round(res.metric(1, "dice", kind="pooled"), 4),
        "accuracy_pooled": round(res.metric(1, "accuracy", kind="pooled"), 4),
    }
    if "roc_auc" in res.metrics:
        out["roc_auc_pooled"] = round(res.metric(1, "roc_auc", kind="pooled"), 4)
        out["pr_auc_pooled"] = round(res.metric(1, "pr_auc", kind="pooled"), 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="process counts to time; 0 = evaluate()'s default (adaptive)")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    la = a.data / "Dataset003_LeftAtrium"
    drive = a.data / "Dataset001_DRIVE"
    if not la.is_dir() or not drive.is_dir():
        sys.exit(f"datasets not found under {a.data}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        make_la_predictions(la / "labelsTs", tmp_p / "la_pred")
        make_drive_probabilities(drive / "labelsTs_2ndObserver", tmp_p / "drive_probs")
        # 2 mm surface-Dice tolerance: under two voxels of 1.25 mm
        la_args = dict(pred=tmp_p / "la_pred", gt=la / "labelsTs", tolerance=2.0)
        drive_args = dict(pred=drive / "labelsTs_2ndObserver", gt=drive / "labelsTs",
                          mask=drive / "masksTs", probs=tmp_p / "drive_probs")
        for w in (w or None for w in a.workers):
            runs.append(_time("LeftAtrium test (3D, HD95 + NSD)", a.repeat, workers=w, **la_args))
            runs.append(_time("DRIVE test (2D, FOV, AUC)", a.repeat, workers=w, **drive_args))
        reports = {}
        for name, kw in (("LeftAtrium", la_args), ("DRIVE", drive_args)):
            images = (la if name == "LeftAtrium" else drive) / "imagesTs"
            t0 = time.perf_counter()
            evaluate(progress=False, workers=1, report=tmp_p / f"{name}.html", images=images, **kw)
            reports[name] = {
                "seconds_with_report": round(time.perf_counter() - t0, 3),
                "report_bytes": (tmp_p / f"{name}.html").stat().st_size,
            }
    result = {
        "benchmark": "eval_speed",
        "command": " ".join(["python bench/eval_speed.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "runs": runs,
        "report": reports,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
