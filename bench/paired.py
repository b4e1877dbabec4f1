"""Two runs' test Dice compared volume by volume (the paired rows of BENCHMARKS.md).

    python bench/paired.py BASE_RUN OTHER_RUN [OTHER_RUN ...] [--out result.json]

A RUN is a run directory of ``bench/semisup.py`` (or any folder) holding the independent
evaluator's ``predictions_seg_eval.json``, or that file itself. For each OTHER: the mean of the
per-volume Dice differences OTHER - BASE, its standard error, how many volumes gained, and the
one-sided paired t-test's p that OTHER is better (``evaluation.metrics.paired_p``). Mean Dice alone
hides whether a gain is every volume's or a few volumes' large ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402


def per_case(run: Path) -> dict[str, float]:
    """Dice per test volume from the evaluator's JSON (``per_case`` keyed by case id)."""
    path = run / "predictions_seg_eval.json" if run.is_dir() else run
    return {case: float(m["dice"]) for case, m in json.loads(path.read_text())["per_case"].items()}


def compare(base: dict[str, float], other: dict[str, float]) -> dict:
    """OTHER - BASE over the volumes both scored (mean and standard error in Dice points)."""
    from medunet.evaluation.metrics import paired_p

    cases = sorted(set(base) & set(other))
    a, b = np.array([other[c] for c in cases]), np.array([base[c] for c in cases])
    d = 100 * (a - b)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"cases": len(cases), "base_dice": float(b.mean()), "dice": float(a.mean()),
            "diff_points": float(d.mean()), "se_points": se, "better": int((d > 0).sum()),
            "p_better": paired_p(a, b)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("others", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    base = per_case(args.base)
    rows = [{"base": str(args.base), "run": str(o), **compare(base, per_case(o))} for o in args.others]
    result = {"benchmark": "paired", "results": rows}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
