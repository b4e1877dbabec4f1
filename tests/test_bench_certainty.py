"""bench/certainty.py's counts for one volume, against a hand-worked example."""

import numpy as np
import pytest

from conftest import load_bench


def test_band_counts_by_hand():
    # 1 x 5 voxels, labels 0 0 1 1 0; foreground probabilities 0.05 0.6 0.95 0.4 0.85
    fg = np.array([[0.05, 0.6, 0.95, 0.4, 0.85]])
    probs = np.stack([1 - fg, fg])
    label = np.array([[0, 0, 1, 1, 0]])
    r = load_bench("certainty").band_counts(probs, label, sure=0.9)
    # predicted foreground: voxels 1, 2, 4 -> tp 1 (voxel 2), fp 2 (1, 4), fn 1 (voxel 3)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 1)
    assert r["dice"] == pytest.approx(2 * 1 / (3 + 2))
    # top-class probability under 0.9: voxels 1 (0.6), 3 (0.6), 4 (0.85); voxel 3 is labelled
    assert (r["unsure"], r["unsure_foreground"]) == (3, 1)
    assert r["fp_median_top"] == pytest.approx((0.6 + 0.85) / 2)


def test_band_counts_of_a_perfect_sure_prediction():
    label = np.array([[0, 1], [1, 0]])
    probs = np.stack([label == 0, label == 1]).astype(np.float32)
    r = load_bench("certainty").band_counts(probs, label)
    assert r == {"dice": 1.0, "tp": 2, "fp": 0, "fn": 0, "unsure": 0, "unsure_foreground": 0,
                 "fp_median_top": None}
