"""bench/semisup.py's summary: the numbers BENCHMARKS.md's semi-supervised readings rest on."""

from __future__ import annotations

import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def semisup():
    return load_bench("semisup")


def _row(labels: int, run: str, dice: float) -> dict:
    return {"labels": labels, "run": run, "test_mean": {"dice": dice}}


def test_summary_over_seeds_and_the_gap_closed(semisup):
    """Two seeds at 8 labels: labelled 0.88 and 0.90 (mean 0.89), semi 0.90 and 0.91 (0.905),
    all 0.92 twice: semi closes (0.905 - 0.89) / (0.92 - 0.89) = half of the gap. At 16 labels
    without an all-labelled run there is no gap to report."""
    rows = [_row(8, "labelled", 0.88), _row(8, "semi", 0.90), _row(8, "all", 0.92),
            _row(8, "labelled", 0.90), _row(8, "semi", 0.91), _row(8, "all", 0.92),
            _row(16, "labelled", 0.90), _row(16, "semi", 0.91)]
    s = semisup.summary(rows)
    assert s["8"]["labelled"] == {"seeds": 2, "dice_mean": pytest.approx(0.89), "dice_min": 0.88,
                                  "dice_max": 0.90}
    assert s["8"]["semi"]["dice_mean"] == pytest.approx(0.905)
    assert s["8"]["gap_closed"] == pytest.approx(0.5)
    assert "gap_closed" not in s["16"] and s["16"]["semi"]["seeds"] == 1
