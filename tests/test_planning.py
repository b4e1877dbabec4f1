"""Planning: fingerprints, plan rules, normalisation values, overrides, plan.json round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medunet.datasets import find_dataset, validate_dataset
from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError
from medunet.io import Geometry, write_image
from medunet.planning import Plan, fingerprint_dataset, make_plan
from medunet.preprocessing import normalize


def _plan(root):
    ds = find_dataset(root)
    facts = validate_dataset(ds)
    return make_plan(ds, fingerprint_dataset(ds, facts))


def test_plan_2d_grey(tmp_path):
    make_synthetic_dataset(tmp_path / "d", n_train=3, n_test=0, shape=(40, 72))
    plan = _plan(tmp_path / "d")
    assert plan.dim == 2 and plan.in_channels == 1 and plan.num_classes == 2
    assert plan.normalization == [{"scheme": "zscore"}]
    # the whole (small) image fits: the patch covers it, rounded up to the net's divisor
    div = np.prod(np.array(plan.network["strides"]), axis=0)
    assert all(p % d == 0 for p, d in zip(plan.patch_size, div, strict=True))
    assert all(p >= s for p, s in zip(plan.patch_size, (40, 72), strict=True))
    assert plan.batch_size == 16  # small patches: the batch cap
    assert len(plan.network["features"]) == len(plan.network["strides"]) + 1


def test_plan_3d_anisotropic_strides(tmp_path):
    make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(12, 48, 48))
    plan = _plan(tmp_path / "d")
    assert plan.dim == 3
    assert plan.spacing == [1.5, 1.0, 1.0]
    # the 12-voxel axis may pool only while its edge stays >= 4: once (12 -> 6), then stops
    assert [s[0] for s in plan.network["strides"]].count(2) == 1
    assert all(s[1] == 2 for s in plan.network["strides"])


def test_plan_rgb_normalisation(tmp_path):
    root = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    for i in range(2):
        img = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
        lab = np.zeros((32, 32), np.uint8)
        lab[8:20, 8:20] = 1
        write_image(root / "imagesTr" / f"c{i}_0000.png", img)
        write_image(root / "labelsTr" / f"c{i}.png", lab)
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "x": 1},
         "file_ending": ".png"}))
    plan = _plan(root)
    assert [n["scheme"] for n in plan.normalization] == ["rgb"] * 3
    # mean/std are those of the foreground pixels scaled to [0, 1]
    sch = plan.normalization[0]
    assert 0.3 < sch["mean"] < 0.7 and 0.2 < sch["std"] < 0.4


def test_normalize_hand_computed():
    img = np.array([[[0.0, 255.0], [51.0, 102.0]]], dtype=np.float32)
    out = normalize(img, [{"scheme": "rgb", "mean": 0.5, "std": 0.25}])
    np.testing.assert_allclose(out[0], [[-2.0, 2.0], [-1.2, -0.4]], rtol=1e-6)
    ct = normalize(np.array([[[-2000.0, 0.0, 500.0]]]),
                   [{"scheme": "ct", "lower": -1000, "upper": 400, "mean": 0.0, "std": 100.0}])
    np.testing.assert_allclose(ct[0], [[-10.0, 0.0, 4.0]])
    z = normalize(np.array([[[1.0, 3.0]]]), [{"scheme": "zscore"}])
    np.testing.assert_allclose(z[0], [[-1.0, 1.0]])
    with pytest.raises(ValueError):
        normalize(np.zeros((2, 3, 3)), [{"scheme": "zscore"}])


def test_plan_json_round_trip_and_override(tmp_path):
    make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(32, 32))
    plan = _plan(tmp_path / "d")
    path = plan.save(tmp_path / "m" / "plan.json")
    again = Plan.load(tmp_path / "m")
    assert again == plan
    changed = again.override({"patch_size": [16, 16], "training.lr": 0.01})
    assert changed.patch_size == [16, 16] and changed.training["lr"] == 0.01
    assert changed.reasons["patch_size"] == "set by the user"
    with pytest.raises(InputError, match="unknown plan field"):
        again.override({"no_such_field": 1})
    path.write_text("{broken")
    with pytest.raises(InputError, match="invalid plan"):
        Plan.load(path)


def test_geometry_affine_from_fields():
    g = Geometry(spacing=(2.0, 3.0), origin=(1.0, -1.0))
    np.testing.assert_allclose(g.affine_matrix, [[2, 0, 1], [0, 3, -1], [0, 0, 1]])


def test_bad_preset_or_network_setting_is_an_input_error(tmp_path):
    make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(32, 32))
    ds = find_dataset(tmp_path / "d")
    fp = fingerprint_dataset(ds, validate_dataset(ds))
    with pytest.raises(InputError, match="unknown network preset 'huge'"):
        make_plan(ds, fp, preset="huge")
    plan = make_plan(ds, fp)
    assert plan.build_network().spatial_dims == 2
    with pytest.raises(InputError, match="invalid network settings"):
        plan.override({"network.norm": "sparkly"}).build_network()
