"""The result of an evaluation: per-case rows, summaries, and their JSON / CSV / table forms.

Two summaries, because the field uses both:

* ``mean``: mean and standard deviation over cases of each per-case metric (what most 3D
  papers report). NaNs (e.g. HD95 of a case whose prediction is empty) are skipped and
  counted in ``n_nan``; the standard deviation is the population one (ddof=0), as in
  ``seg_eval.py``.
* ``pooled``: the overlap metrics of TP/FP/FN/TN summed over all cases and the AUCs over all
  pixels of all cases (what DRIVE papers report). Distances have no pooled form.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medunet.evaluation.metrics import (
    COUNT_KEYS,
    COUNT_METRICS,
    DISTANCE_METRICS,
    PROB_METRICS,
    VOLUME_METRICS,
    count_metrics,
    is_nan,
)
from medunet.files import atomic_file

# metrics with physical units: printed with fewer decimals
_UNIT_METRICS = {"hd95", "hd", "assd", "vol_gt", "vol_pred", "volume_diff"}
# per-case values that stay in the JSON / CSV but would only crowd the printed table
_TABLE_SKIP = {"vol_gt", "vol_pred"}


def _clean(x: object) -> object:
    """JSON-safe copy: NaN -> None, numpy scalars -> Python, int keys -> str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _atomic_write_text(path: str | Path, text: str) -> Path:
    """Write next to the target and rename, so no half-written file is ever visible."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


@dataclass
class EvaluationResult:
    """Per-case metrics and summaries of one evaluation.

    Attributes:
        cases: ``[{"case": id, "1": {"dice": .., "hd95": .., "tp": .., ...}, ...}, ...]``,
            one dict per case, label keys as strings.
        summary: ``{"mean": {label: {metric: {"mean", "std", "n", "n_nan"}}},
            "pooled": {label: {metric: value}}}``.
        labels: the label values scored.
        metrics: the per-case metric names, in display order.
        meta: inputs, units, tolerance, timings, file paths.
        curves: pooled ROC / PR points per label (for the report; not in ``to_dict()``).
    """

    cases: list[dict]
    summary: dict
    labels: list[int]
    metrics: list[str]
    meta: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict, repr=False)

    def metric(self, label: int | str, name: str, kind: str = "mean") -> float:
        """One summary number, e.g. ``res.metric(1, "dice", kind="pooled")``."""
        if kind not in ("mean", "pooled"):
            raise ValueError("kind must be 'mean' or 'pooled'")
        per_label = self.summary[kind].get(str(label))
        if per_label is None:
            raise KeyError(f"label {label} was not scored (labels: {self.labels})")
        if name not in per_label:
            raise KeyError(f"no {kind} value for metric '{name}'")
        value = per_label[name]
        return float(value["mean"] if kind == "mean" else value)

    def case_values(self, label: int | str, name: str) -> np.ndarray:
        """The per-case values of one metric (NaN where undefined), in case order."""
        key = str(label)
        return np.array([float(c[key][name]) for c in self.cases], dtype=float)

    def to_dict(self) -> dict:
        """JSON-able form; NaN becomes ``null``."""
        return _clean(
            {
                "meta": self.meta,
                "labels": self.labels,
                "metrics": self.metrics,
                "summary": self.summary,
                "cases": self.cases,
            }
        )

    def write_json(self, path: str | Path) -> Path:
        return _atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))

    def write_csv(self, path: str | Path) -> Path:
        """One row per case and label: ``case,label,<metrics>,tp,fp,fn,tn`` (NaN as ``nan``)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        cols = list(self.metrics) + list(COUNT_KEYS)
        w.writerow(["case", "label", *cols])
        for c in self.cases:
            for lab in self.labels:
                row = c[str(lab)]
                w.writerow([c["case"], lab, *(_csv_value(row.get(k)) for k in cols)])
        return _atomic_write_text(path, buf.getvalue())

    def metric_label(self, metric: str) -> str:
        """Display name with its unit: distances in the spacing's unit, volumes in unit^ndim,
        NSD with its tolerance; shared by the terminal table and the HTML report."""
        unit = self.meta.get("distance_units", "")
        if metric == "nsd":
            return f"nsd @ {self.meta.get('tolerance', 1.0):g} {unit}".rstrip()
        if metric not in _UNIT_METRICS or not unit:
            return metric
        if metric in ("vol_gt", "vol_pred", "volume_diff"):
            ndim = len(next(iter(self.meta.get("spacing", {}).values()), [])) or 2
            return f"{metric} ({unit}^{ndim})"
        return f"{metric} ({unit})"

    def table(self):
        """A rich ``Table``: one row per metric, mean +- std and pooled value per label."""
        from rich.table import Table

        t = Table(
            title=f"Evaluation of {len(self.cases)} case(s)",
            caption=self._nan_caption() or None,
            caption_justify="left",
        )
        t.add_column("metric", style="bold")
        for lab in self.labels:
            t.add_column(f"label {lab}: mean ± std", justify="right")
            t.add_column("pooled", justify="right")
        for m in self.metrics:
            if m in _TABLE_SKIP:
                continue
            name = self.metric_label(m)
            cells = []
            for lab in self.labels:
                s = self.summary["mean"][str(lab)][m]
                cells.append(f"{format_value(m, s['mean'])} ± {format_value(m, s['std'])}")
                pooled = self.summary["pooled"][str(lab)].get(m)
                cells.append("-" if pooled is None else format_value(m, pooled))
            t.add_row(name, *cells)
        return t

    def _nan_caption(self) -> str:
        parts = []
        for lab in self.labels:
            for m in self.metrics:
                n = self.summary["mean"][str(lab)][m]["n_nan"]
                if n:
                    parts.append(f"label {lab} {m}: {n}")
        if not parts:
            return ""
        return "NaN cases left out of the means (undefined, e.g. one mask empty): " + ", ".join(
            parts
        )


