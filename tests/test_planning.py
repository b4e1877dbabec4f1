"""Planning: fingerprints, plan rules, normalisation values, overrides, plan.json round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medunet.datasets import Dataset, find_dataset, validate_dataset
from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError
from medunet.io import Geometry, write_image
from medunet.planning import Plan, fingerprint_dataset, load_overrides, make_plan
from medunet.planning.plan import modality
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
    assert plan.inference["tta"] == "none"  # 2D: no TTA by default
    assert plan.network["deep_supervision"] is False  # 2D: one loss on the full-resolution output
    # the training defaults issue 6 asks for: EMA, early stopping (patience 15), the full augmentation
    t = plan.training
    assert t["ema"] == 0.99 and t["patience"] == 15 and t["schedule"] == "cosine" and t["loss"] == "dice_ce"
    assert {"rotation", "scaling", "elastic", "gamma", "noise", "blur", "lowres"} <= set(t["augment"])


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
    assert plan.configuration == "2d" and plan.configurations == ["2d"]
    assert plan.preprocessing == {"crop_nonzero": False, "resample": False, "image_order": 3,
                                  "label_mode": "nearest", "separate_z": None, "image_size": None}
    assert plan.network["kernel_sizes"] == [[3, 3]] * len(plan.network["features"])
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


def test_unknown_plan_keys_are_refused_with_the_closest_one(tmp_path):
    make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(32, 32))
    plan = _plan(tmp_path / "d")
    for key, close in [("training.patiense", "training.patience"), ("network.featurs", "network.features"),
                       ("inference.overlapp", "inference.overlap"), ("patch_sise", "patch_size")]:
        with pytest.raises(InputError, match=f"unknown plan field '{key}'") as err:
            plan.override({key: 3})
        assert f"did you mean '{close}'" in str(err.value)
    # known settings a fresh plan does not write yet are accepted, nested ones created
    changed = plan.override({"training.momentum": 0.9, "network.residual": True,
                             "training.loss_options.ce_weight": 2.0})
    assert changed.training["momentum"] == 0.9 and changed.network["residual"] is True
    assert changed.training["loss_options"]["ce_weight"] == 2.0
    with pytest.raises(InputError, match="holds a value"):
        plan.override({"training.lr.x": 1})


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


# --------------------------------------------------------------------------- rules on small files


def _write_volumes(root, spacings, shape=(8, 32, 32), channel="MRI", border=0, seed=0):
    """nnU-Net layout NIfTI cases, one per spacing; non-zero intensities (``border`` voxels of
    zeros on every side), a foreground box."""
    rng = np.random.default_rng(seed)
    for i, sp in enumerate(spacings):
        img = np.zeros(shape, np.float32)
        inner = tuple(slice(border, n - border) for n in shape)
        img[inner] = rng.uniform(50, 150, [n - 2 * border for n in shape])
        lab = np.zeros(shape, np.uint8)
        lab[tuple(slice(n // 4, n // 2 + 1) for n in shape)] = 1
        write_image(root / "imagesTr" / f"c{i}_0000.nii.gz", img, Geometry(spacing=sp))
        write_image(root / "labelsTr" / f"c{i}.nii.gz", lab, Geometry(spacing=sp))
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": channel}, "labels": {"background": 0, "x": 1},
         "file_ending": ".nii.gz"}))
    return root


def _fingerprint(root):
    ds = find_dataset(root)
    return ds, fingerprint_dataset(ds, validate_dataset(ds))


def test_plan_isotropic_3d(tmp_path):
    make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(16, 24, 24))
    ds, fp = _fingerprint(tmp_path / "d")
    plan = make_plan(ds, fp)
    assert plan.configuration == "3d" and plan.configurations == ["3d"]
    assert plan.spacing == [1.5, 1.0, 1.0] and plan.median_shape == [16, 24, 24]
    assert plan.preprocessing["resample"] is False and plan.preprocessing["crop_nonzero"] is False
    assert plan.preprocessing["separate_z"] is None
    assert plan.network["kernel_sizes"] == [[3, 3, 3]] * len(plan.network["features"])
    assert plan.network["deep_supervision"] is True and "deep supervision" in plan.reasons["network"]
    net = plan.build_network().train()
    outs = net(torch.zeros(1, 1, *plan.patch_size))
    assert isinstance(outs, list) and len(outs) == len(plan.network["strides"])
    assert fp["modalities"] == ["mr"] and fp["crop_kept"] == [1.0, 1.0]
    assert plan.normalization == [{"scheme": "zscore"}]
    assert plan.inference["tta"] == "flip" and "mirroring" in plan.reasons["inference.tta"]
    with pytest.raises(InputError, match="configuration '2d' is not offered"):
        make_plan(ds, fp, config="2d")
    with pytest.raises(InputError, match="unknown configuration"):
        make_plan(ds, fp, config="2.5d")


def test_plan_anisotropic_3d_and_its_2d_configuration(tmp_path):
    thick = [3.0, 4.0, 4.0, 5.0, 6.0]
    ds, fp = _fingerprint(_write_volumes(tmp_path / "a", [(z, 0.8, 0.8) for z in thick]))
    plan = make_plan(ds, fp)
    # thick axis 0: 10th percentile of (3, 4, 4, 5, 6) = 3 + 0.4 * (4 - 3); in-plane the median
    np.testing.assert_allclose(plan.spacing, [3.4, 0.8, 0.8])
    assert plan.preprocessing["resample"] is True and plan.preprocessing["separate_z"] == 0
    assert "10th percentile" in plan.reasons["spacing"]
    # after resampling the 8 slices: round(8 * z / 3.4) = 7, 9, 9, 12, 14 -> median 9
    assert plan.median_shape == [9, 32, 32]
    assert plan.configuration == "3d" and plan.configurations == ["3d", "2d"]
    assert "config='2d'" in plan.reasons["configuration"]
    # 3d: 9 slices pool once (9 -> 4), in-plane three times; the full axis rounds up to 10
    assert plan.network["strides"] == [[2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert plan.patch_size == [10, 32, 32]
    assert plan.network["kernel_sizes"] == [[3, 3, 3]] * 4

    p2 = make_plan(ds, fp, config="2d")
    assert p2.dim == 3 and p2.configuration == "2d" and p2.spacing == plan.spacing
    assert p2.patch_size == [1, 32, 32]
    assert p2.network["strides"] == [[1, 2, 2]] * 3
    assert p2.network["kernel_sizes"] == [[1, 3, 3]] * 4
    assert p2.batch_size == 16  # the 2D step budget over 32 x 32 patches, capped
    assert p2.inference["tta"] == "none" and plan.inference["tta"] == "flip"  # slice by slice: 2D rule
    assert plan.network["deep_supervision"] is True and p2.network["deep_supervision"] is False
    net = p2.build_network()
    assert all(m.kernel_size == (1, 3, 3) for m in net.modules() if isinstance(m, torch.nn.Conv3d)
               and m.kernel_size != (1, 1, 1))
    again = Plan.from_dict(json.loads(json.dumps(p2.to_dict())))
    assert again == p2


def test_plan_crop_nonzero_and_masked_zscore(tmp_path):
    # 8 x 32 x 32 volumes whose outer 4 voxels are 0 on the in-plane axes and 2 on the slice axis
    root = _write_volumes(tmp_path / "c", [(1.0, 1.0, 1.0)] * 2, shape=(12, 32, 32), border=4)
    ds, fp = _fingerprint(root)
    kept = 4 * 24 * 24 / (12 * 32 * 32)
    np.testing.assert_allclose(fp["crop_kept"], [kept, kept])
    assert fp["cropped_shapes"] == [[4, 24, 24]] * 2
    plan = make_plan(ds, fp)
    assert plan.preprocessing["crop_nonzero"] is True
    assert plan.normalization == [{"scheme": "zscore", "nonzero_mask": True}]
    assert plan.median_shape == [4, 24, 24]  # patch planning sees the cropped case


def _fake(tmp_path, shapes, spacings, channels=("MRI",), crop_kept=None):
    """A Dataset and a hand-made fingerprint: the rules without reading any file."""
    ds = Dataset(root=tmp_path, name="fake", layout="nnunet", channel_names=list(channels),
                 label_names=["background", "x"], label_values=[0, 1], file_ending=".nii.gz")
    fp = {
        "num_cases": len(shapes), "shapes": shapes, "spacings": spacings,
        "median_shape": np.median(shapes, axis=0).astype(int).tolist(),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "intensity": [{"mean": 40.0, "std": 100.0, "p00_5": -900.0, "p99_5": 1200.0}] * len(channels),
        "class_fraction": [0.9, 0.1], "crop_kept": crop_kept or [1.0] * len(shapes),
        "cropped_shapes": shapes,
    }
    return ds, fp


@pytest.mark.parametrize("kept, crop, masked", [
    ([0.95, 0.9025, 0.96], False, False),   # 9.75 % removed on the median case: nothing to gain
    ([0.5, 0.9, 1.0], True, False),         # exactly 10 %
    ([0.76, 0.8, 0.9], True, False),        # 20 %
    ([0.75, 0.7, 1.0], True, True),         # exactly 25 %: nnU-Net's masked z-score
])
def test_crop_rule_thresholds(tmp_path, kept, crop, masked):
    ds, fp = _fake(tmp_path, [[40, 40]] * 3, [[1.0, 1.0]] * 3, crop_kept=kept)
    plan = make_plan(ds, fp)
    assert plan.preprocessing["crop_nonzero"] is crop
    assert plan.normalization[0].get("nonzero_mask", False) is masked
    assert ("nothing to gain" in plan.reasons["preprocessing.crop_nonzero"]) is not crop


def test_resample_only_beyond_one_percent(tmp_path):
    ds, fp = _fake(tmp_path, [[40, 40]] * 3, [[1.0, 1.0], [1.0, 1.0], [1.009, 1.0]])
    assert make_plan(ds, fp).preprocessing["resample"] is False
    ds, fp = _fake(tmp_path, [[40, 40]] * 3, [[1.0, 1.0], [1.0, 1.0], [1.02, 1.0]])
    plan = make_plan(ds, fp)
    assert plan.preprocessing["resample"] is True and "1 of 3 cases" in plan.reasons["preprocessing.resample"]


def test_modality_from_channel_names(tmp_path):
    names = {"CT": "ct", "ct": "ct", "MRI": "mr", "t1gd": "mr", "T2w": "mr", "FLAIR": "mr", "ADC": "mr",
             "DWI": "mr", "PD": "mr", "R": "rgb", "green": "rgb", "noNorm": "none", "grey": "other"}
    assert {n: modality(n) for n in names} == names
    ds, fp = _fake(tmp_path, [[8, 40, 40]] * 2, [[1.0, 1.0, 1.0]] * 2, channels=("CT", "T1", "noNorm"))
    schemes = [n["scheme"] for n in make_plan(ds, fp).normalization]
    assert schemes == ["ct", "zscore", "none"]


@pytest.mark.parametrize("name, lower, upper", [
    ("lung", -1350.0, 150.0), ("mediastinum", -125.0, 225.0), ("abdomen", -160.0, 240.0),
    ("bone", -500.0, 1300.0), ("Brain", 0.0, 80.0),
])
def test_named_ct_windows(tmp_path, name, lower, upper):
    ds, fp = _fake(tmp_path, [[8, 40, 40]] * 2, [[1.0, 1.0, 1.0]] * 2, channels=("CT", "T2"))
    plan = make_plan(ds, fp, ct_window=name)
    assert plan.normalization[0] == {"scheme": "window", "lower": lower, "upper": upper}
    assert plan.normalization[1] == {"scheme": "zscore"}  # the window is for CT channels only
    assert "HU window" in plan.reasons["normalization"]


def test_ct_window_errors_and_explicit_window(tmp_path):
    ds, fp = _fake(tmp_path, [[8, 40, 40]] * 2, [[1.0, 1.0, 1.0]] * 2, channels=("CT",))
    assert make_plan(ds, fp, window=(40, 400)).normalization == [
        {"scheme": "window", "lower": -160.0, "upper": 240.0}]
    with pytest.raises(InputError, match="lung, mediastinum, abdomen, bone, brain"):
        make_plan(ds, fp, ct_window="liver")
    with pytest.raises(InputError, match="not both"):
        make_plan(ds, fp, ct_window="lung", window=(40, 400))
    with pytest.raises(InputError, match="width must be positive"):
        make_plan(ds, fp, window=(40, 0))
    # one channel not named CT: the window applies to it; two such channels: an error
    one, fp1 = _fake(tmp_path, [[8, 40, 40]] * 2, [[1.0, 1.0, 1.0]] * 2, channels=("image",))
    assert make_plan(one, fp1, ct_window="bone").normalization[0]["scheme"] == "window"
    two, fp2 = _fake(tmp_path, [[8, 40, 40]] * 2, [[1.0, 1.0, 1.0]] * 2, channels=("T1", "T2"))
    with pytest.raises(InputError, match="needs a CT channel") as err:
        make_plan(two, fp2, ct_window="bone")
    assert "dataset.json" in str(err.value)


def test_gpu_budgets_scale_with_memory(tmp_path):
    ds3, fp3 = _fake(tmp_path, [[128, 128, 128]] * 100, [[1.0, 1.0, 1.0]] * 100)
    ds2, fp2 = _fake(tmp_path, [[512, 512]] * 1000, [[1.0, 1.0]] * 1000)
    p3, p2 = make_plan(ds3, fp3, device_memory_gb=40), make_plan(ds2, fp2, device_memory_gb=40)
    assert (p3.patch_size, p3.batch_size) == ([128, 128, 128], 2)
    assert (p2.patch_size, p2.batch_size) == ([512, 512], 12)
    assert "GPU with 40 GB" in p3.reasons["batch_size"]
    # more memory: same patch, larger batch
    assert make_plan(ds3, fp3, device_memory_gb=80).batch_size == 4
    assert make_plan(ds2, fp2, device_memory_gb=80).batch_size == 24
    # less memory: smaller patches (within sqrt(f) of the reference budget), still a batch >= 2
    small3, small2 = make_plan(ds3, fp3, device_memory_gb=10), make_plan(ds2, fp2, device_memory_gb=10)
    assert np.prod(small3.patch_size) <= 128**3 * 0.5 and small3.batch_size == 2
    assert np.prod(small2.patch_size) <= 512**2 * 0.5 and small2.batch_size >= 6
    # no device memory: today's CPU budgets
    cpu3 = make_plan(ds3, fp3)
    assert np.prod(cpu3.patch_size) <= 96 * 96 * 48 and cpu3.batch_size == 2
    with pytest.raises(InputError, match="device memory"):
        make_plan(ds3, fp3, device_memory_gb=0)
    # a small dataset: a batch covers at most 5 % of its voxels (60 cases: 3 patches), not 4
    few, fpf = _fake(tmp_path, [[128, 128, 128]] * 60, [[1.0, 1.0, 1.0]] * 60)
    capped = make_plan(few, fpf, device_memory_gb=80)
    assert capped.batch_size == 3 and "5 % of the dataset" in capped.reasons["batch_size"]
    assert make_plan(few, fpf).batch_size == 2  # the CPU rule has no such cap (it is time-bound)


# --------------------------------------------------------------------------- overrides and old plans


def test_load_overrides_json_and_yaml(tmp_path):
    make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(32, 32))
    plan = _plan(tmp_path / "d")
    (tmp_path / "o.json").write_text(json.dumps({"training": {"lr": 0.01, "augment": {"flip": 0.2}},
                                                 "patch_size": [16, 16]}))
    (tmp_path / "o.yaml").write_text(
        "training:\n  lr: 0.01\n  augment:\n    flip: 0.2\npatch_size: [16, 16]\n")
    expected = {"training.lr": 0.01, "training.augment.flip": 0.2, "patch_size": [16, 16]}
    for name in ("o.json", "o.yaml"):
        assert load_overrides(tmp_path / name) == expected
    changed = plan.override(load_overrides(tmp_path / "o.yaml"))
    assert changed.training["lr"] == 0.01 and changed.training["augment"]["flip"] == 0.2
    assert changed.training["augment"]["rot90"] == plan.training["augment"]["rot90"]  # siblings kept
    assert changed.patch_size == [16, 16] and changed.reasons["training.augment.flip"] == "set by the user"
    (tmp_path / "e.yml").write_text("")
    assert load_overrides(tmp_path / "e.yml") == {}
    # a whole edited plan.json is a valid overrides file too
    whole = load_overrides(plan.save(tmp_path / "p" / "plan.json"))
    assert plan.override(whole).patch_size == plan.patch_size


@pytest.mark.parametrize("name, text, pattern", [
    ("bad.yaml", "training: [1, 2\n", "invalid YAML"),
    ("bad.json", "{training", "invalid JSON"),
    ("list.yaml", "- 1\n- 2\n", "must be a mapping"),
    ("missing.json", None, "not found"),
])
def test_load_overrides_bad_files(tmp_path, name, text, pattern):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError, match=pattern) as err:
        load_overrides(path)
    assert name in str(err.value)


def test_old_plan_json_loads_and_behaves_as_before(tmp_path):
    """A version-1 plan.json (no preprocessing, configuration or kernel sizes)."""
    old = {
        "dataset_name": "old", "dim": 3, "in_channels": 1, "channel_names": ["MRI"],
        "label_names": ["background", "x"], "label_values": [0, 1], "spacing": [1.5, 1.0, 1.0],
        "median_shape": [16, 24, 24], "normalization": [{"scheme": "zscore"}],
        "patch_size": [16, 24, 24], "batch_size": 2,
        "network": {"features": [16, 32, 64], "n_convs": 2, "norm": "batch", "act": "leakyrelu",
                    "down": "maxpool", "up": "transpose", "strides": [[2, 2, 2], [2, 2, 2]],
                    "preset": "default"},
        "training": {"lr": 0.003}, "inference": {"overlap": 0.5}, "reasons": {}, "version": 1,
    }
    (tmp_path / "plan.json").write_text(json.dumps(old))
    plan = Plan.load(tmp_path)
    assert plan.preprocessing == {} and plan.version == 1
    assert plan.configuration == "3d" and plan.configurations == ["3d"]
    net = plan.build_network()
    assert all(m.kernel_size == (3, 3, 3) for m in net.modules()
               if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1))
    assert plan.override({"preprocessing.crop_nonzero": True}).preprocessing == {"crop_nonzero": True}


def test_reasons_follow_the_values(tmp_path) -> None:
    """The value-describing reasons are written from the values: --set changes them too."""
    make_synthetic_dataset(tmp_path / "d", n_train=3, n_test=0, shape=(40, 72))
    plan = _plan(tmp_path / "d")
    assert "lr 0.003" in plan.reasons["training"] and "measured best" in plan.reasons["training"]
    changed = plan.override({"training.lr": 1e-3, "training.patience": 4, "inference.tta": "flip"})
    assert "lr 0.001" in changed.reasons["training"] and "lr 0.003" not in changed.reasons["training"]
    assert "changed from the measured default: lr" in changed.reasons["training"]
    assert "after 4 validations" in changed.reasons["training"]
    assert "mirroring" in changed.reasons["inference.tta"]
    assert changed.reasons["training.lr"] == "set by the user"
