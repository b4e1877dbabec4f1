"""A time limit per segmentation job that a worker thread actually honours.

Python cannot stop a thread from outside, so a job past its limit is stopped from inside: the
app runs jobs on a copy of the Predictor whose backends check the job's deadline before every
window batch (:func:`with_deadline_checks`), and :func:`run_segmentation` checks it between its
phases. The deadline lives in a thread-local, so the backends (shared by every worker thread)
stay free of per-request state and cost one clock read per batch. The app answers 504 at the
deadline in any case and frees the request's slot; the thread stops at its next check.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_local = threading.local()


class JobCancelled(Exception):
    """Raised inside a job's thread when its deadline has passed or the app gave up on it."""


class JobControl:
    """One job's deadline (monotonic seconds) and a flag the app sets when it stops waiting."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self) -> None:
        """Raise :class:`JobCancelled` once the job is over its time or was given up."""
        if self._cancelled.is_set() or time.monotonic() > self.deadline:
            raise JobCancelled(f"the job took longer than {self.seconds:g} s")

    @contextmanager
    def active(self) -> Iterator[JobControl]:
        """Make this the deadline of the calling thread for the duration of the block."""
        previous = getattr(_local, "control", None)
        _local.control = self
        try:
            self.check()  # a job that waited for a worker past its deadline does no work at all
            yield self
        finally:
            _local.control = previous


def check_deadline() -> None:
    """Raise :class:`JobCancelled` if the calling thread runs a job that is over its limit."""
    control = getattr(_local, "control", None)
    if control is not None:
        control.check()


class DeadlineBackend:
    """A backend (PyTorch or ONNX) that checks the thread's job deadline before each batch.

    Every other attribute (``device``, ``precision``, ``net``, ``name``) is the wrapped one's.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        check_deadline()
        return self.inner(batch)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def with_deadline_checks(predictor):
    """A shallow copy of ``predictor`` whose members' backends check the job deadline.

    The caller's Predictor is left untouched. Predictors nested in it (a cascade's stages) are
    copied the same way; anything without ``members`` (a test double, a custom predictor) is
    returned as it is and is bounded by the app's 504 alone.
    """
    members = getattr(predictor, "members", None)
    if not isinstance(members, list) or not all(dataclasses.is_dataclass(m) for m in members):
        return predictor
    guarded = copy.copy(predictor)
    guarded.members = [m if isinstance(m.backend, DeadlineBackend)
                       else dataclasses.replace(m, backend=DeadlineBackend(m.backend)) for m in members]
    for name, value in vars(predictor).items():
        if name != "members" and value is not predictor and hasattr(value, "members") \
                and hasattr(value, "predict_array"):
            setattr(guarded, name, with_deadline_checks(value))
    return guarded
