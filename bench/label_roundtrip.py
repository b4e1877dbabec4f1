"""How much of a dataset's labels survives a coarser working resolution: each training label
down-sampled by a factor and back (linear, threshold 0.5), Dice against the original.

    python bench/label_roundtrip.py Dataset004_BUSI [--factors 1.5 2 3 4 6 8] [--cases 200] [--out r.json]

The upper bound coarsening puts on the Dice of any model working at that factor (the planner's
resolution rule, planning/scale.py). Data: ../shared/data/<dataset>. Prints JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, emit, machine  # noqa: E402


def roundtrip_dice(mask: np.ndarray, factor: float) -> float:
    """Dice of ``mask`` against itself down-sampled by ``factor`` and back (linear, > 0.5)."""
    m = mask.astype(np.float32)
    small = ndimage.zoom(m, 1 / factor, order=1, grid_mode=True, mode="grid-constant")
    back = ndimage.zoom(small, [a / b for a, b in zip(m.shape, small.shape, strict=True)], order=1,
                        grid_mode=True, mode="grid-constant") > 0.5
    total = int(mask.sum()) + int(back.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(back & mask)) / total


def main(argv: list[str] | None = None) -> dict:
    from medunet.io import read_label

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--factors", type=float, nargs="+", default=[1.5, 2, 3, 4, 6, 8])
    ap.add_argument("--cases", type=int, default=200, help="the first N training labels, sorted")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    files = sorted((DATA / args.dataset / "labelsTr").iterdir())[: args.cases]
    scores: dict[float, list[float]] = {f: [] for f in args.factors}
    for path in files:
        label, _ = read_label(path)
        mask = np.squeeze(label) > 0
        for f in args.factors:
            scores[f].append(roundtrip_dice(mask, f))
    result = {"benchmark": "label_roundtrip", "dataset": args.dataset, "cases": len(files),
              "factors": {str(f): {"mean": round(float(np.mean(v)), 4),
                                   "p10": round(float(np.percentile(v, 10)), 4),
                                   "min": round(float(np.min(v)), 4)} for f, v in scores.items()},
              "machine": machine()}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