def _csv_value(v: object) -> object:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return repr(v) if isinstance(v, float) else v


def format_value(metric: str, v: float | None) -> str:
    """Numbers as printed in tables: 4 decimals for ratios, 2 for physical units."""
    if v is None or is_nan(v):
        return "nan"
    if metric in _UNIT_METRICS:
        return f"{v:.2f}" if abs(v) < 1e5 else f"{v:.4g}"
    return f"{v:.4f}"


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    ok = ~np.isnan(a)
    n = int(ok.sum())
    return {
        "mean": float(a[ok].mean()) if n else float("nan"),
        "std": float(a[ok].std()) if n else float("nan"),
        "n": n,
        "n_nan": int(a.size - n),
    }


def build_result(
    outputs: list[dict],
    labels: list[int],
    meta: dict,
    curves: dict[int, dict],
    with_probs: bool,
) -> EvaluationResult:
    """Assemble per-case rows and both summaries from the workers' outputs."""
    metrics = list(COUNT_METRICS) + list(VOLUME_METRICS) + list(DISTANCE_METRICS)
    if with_probs:
        metrics += list(PROB_METRICS)
    cases = []
    for o in outputs:
        row: dict = {"case": o["case"]}
        for lab in labels:
            m = o["metrics"][lab]
            row[str(lab)] = {k: m[k] for k in (*metrics, *COUNT_KEYS)}
        cases.append(row)
    mean: dict = {}
    pooled: dict = {}
    for lab in labels:
        key = str(lab)
        mean[key] = {m: _mean_std([c[key][m] for c in cases]) for m in metrics}
        tot = {k: int(sum(c[key][k] for c in cases)) for k in COUNT_KEYS}
        p: dict = dict(count_metrics(tot["tp"], tot["fp"], tot["fn"], tot["tn"]))
        if with_probs and lab in curves:
            p["roc_auc"] = float(curves[lab]["roc_auc"])
            p["pr_auc"] = float(curves[lab]["pr_auc"])
        p.update(tot)
        pooled[key] = p
    return EvaluationResult(
        cases=cases,
        summary={"mean": mean, "pooled": pooled},
        labels=list(labels),
        metrics=metrics,
        meta=meta,
        curves=curves,
    )
