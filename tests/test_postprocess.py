"""Post-processing: each step on planted structures, the validation-driven choice, parsing."""

from __future__ import annotations

import numpy as np
import pytest

from medunet.errors import InputError
from medunet.inference.postprocess import (
    apply_postprocessing,
    apply_step,
    choose_postprocessing,
    parse_postprocessing,
)


def _organ(shape=(40, 40), value=1):
    lab = np.zeros(shape, np.uint8)
    lab[8:30, 10:32] = value
    return lab


def test_largest_component_removes_a_planted_blob():
    ref = _organ()
    pred = ref.copy()
    pred[34:37, 2:5] = 1  # spurious blob
    pred[0:2, 0:2] = 2  # another class is left alone
    out = apply_step(pred, 1, "largest_component")
    np.testing.assert_array_equal(out == 1, ref == 1)
    assert (out == 2).sum() == 4
    small = apply_step(pred, 1, "remove_small=10")
    np.testing.assert_array_equal(small == 1, ref == 1)
    assert np.array_equal(apply_step(pred, 1, "remove_small=9"), pred)  # the 3x3 blob has 9 pixels


def test_fill_holes_fills_background_but_keeps_other_classes():
    pred = _organ()
    pred[15:18, 15:18] = 0  # a hole
    pred[20:23, 20:23] = 2  # another structure inside the organ
    out = apply_step(pred, 1, "fill_holes")
    assert (out[15:18, 15:18] == 1).all() and (out[20:23, 20:23] == 2).all()
    assert apply_step(np.zeros((5, 5), np.uint8), 1, "fill_holes").sum() == 0


def test_3d_components_use_full_connectivity():
    vol = np.zeros((6, 6, 6), np.uint8)
    vol[1, 1, 1] = vol[2, 2, 2] = 1  # touching at a corner only: one object
    vol[5, 5, 5] = 1
    out = apply_step(vol, 1, "largest_component")
    assert out.sum() == 2 and out[5, 5, 5] == 0


def test_choose_keeps_only_steps_that_help_each_class():
    rng = np.random.default_rng(0)
    refs, preds = [], []
    for i in range(4):
        ref = np.zeros((48, 48), np.uint8)
        ref[6:26, 6:26] = 1  # one organ per image: largest component helps
        for k in range(5):  # class 2: several separate small structures, some small blobs
            r, c = 30 + 3 * (k % 2), 4 + 9 * k
            ref[r : r + 2 + k % 3, c : c + 3] = 2
        pred = ref.copy()
        pred[40 + i % 3 : 43 + i % 3, 40:43] = 1  # spurious organ fragment
        pred[rng.integers(8, 20), rng.integers(8, 20)] = 0  # a pinhole inside the organ
        refs.append(ref)
        preds.append(pred)
    choice = choose_postprocessing(preds, refs, [0, 1, 2])
    assert set(choice["classes"]) == {"1"}
    assert "largest_component" in choice["classes"]["1"] and "fill_holes" in choice["classes"]["1"]
    d = choice["validation_dice"]
    assert d["1"]["chosen"] == pytest.approx(1.0) and d["1"]["none"] < 1.0
    assert d["2"]["chosen"] == d["2"]["none"] == pytest.approx(1.0)
    assert d["2"]["tried"]["largest_component"] < 1.0  # tried, hurt, not kept
    fixed = [apply_postprocessing(p, choice) for p in preds]
    for f, r in zip(fixed, refs, strict=True):
        np.testing.assert_array_equal(f, r)


def test_choose_prefers_nothing_when_nothing_helps():
    ref = _organ()
    choice = choose_postprocessing([ref.copy()], [ref], [0, 1])
    assert choice["classes"] == {}
    assert apply_postprocessing(ref, choice) is ref


def test_remove_small_is_chosen_for_many_objects_with_noise():
    refs, preds = [], []
    for i in range(3):
        ref = np.zeros((40, 40), np.uint8)
        for k in range(4):
            ref[4 + 9 * k : 10 + 9 * k, 5:12] = 1  # four objects of 42 pixels
        pred = ref.copy()
        pred[3 + 11 * i, 30] = 1  # single-pixel noise
        refs.append(ref)
        preds.append(pred)
    choice = choose_postprocessing(preds, refs, [0, 1])
    assert choice["classes"]["1"][0].startswith("remove_small=")
    assert "largest_component" not in choice["classes"]["1"]


def test_parse_postprocessing():
    assert parse_postprocessing("largest_component, 2:remove_small=50", [0, 1, 2])["classes"] == {
        "1": ["largest_component"], "2": ["largest_component", "remove_small=50"]}
    assert parse_postprocessing("fill_holes", [0, 255])["classes"] == {"255": ["fill_holes"]}
    for bad, msg in [("biggest", "unknown post-processing step"), ("remove_small", "voxel count"),
                     ("7:fill_holes", "label 7"), ("x:fill_holes", "cannot read"),
                     ("fill_holes=3", "takes no value")]:
        with pytest.raises(InputError, match=msg):
            parse_postprocessing(bad, [0, 1, 2])
