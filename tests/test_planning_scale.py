"""Object scales from labels and the working resolution they lead to (planning.scale)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import sized_dataset, write_png
from medunet.datasets import find_dataset, validate_dataset
from medunet.errors import InputError
from medunet.planning import fingerprint_dataset, make_plan
from medunet.planning.scale import label_scales, summarize_scales, working_factor


def test_strip_thickness_and_context_hand_computed():
    lab = np.zeros((20, 100), np.uint8)
    lab[5:9, 0:100] = 1  # a 4 x 100 strip touching both ends of the array
    (s,) = label_scales(lab, (1.0, 1.0), 2)
    # volume 400; faces: 2 x 100 along axis 0, 2 x 4 along axis 1 (the array border counts)
    assert s["volume"] == 400 and s["surface"] == 208
    assert s["thickness"] == pytest.approx(800 / 208)
    (voxels, extent, context), = s["components"]
    assert voxels == 400 and extent == 100
    assert context == pytest.approx(4 * 800 / 208)  # elongated: four widths, not its length


def test_disc_context_is_its_extent_and_spacing_is_physical():
    yy, xx = np.mgrid[:64, :64]
    lab = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 20 ** 2).astype(np.uint8)
    (s,) = label_scales(lab, (0.5, 0.5), 2)
    (voxels, extent, context), = s["components"]
    assert extent == pytest.approx(41 * 0.5)  # 41 voxels across, 0.5 mm each
    assert context == extent  # a blob must be seen whole
    # thickness of a digital disc with face surfaces: 2 * area / (4 * diameter) ~ 0.39 D
    assert s["thickness"] == pytest.approx(2 * voxels * 0.25 / (4 * 41 * 0.5), rel=0.02)


def test_summary_weights_components_by_size():
    small = np.zeros((50, 50), np.uint8)
    small[1:4, 1:4] = 1
    big = np.zeros((50, 50), np.uint8)
    big[5:45, 5:45] = 1
    cases = [label_scales(small, (1, 1), 2) for _ in range(5)] + [label_scales(big, (1, 1), 2)]
    (s,) = summarize_scales(cases)
    assert s["components"] == 6
    assert s["context"] == pytest.approx(40)  # most foreground lies in the large square
    assert s["extent_median"] == 3


def _scale(thickness: float, context: float) -> dict:
    return {"thickness": thickness, "context": context}


def test_working_factor_rules():
    # large blobs in a 1000 x 1000 image, patch budget 250^2: the case fits the patch at 4x,
    # context wants 600 / (0.5 * 250) = 4.8x: fitting the case is the limit
    wr = working_factor([_scale(200, 600)], (1.0, 1.0), (1000, 1000), 250 * 250, [0, 1], ["lesion"])
    assert wr.factor == 4.0 and not wr.conflict and "fits the patch whole" in wr.reason
    # the same image with vessels: nothing to gain, the resolution stays
    wr = working_factor([_scale(3, 12)], (1.0, 1.0), (1000, 1000), 250 * 250, [0, 1], ["vessel"])
    assert wr.factor == 1.0 and not wr.conflict
    # medium objects: context alone decides (250 / (0.5 * 250) = 2x)
    wr = working_factor([_scale(80, 250)], (1.0, 1.0), (1000, 1000), 250 * 250, [0, 1], ["lesion"])
    assert wr.factor == 2.0
    # a large organ next to a thin vessel: the vessel (8 across, 4 voxels needed) caps it at 2x
    wr = working_factor([_scale(200, 600), _scale(8, 30)], (1.0, 1.0), (1000, 1000), 250 * 250,
                        [0, 1], ["organ", "vessel"])
    assert wr.factor == 2.0 and wr.conflict and "'vessel'" in wr.reason
    # only the free axes count (a thick axis of anisotropic data is never coarsened)
    wr = working_factor([_scale(50, 300)], (1.0, 1.0, 5.0), (400, 400, 40), 96 * 96 * 40, [0, 1],
                        ["organ"])
    assert wr.axes == [0, 1] and wr.factor == pytest.approx(4.2, abs=0.05)


def test_receptive_field_coarsens_beyond_fitting_the_case():
    # context 600 voxels, an encoder that sees 100: coarsen until the context fits it (6x),
    # past the 4x at which the case fits the patch
    wr = working_factor([_scale(200, 600)], (1.0, 1.0), (1000, 1000), 250 * 250, [0, 1], ["lesion"],
                        receptive_field=100)
    assert wr.factor == 6.0 and wr.field_factor == pytest.approx(6.0)
    assert "receptive field (100 voxels)" in wr.reason and not wr.conflict
    # a receptive field larger than the objects changes nothing
    wr = working_factor([_scale(200, 600)], (1.0, 1.0), (1000, 1000), 250 * 250, [0, 1], ["lesion"],
                        receptive_field=800)
    assert wr.factor == 4.0 and "fits the patch whole" in wr.reason
    # thin structures still cap it (12 across, 4 voxels needed: 3x), and the conflict is reported
    wr = working_factor([_scale(200, 600), _scale(12, 40)], (1.0, 1.0), (1000, 1000), 250 * 250, [0, 1],
                        ["organ", "vessel"], receptive_field=100)
    assert wr.factor == 3.0 and wr.conflict and wr.lowres_factor == 6.0 and "'vessel' keeps" in wr.reason


def _dataset(root, n, shape, draw, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = rng.integers(60, 120, shape).astype(np.uint8)
        label = draw(rng, shape)
        image[label > 0] += 60
        write_png(root / "imagesTr" / f"c{i:02d}_0000.png", image)
        write_png(root / "labelsTr" / f"c{i:02d}.png", label)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "grey"}, "labels": {"background": 0, "object": 1},
        "numTraining": n, "file_ending": ".png"}))
    return root


def _blob(rng, shape):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = shape[0] / 2 + rng.integers(-40, 40), shape[1] / 2 + rng.integers(-40, 40)
    r = rng.integers(130, 180)
    return (((yy - cy) / r) ** 2 + ((xx - cx) / (0.8 * r)) ** 2 <= 1).astype(np.uint8)


def _lines(rng, shape):
    lab = np.zeros(shape, np.uint8)
    for y in range(int(rng.integers(5, 20)), shape[0], 37):
        lab[y: y + 2] = 1
    for x in range(int(rng.integers(5, 20)), shape[1], 41):
        lab[:, x: x + 2] = 1
    return lab


def _plan(root, **kw):
    ds = find_dataset(root)
    return make_plan(ds, fingerprint_dataset(ds, validate_dataset(ds)), **kw)


def test_large_objects_get_a_coarser_working_resolution(tmp_path):
    plan = _plan(_dataset(tmp_path / "big", 4, (600, 640), _blob))
    assert plan.resolution["factor"] > 1.5
    assert plan.spacing[0] == plan.spacing[1] == pytest.approx(plan.resolution["factor"])
    assert plan.preprocessing["resample"] is True
    # the median case at the working resolution fits the patch whole
    assert all(p >= s for p, s in zip(plan.patch_size, plan.median_shape, strict=True))
    assert np.prod(plan.median_shape) <= 256 * 256
    assert "coarsened" in plan.reasons["resolution"] and "resolution" in plan.reasons["spacing"]
    # the measured scales are recorded in the plan
    (scale,) = plan.resolution["scales"]
    assert scale["context"] > 200 and scale["thickness"] > 50
    # the default encoder sees 140 voxels: the blobs' context is brought within it
    assert plan.resolution["receptive_field"] == 140
    assert scale["context"] / plan.spacing[0] <= 140 * 1.05


def test_thin_structures_keep_their_resolution(tmp_path):
    plan = _plan(_dataset(tmp_path / "thin", 3, (600, 640), _lines))
    assert plan.resolution["factor"] == 1.0
    assert plan.spacing == [1.0, 1.0] and plan.preprocessing["resample"] is False
    assert plan.median_shape == [600, 640]


def test_user_sets_the_resolution(tmp_path):
    from medunet.training.trainer import prepare_plan

    root = _dataset(tmp_path / "big", 3, (600, 640), _blob)
    _, native = prepare_plan(root, overrides={"resolution.factor": 1})
    assert native.spacing == [1.0, 1.0] and native.median_shape == [600, 640]
    assert native.preprocessing["resample"] is False and "set by the user" in native.reasons["resolution"]
    _, three = prepare_plan(root, overrides={"spacing": [3, 3], "training.lr": 0.01})
    # the patch follows the user's spacing (the whole 200 x 213 case fits), other keys still apply
    assert three.spacing == [3.0, 3.0] and three.median_shape == [200, 213]
    assert three.patch_size[0] >= 200 and three.training["lr"] == 0.01
    with pytest.raises(InputError, match="resolution.factor"):
        prepare_plan(root, overrides={"resolution.factor": 0})
    with pytest.raises(InputError, match="spacing"):
        prepare_plan(root, overrides={"spacing": [1, -1]})


def test_image_relative_scale_from_the_regression_of_object_on_image_size():
    from medunet.planning.scale import image_relative_scale

    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(300), np.log(1900), 60))
    noise = np.exp(rng.normal(0, 0.3, 60))
    follows, why = image_relative_scale(sizes, 0.3 * sizes * noise)  # same field of view
    assert follows and "median size" in why
    fixed, _ = image_relative_scale(sizes, 80 * noise)  # same pixel size whatever the image
    assert not fixed
    similar, why = image_relative_scale(np.full(60, 500.0) * noise ** 0.1, 0.3 * 500 * noise)
    assert not similar and "similar size" in why
    few, _ = image_relative_scale(sizes[:5], 0.3 * sizes[:5])
    assert not few


def test_images_are_brought_to_one_size_when_their_objects_follow_it(tmp_path):
    from medunet.preprocessing.pipeline import case_spacing, prepare_geometry

    plan = _plan(sized_dataset(tmp_path / "rel", relative=True))
    size = plan.preprocessing["image_size"]
    assert size == pytest.approx(np.median(np.linspace(160, 480, 10).astype(int)), abs=1)
    assert "follow the image" in plan.reasons["preprocessing.image_size"]
    assert plan.preprocessing["resample"] is True
    # every image, whatever its size, arrives at the same working shape
    for n in (160, 333, 480, 900):
        assert case_spacing((1.0, 1.0), (n, n), plan) == pytest.approx([size / n] * 2)
        work, info = prepare_geometry(np.zeros((1, n, n), np.float32), (1.0, 1.0), plan)
        assert abs(work.shape[1] - plan.median_shape[0]) <= 1 and info.original_shape == [n, n]
    # the object scale is measured at that common size: 0.6 of the median image across
    assert plan.resolution["scales"][0]["context"] == pytest.approx(0.6 * size, rel=0.15)

    fixed = _plan(sized_dataset(tmp_path / "abs", relative=False))
    assert fixed.preprocessing["image_size"] is None
    assert "pixel sizes are kept" in fixed.reasons["preprocessing.image_size"]

