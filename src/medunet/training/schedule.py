"""Learning-rate schedules as functions of training progress in [0, 1].

Progress is iterations done / planned, or, with a time budget, seconds spent / budget: the
same curve then fits whatever number of steps the budget allows (nnU-Net's schedules count
epochs instead, which a wall-clock budget cannot know in advance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from medunet.errors import InputError

SCHEDULES = ("cosine", "poly", "step")


def cosine_with_warmup(progress: float, lr: float, min_lr: float, warmup: float = 0.02) -> float:
    """Linear warm-up over the first ``warmup`` share, then cosine decay to ``min_lr``."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return lr * max(p / warmup, 0.01)
    q = (p - warmup) / max(1e-12, 1 - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * q))


def poly(progress: float, lr: float, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay: ``lr * (1 - progress) ** exponent`` (0 at the end)."""
    p = min(max(progress, 0.0), 1.0)
    return lr * (1.0 - p) ** exponent


def step_decay(progress: float, lr: float, milestones: Sequence[float] = (0.5, 0.75),
               gamma: float = 0.1) -> float:
    """Multiply by ``gamma`` at each milestone (a share of the run) that has been passed."""
    passed = sum(1 for m in milestones if progress >= m)
    return lr * gamma ** passed


def learning_rate(training: dict, progress: float) -> float:
    """The plan's schedule (``training.schedule``) at ``progress``."""
    kind = training.get("schedule", "cosine")
    lr = float(training["lr"])
    if kind == "cosine":
        return cosine_with_warmup(progress, lr, float(training.get("min_lr", 1e-6)),
                                  float(training.get("warmup_fraction", 0.02)))
    if kind == "poly":
        return poly(progress, lr, float(training.get("poly_exponent", 0.9)))
    if kind == "step":
        return step_decay(progress, lr, training.get("step_milestones", (0.5, 0.75)),
                          float(training.get("step_gamma", 0.1)))
    raise InputError(f"unknown schedule '{kind}'", "plan.json",
                     f"set training.schedule to one of {', '.join(SCHEDULES)}")
