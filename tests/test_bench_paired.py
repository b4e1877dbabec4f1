"""bench/paired.py against differences worked out by hand."""

import json

import pytest

from conftest import load_bench


def _write(path, dice: dict) -> None:
    path.mkdir()
    (path / "predictions_seg_eval.json").write_text(
        json.dumps({"per_case": {c: {"dice": v} for c, v in dice.items()}, "mean": {}}))


def test_paired_differences_by_hand(tmp_path):
    _write(tmp_path / "a", {"x": 0.80, "y": 0.90, "z": 0.70, "only_a": 0.1})
    _write(tmp_path / "b", {"x": 0.82, "y": 0.89, "z": 0.76})
    res = load_bench("paired").main([str(tmp_path / "a"), str(tmp_path / "b")])
    row = res["results"][0]
    # differences in points: +2, -1, +6 over the three shared volumes; mean 7/3, variance
    # ((1/3)^2 + (10/3)^2 + (11/3)^2) / 2 = 111/9
    assert row["cases"] == 3 and row["better"] == 2
    assert row["diff_points"] == pytest.approx(7 / 3)
    assert row["se_points"] == pytest.approx((111 / 9 / 3) ** 0.5)
    assert row["base_dice"] == pytest.approx(0.8) and row["dice"] == pytest.approx((0.82 + 0.89 + 0.76) / 3)
    assert 0.0 < row["p_better"] < 0.5
    # the file itself works as well as its run directory, and a run against itself gains nothing
    same = load_bench("paired").main([str(tmp_path / "b" / "predictions_seg_eval.json"), str(tmp_path / "b")])
    assert same["results"][0]["diff_points"] == 0 and same["results"][0]["p_better"] == 1.0
