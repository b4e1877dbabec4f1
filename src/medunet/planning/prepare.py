"""From a dataset folder to its plan in one call: find and check the data, fingerprint it and
plan, with the user's ``--set`` values applied where they belong."""

from __future__ import annotations

from pathlib import Path

from medunet.datasets import Dataset, find_dataset, validate_dataset
from medunet.planning.plan import Plan, fingerprint_dataset, make_plan


def prepare_plan(data: str | Path | Dataset, preset: str = "default", overrides: dict | None = None,
                 **plan_options) -> tuple[Dataset, Plan]:
    """Find and validate the dataset, fingerprint it and derive the (overridden) plan.

    ``data``: the dataset folder, or a :class:`Dataset` already found (semi-supervised training
    passes one whose unlabelled images were taken out). ``plan_options`` go to
    :func:`medunet.planning.make_plan` (e.g. ``config``, ``ct_window``).
    """
    dataset = data if isinstance(data, Dataset) else find_dataset(data)
    facts = validate_dataset(dataset)
    overrides = dict(overrides or {})
    # the working resolution drives the patch, batch and network: plan from it, not after it
    derived = {"spacing": "spacing", "resolution.factor": "resolution_factor"}
    for key, option in derived.items():
        if key in overrides:
            plan_options[option] = overrides.pop(key)
    plan = make_plan(dataset, fingerprint_dataset(dataset, facts), preset=preset, **plan_options)
    if overrides:
        plan = plan.override(overrides)
    return dataset, plan
