"""Fingerprint a dataset and derive a Plan (the single source of truth, saved as plan.json)."""

from medunet.planning.plan import (
    CT_WINDOWS,
    Plan,
    fingerprint_dataset,
    load_overrides,
    make_plan,
    modality,
)
from medunet.planning.prepare import prepare_plan

__all__ = ["CT_WINDOWS", "Plan", "fingerprint_dataset", "load_overrides", "make_plan", "modality",
           "prepare_plan"]
