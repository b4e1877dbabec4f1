"""Resampling, cropping and the preprocessing pipeline (crop -> resample -> normalise -> revert)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from medunet.io import image as io_image
from medunet.planning import Plan
from medunet.preprocessing.crop import crop, is_full, nonzero_bbox, uncrop
from medunet.preprocessing.pipeline import (
    PreprocessInfo,
    needs_resampling,
    preprocess_case,
    revert_labels,
    revert_probabilities,
    revert_to_indices,
)
from medunet.preprocessing.resample import (
    resample_array,
    resample_image,
    resample_label,
    resample_probabilities,
    target_shape,
)


def _plan(spacing, preprocessing=None, k=2, dims=3) -> Plan:
    return Plan(dataset_name="t", dim=dims, in_channels=1, channel_names=["MRI"],
                label_names=[f"c{i}" for i in range(k)], label_values=list(range(k)), spacing=list(spacing),
                median_shape=[16] * dims, normalization=[{"scheme": "none"}], patch_size=[16] * dims,
                batch_size=2, network={"preset": "default", "features": [4, 8], "strides": [2]},
                preprocessing=preprocessing or {})


# ---------------------------------------------------------------- resample


def test_target_shape_and_output_shapes():
    assert target_shape((10, 12, 5), (1, 1, 2), (0.5, 0.5, 1)) == [20, 24, 10]
    assert target_shape((7, 3), (1.0, 1.0), (3.0, 3.0)) == [2, 1]
    img = np.random.default_rng(0).normal(size=(2, 10, 12, 5)).astype(np.float64)
    out = resample_image(img, (1, 1, 2), (0.5, 0.5, 1))
    assert out.shape == (2, 20, 24, 10) and out.dtype == np.float32
    assert resample_image(img, None, None, shape=(9, 9, 9), order=1).shape == (2, 9, 9, 9)
    lab = resample_label(np.zeros((10, 12, 5), np.uint8), (1, 1, 2), (2, 2, 2))
    assert lab.shape == (5, 6, 5) and lab.dtype == np.uint8
    probs = resample_probabilities(np.full((3, 4, 4), 1 / 3, np.float32), (8, 6))
    assert probs.shape == (3, 8, 6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)
    with pytest.raises(ValueError):
        target_shape((4, 4), (1, 1, 1), (1, 1))


@pytest.mark.parametrize("order", [1, 3])
def test_linear_ramp_stays_a_ramp(order):
    ramp = np.broadcast_to(np.arange(32, dtype=np.float32)[:, None, None], (32, 5, 4)).copy()
    out = resample_array(ramp, (64, 5, 4), order=order)
    # output voxel j samples the input at (j + 0.5) / 2 - 0.5 (cell-centred grids)
    expected = np.clip((np.arange(64) + 0.5) / 2 - 0.5, 0, 31)
    # the edge extension bends a spline's ends (decaying by 0.27 per voxel): check the middle
    inner = slice(16, 48) if order == 3 else slice(None)
    np.testing.assert_allclose(out[inner, 2, 1], expected[inner], atol=1e-4)
    assert np.allclose(out, out[:, :1, :1])  # constant along the untouched axes


@pytest.mark.parametrize("order", [1, 3])
def test_matches_scipy_zoom_reference(order):
    x = np.random.default_rng(1).normal(size=(13, 9, 7)).astype(np.float32)
    shape = (26, 5, 11)
    ref = ndi.zoom(x, np.array(shape) / x.shape, order=order, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(resample_array(x, shape, order=order), ref, atol=2e-5)


def test_nearest_labels_keep_their_values():
    rng = np.random.default_rng(2)
    lab = rng.choice(np.array([0, 1, 2], np.uint8), size=(10, 8, 6))
    down = resample_label(lab, (1, 1, 1), (2, 2, 2))
    np.testing.assert_array_equal(down, lab[1::2, 1::2, 1::2])  # the voxel holding each centre
    for mode in ("nearest", "linear"):
        up = resample_label(lab, (1, 1, 1), (0.7, 0.6, 1.3), mode=mode, num_classes=3)
        assert set(np.unique(up)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="label mode"):
        resample_label(lab, (1, 1, 1), (2, 2, 2), mode="cubic")


def test_linear_label_mode_by_hand():
    lab = np.zeros((3, 8), np.uint8)
    lab[:, 4:] = 1
    lab[1, 6:] = 2
    up = resample_label(lab, (1, 1), (1, 0.5), mode="linear", num_classes=3)
    expected = np.repeat(lab, 2, axis=1)  # an exact 2x upsampling puts each boundary midway
    np.testing.assert_array_equal(up, expected)
    # downsampling 4 -> 1 along an axis: the class with most of the cell's weight wins
    lab = np.array([[0, 1, 1, 1]], np.uint8)
    assert resample_label(lab, (1, 1), (1, 4), mode="linear").tolist() == [[1]]


def test_separate_z_uses_order_zero_on_the_thick_axis():
    z_values = np.array([0.0, 10.0, 20.0, 30.0], np.float32)
    img = np.broadcast_to(z_values, (1, 6, 6, 4)).copy()
    img[0] += np.arange(6, dtype=np.float32)[:, None, None]  # an in-plane ramp along axis 0
    sep = resample_image(img, (1, 1, 3), (0.5, 1, 1.5), order=1, separate_z=2)
    assert sep.shape == (1, 12, 6, 8)
    for k in range(8):  # slice k copies source slice k // 2 (no values between slices)
        np.testing.assert_allclose(sep[0, :, :, k] - sep[0, :, :1, k], 0)
        np.testing.assert_allclose(sep[0, 3:9, 0, k], (np.arange(3, 9) + 0.5) / 2 - 0.5 + z_values[k // 2],
                                   atol=1e-5)
    joint = resample_image(img, (1, 1, 3), (0.5, 1, 1.5), order=1)
    assert not np.allclose(joint, sep)  # without separate_z the slices are blended
    probs = np.stack([img[0] / 60, 1 - img[0] / 60])
    p = resample_probabilities(probs, (12, 6, 8), separate_z=2)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(p[0] * 60, sep[0], atol=1e-4)


def test_keep_zero_keeps_the_background_exactly_zero():
    x = np.zeros((1, 30, 30, 12), np.float32)
    x[0, 10:20, 10:20, 3:9] = 100.0
    ringing = resample_image(x, (1, 1, 1), (0.7, 0.7, 0.7), order=3)
    assert (ringing != 0).mean() > 0.9  # a spline leaves no exact zero behind
    kept = resample_image(x, (1, 1, 1), (0.7, 0.7, 0.7), order=3, keep_zero=True)
    nearest = resample_array(x[0], kept.shape[1:], order=0)
    np.testing.assert_array_equal(kept[0] != 0, nearest != 0)
    np.testing.assert_array_equal(kept[0][nearest != 0], ringing[0][nearest != 0])


# ---------------------------------------------------------------- crop


def test_nonzero_bbox_crop_and_uncrop_by_hand():
    img = np.zeros((2, 10, 8, 6), np.float32)
    img[0, 2:5, 3, 1] = 1
    img[1, 7, 6, 4] = -2  # another channel widens the box
    bbox = nonzero_bbox(img)
    assert bbox == [[2, 8], [3, 7], [1, 5]]
    c = crop(img, bbox)
    assert c.shape == (2, 6, 4, 4) and np.shares_memory(c, img)
    assert crop(img[0], bbox).shape == (6, 4, 4)
    back = uncrop(c, bbox, img.shape[1:], fill=0)
    np.testing.assert_array_equal(back, img)
    lab = uncrop(np.ones((6, 4, 4), np.uint8), bbox, (10, 8, 6), fill=3)
    assert lab.dtype == np.uint8 and lab.sum() == 6 * 4 * 4 + 3 * (10 * 8 * 6 - 6 * 4 * 4)
    probs = uncrop(np.full((2, 6, 4, 4), 0.5, np.float32), bbox, (10, 8, 6), fill=[1.0, 0.0])
    assert probs[:, 0, 0, 0].tolist() == [1.0, 0.0] and probs[:, 4, 4, 2].tolist() == [0.5, 0.5]
    assert nonzero_bbox(np.zeros((1, 4, 5))) == [[0, 4], [0, 5]]  # all zero: the whole image
    assert is_full([[0, 4], [0, 5]], (4, 5)) and not is_full(bbox, (10, 8, 6))


# ---------------------------------------------------------------- pipeline


def _case():
    img = np.zeros((1, 30, 26, 10), np.float32)
    img[0, 3:27, 4:24, 1:9] = -1.0
    lab = np.zeros((30, 26, 10), np.uint8)
    lab[10:20, 8:18, 3:7] = 1
    img[0][lab == 1] = 2.0
    return img, lab


def test_preprocess_and_revert_round_trip():
    img, lab = _case()
    plan = _plan((1.0, 1.0, 1.5), {"crop_nonzero": True, "resample": True, "image_order": 3,
                                   "label_mode": "linear", "separate_z": 2})
    out, seg, info = preprocess_case(img, (0.7, 0.9, 3.0), plan, label=lab)
    assert info.bbox == [[3, 27], [4, 24], [1, 9]] and info.shape_after_crop == [24, 20, 8]
    expected = target_shape((24, 20, 8), (0.7, 0.9, 3.0), (1, 1, 1.5))
    assert info.shape_after_resample == expected == [17, 18, 16]
    assert out.shape == (1, 17, 18, 16) and out.dtype == np.float32
    assert seg.shape == (17, 18, 16) and seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1}
    assert info.target_spacing == [1.0, 1.0, 1.5] and info.original_spacing == [0.7, 0.9, 3.0]
    assert PreprocessInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    back = revert_labels(seg, info)
    assert back.shape == lab.shape
    boundary = ndi.binary_dilation(lab == 1) & ~ndi.binary_erosion(lab == 1)
    np.testing.assert_array_equal(back[~boundary], lab[~boundary])  # equal up to boundary voxels
    assert (back != lab).sum() <= 0.25 * boundary.sum()
    # probabilities: back on the original grid, background outside the box
    probs = np.stack([1.0 - seg, seg]).astype(np.float32)
    full = revert_probabilities(probs, info)
    assert full.shape == (2, *lab.shape)
    np.testing.assert_allclose(full.sum(0), 1.0, atol=1e-6)
    assert full[0, 0, 0, 0] == 1.0 and full[1, :3].max() == 0.0
    np.testing.assert_array_equal(revert_to_indices(probs, info), full.argmax(0))


def test_without_preprocessing_nothing_changes():
    img, lab = _case()
    out, seg, info = preprocess_case(img, (0.7, 0.9, 3.0), _plan((1.0, 1.0, 1.5)), label=lab)
    np.testing.assert_array_equal(out, img)  # old plans: no crop, no resampling ("none" norm)
    np.testing.assert_array_equal(seg, lab)
    assert not info.cropped and not info.resampled and info.target_spacing == [0.7, 0.9, 3.0]
    # within 1 % of the target: not resampled even when the plan resamples
    plan = _plan((0.7, 0.9, 3.0), {"resample": True})
    _, _, info = preprocess_case(img, (0.703, 0.9, 2.98), plan)
    assert not info.resampled
    assert needs_resampling((1.0, 1.02), (1.0, 1.0)) and not needs_resampling((1.0, 1.005), (1.0, 1.0))
    np.testing.assert_array_equal(revert_labels(lab, info), lab)


def test_normalise_runs_after_resampling():
    img, _ = _case()
    plan = _plan((1.4, 1.8, 3.0), {"crop_nonzero": True, "resample": True})
    plan.normalization = [{"scheme": "zscore"}]
    out, _, info = preprocess_case(img, (0.7, 0.9, 3.0), plan)
    assert out.shape[1:] == tuple(info.shape_after_resample) == (12, 10, 8)
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-3
    # masked z-scoring: the zero background survives cubic resampling as exact zeros
    plan = _plan((0.5, 0.5, 1.5), {"resample": True})
    plan.normalization = [{"scheme": "zscore", "nonzero_mask": True}]
    raw, _, _ = preprocess_case(img, (0.7, 0.9, 3.0), plan, normalise=False)
    assert 0.4 < (raw == 0).mean() < 0.6  # about the 51 % of zero voxels the case has


def test_output_grid_above_the_voxel_limit_is_refused_before_allocating(monkeypatch):
    """Issue 17: an 8^3 image whose header says 250 mm, resampled to 1 mm, asked for 2000^3
    float32 voxels (32 GB). The grid is checked against the voxel limit first."""
    import tracemalloc

    from medunet.errors import InputError

    image = np.random.default_rng(0).normal(size=(1, 8, 8, 8)).astype(np.float32)
    tracemalloc.start()
    with pytest.raises(InputError) as err:
        resample_image(image, (250.0, 250.0, 250.0), (1.0, 1.0, 1.0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20
    assert str(err.value) == (
        "resampling from spacing (250.0, 250.0, 250.0) to (1.0, 1.0, 1.0) would make a grid of "
        "2000x2000x2000 (8,000,000,000 values), more than the limit of 1,073,741,824 — check the voxel "
        "spacing in the image's header (a wrong unit or a typo is the usual cause), or raise the limit "
        "(medunet --max-voxels N) on a machine with the memory")
    assert err.value.exit_code == 2
    with pytest.raises(InputError, match=r"grid of 2000x2000x2000 \(8,000,000,000 values\)"):
        resample_label(np.zeros((8, 8, 8), np.uint8), (250.0,) * 3, (1.0,) * 3, mode="linear")
    with pytest.raises(InputError, match=r"grid of 2000x2000x2000 \(8,000,000,000 values\)"):
        resample_probabilities(np.full((2, 8, 8, 8), 0.5, np.float32), (2000, 2000, 2000))
    with pytest.raises(InputError, match=r"grid of 2000x2000x2000 \(8,000,000,000 values\)"):
        resample_array(image[0], (2000, 2000, 2000))
    plan = _plan([1.0, 1.0, 1.0], {"resample": True})  # the pipeline the cache and the Predictor run
    with pytest.raises(InputError, match="would make a grid of 2000x2000x2000"):
        preprocess_case(image, [250.0, 250.0, 250.0], plan)
    monkeypatch.setattr(io_image, "MAX_VOXELS", 2 * 10 * 12 * 5 - 1)  # channels count too
    with pytest.raises(InputError, match=r"grid of 10x12x5 x 2 channels \(1,200 values\), more than the "
                                         r"limit of 1,199"):
        resample_image(np.zeros((2, 5, 6, 5), np.float32), (1, 1, 1), (0.5, 0.5, 1))
    monkeypatch.setattr(io_image, "MAX_VOXELS", 2 * 10 * 12 * 5)
    out = resample_image(np.zeros((2, 5, 6, 5), np.float32), (1, 1, 1), (0.5, 0.5, 1))
    assert out.shape == (2, 10, 12, 5)
