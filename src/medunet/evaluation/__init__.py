"""Evaluation: spacing-aware metrics per case and class, summaries, and an HTML report.

    from medunet.evaluation import evaluate
    res = evaluate("pred/", "labelsTs/", mask="masksTs/", report="report.html")
    print(res.metric(1, "dice", kind="pooled"))

Metric definitions and the empty-mask conventions are in :mod:`medunet.evaluation.metrics`,
the two summaries (mean over cases, pooled over pixels) in :mod:`medunet.evaluation.result`.
"""

from medunet.evaluation.metrics import (
    PooledCurve,
    compute_metrics,
    roc_pr_auc,
    surface_distances,
)
from medunet.evaluation.result import EvaluationResult
from medunet.evaluation.runner import evaluate

__all__ = [
    "EvaluationResult",
    "PooledCurve",
    "compute_metrics",
    "evaluate",
    "roc_pr_auc",
    "surface_distances",
]


def __getattr__(name: str):
    # the report pulls in matplotlib; import it only when asked for
    if name == "write_report":
        from medunet.evaluation.report import write_report

        return write_report
    raise AttributeError(name)
