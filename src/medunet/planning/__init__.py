"""Fingerprint a dataset and derive a Plan (the single source of truth, saved as plan.json)."""

from medunet.planning.plan import Plan, fingerprint_dataset, make_plan

__all__ = ["Plan", "fingerprint_dataset", "make_plan"]
