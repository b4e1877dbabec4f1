"""Learning-rate schedules as functions of training progress in [0, 1].

Progress is iterations done / planned, or, with a time budget, seconds spent / budget: the
same cosine curve then fits whatever number of steps the budget allows.
"""

from __future__ import annotations

import math


def cosine_with_warmup(progress: float, lr: float, min_lr: float, warmup: float = 0.02) -> float:
    """Linear warm-up over the first ``warmup`` share, then cosine decay to ``min_lr``."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return lr * max(p / warmup, 0.01)
    q = (p - warmup) / max(1e-12, 1 - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * q))
