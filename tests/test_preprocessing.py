"""Preprocessing: normalisation schemes (whole image and per window agree), the on-disk cache."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from medunet.datasets import find_dataset, validate_dataset
from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.inference.normalization import WindowNormalizer
from medunet.planning import fingerprint_dataset, make_plan
from medunet.preprocessing import normalize

# --------------------------------------------------------------------------- normalisation


def test_window_scheme_hand_computed():
    lung = {"scheme": "window", "lower": -1350.0, "upper": 150.0}
    x = np.array([[[-2000.0, -1350.0, -600.0, 150.0, 900.0]]], np.float32)
    np.testing.assert_allclose(normalize(x, [lung])[0], [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-7)


def test_masked_zscore_hand_computed():
    x = np.array([[[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 2.0]]], np.float32)
    # non-zero voxels 1, 3, 2, 2: mean 2, std sqrt(0.5); zeros stay 0
    s = np.sqrt(0.5)
    out = normalize(x, [{"scheme": "zscore", "nonzero_mask": True}])
    np.testing.assert_allclose(out[0], [[0, -1 / s, 1 / s, 0], [0, 0, 0, 0]], rtol=1e-6)
    # without the mask the zeros count: mean 1, std 1.118...
    plain = normalize(x, [{"scheme": "zscore"}])
    np.testing.assert_allclose(plain[0], (x[0] - 1.0) / np.sqrt(1.25), rtol=1e-6)
    # an all-zero channel stays zero
    assert not normalize(np.zeros((1, 3, 3)), [{"scheme": "zscore", "nonzero_mask": True}]).any()


SCHEMES = [
    {"scheme": "rgb", "mean": 0.4, "std": 0.2},
    {"scheme": "ct", "lower": -900.0, "upper": 1200.0, "mean": 40.0, "std": 300.0},
    {"scheme": "window", "lower": -160.0, "upper": 240.0},
    {"scheme": "zscore", "nonzero_mask": True},
    {"scheme": "zscore"},
    {"scheme": "none"},
]


def _image(shape=(9, 14, 11), seed=0):
    rng = np.random.default_rng(seed)
    img = np.stack([
        rng.integers(0, 256, shape).astype(np.float32),
        rng.normal(0, 800, shape).astype(np.float32),
        rng.normal(0, 300, shape).astype(np.float32),
        rng.normal(500, 100, shape).astype(np.float32),
        rng.normal(500, 100, shape).astype(np.float32),
        rng.normal(0, 1, shape).astype(np.float32),
    ])
    img[3:5, :3] = 0  # an empty border: the masked z-score must ignore it and keep it 0
    return img


@pytest.mark.parametrize("dims", [2, 3])
def test_window_normalizer_equals_normalize(dims):
    img = _image((9, 14, 11)[-dims:])
    ref = normalize(img, SCHEMES)
    norm = WindowNormalizer(img, SCHEMES)
    whole = norm(torch.from_numpy(img)[None])[0].numpy()
    np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-5)
    # a window cut out of the raw image normalises like the same window of the whole image
    win = (slice(None), *(slice(2, 7) for _ in range(dims)))
    part = norm(torch.from_numpy(np.ascontiguousarray(img[win]))[None])[0].numpy()
    np.testing.assert_allclose(part, ref[win], rtol=1e-5, atol=1e-5)
    assert (whole[3][img[3] == 0] == 0).all() and (img[3] == 0).any()


# --------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def cache_setup(tmp_path_factory):
    """A tiny 3D dataset and a plan that crops nothing but resamples the first axis."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("cache") / "d", n_train=3, n_test=0,
                                  shape=(10, 16, 16))
    ds = find_dataset(root)
    plan = make_plan(ds, fingerprint_dataset(ds, validate_dataset(ds)))
    plan = plan.override({"spacing": [2.0, 1.0, 1.0], "preprocessing.resample": True})
    return ds, plan


def _state(folder):
    """Inode and modification time of every file: a rewrite (temp + rename) changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_cache_writes_reuses_and_memory_maps(cache_setup, tmp_path):
    from medunet.datasets import load_case
    from medunet.preprocessing import plan_hash, preprocess_case, preprocess_dataset

    ds, plan = cache_setup
    cache = tmp_path / "cache"
    cases = preprocess_dataset(ds, plan, cache, workers=1, progress=False)
    assert list(cases) == [c.case_id for c in ds.train]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{c.case_id}{s}" for c in ds.train for s in ("_img.npy", "_seg.npy", ".json"))
    first = ds.train[0]
    image, label = cases[first.case_id].load()
    assert isinstance(image, np.memmap) and isinstance(label, np.memmap)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    raw, lab, geom = load_case(first, ds)
    ref_img, ref_lab, info = preprocess_case(raw, geom.spacing, plan, label=lab)
    assert image.shape == (1, 8, 16, 16)  # 10 slices of 1.5 mm resampled to 2 mm
    np.testing.assert_array_equal(image, ref_img)
    np.testing.assert_array_equal(label, ref_lab)
    meta = json.loads((cache / f"{first.case_id}.json").read_text())
    assert meta["info"] == info.to_dict() == cases[first.case_id].info
    assert meta["plan_hash"] == plan_hash(plan)
    assert [s["path"] for s in meta["sources"]] == [str(p.resolve()) for p in
                                                   [*first.image_paths, first.label_path]]
    assert cases[first.case_id].preprocess_info() == info

    # a second call rewrites nothing; a plan change outside preprocessing does not matter
    before = _state(cache)
    again = preprocess_dataset(ds, plan.override({"patch_size": [8, 8, 8]}), cache, progress=False)
    assert _state(cache) == before and again == cases

    # a touched source recomputes that case only
    src = ds.train[1].image_paths[0]
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    preprocess_dataset(ds, plan, cache, workers=1, progress=False)
    after = _state(cache)
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {f"{ds.train[1].case_id}{s}" for s in ("_img.npy", "_seg.npy", ".json")}

    # a changed normalisation recomputes every case, with the new numbers
    other = plan.override({"normalization": [{"scheme": "none"}]})
    cases2 = preprocess_dataset(ds, other, cache, workers=1, progress=False)
    assert all(_state(cache)[n] != after[n] for n in after)
    img2, _ = cases2[first.case_id].load()
    np.testing.assert_allclose(img2, preprocess_case(raw, geom.spacing, other)[0])
    assert not np.allclose(img2, image)

    # a damaged json (or a missing array) is recomputed, not trusted
    (cache / f"{first.case_id}.json").write_text("{")
    (cache / f"{ds.train[2].case_id}_seg.npy").unlink()
    cases3 = preprocess_dataset(ds, other, cache, workers=1, progress=False)
    third = ds.train[2].case_id
    np.testing.assert_array_equal(cases3[third].load()[1], cases2[third].load()[1])
    assert not list(cache.glob(".*"))  # no temporary files left


def test_cache_workers_give_the_same_arrays(cache_setup, tmp_path):
    from medunet.preprocessing import preprocess_dataset

    ds, plan = cache_setup
    one = preprocess_dataset(ds, plan, tmp_path / "one", workers=1, progress=False)
    t0 = time.perf_counter()
    two = preprocess_dataset(ds, plan, tmp_path / "two", workers=2, progress=False)
    assert time.perf_counter() - t0 < 60
    for cid in one:
        a, b = one[cid].load(), two[cid].load()
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert one[cid].info == two[cid].info


def test_cache_case_selection(cache_setup, tmp_path):
    from medunet.errors import InputError
    from medunet.preprocessing import preprocess_dataset

    ds, plan = cache_setup
    ids = [ds.train[2].case_id, ds.train[0].case_id]
    got = preprocess_dataset(ds, plan, tmp_path / "c", case_ids=ids, workers=1, progress=False)
    assert list(got) == ids and len(list((tmp_path / "c").glob("*.json"))) == 2
    with pytest.raises(InputError, match="not in the dataset: nope"):
        preprocess_dataset(ds, plan, tmp_path / "c", case_ids=["nope"], progress=False)


def test_cache_recomputes_damaged_arrays(cache_setup, tmp_path):
    from medunet.preprocessing import preprocess_dataset

    ds, plan = cache_setup
    cache = tmp_path / "cache"
    cases = preprocess_dataset(ds, plan, cache, workers=1, progress=False)
    ids = [c.case_id for c in ds.train]
    good = {i: [np.array(a) for a in cases[i].load()] for i in ids}
    img0 = cache / f"{ids[0]}_img.npy"
    img0.write_bytes(img0.read_bytes()[:-10])  # truncated (a full disk)
    (cache / f"{ids[1]}_seg.npy").write_bytes(b"not an npy file at all")
    np.save(cache / f"{ids[2]}_img.npy", np.zeros((1, 3, 3, 3), np.float32))  # complete, wrong shape
    again = preprocess_dataset(ds, plan, cache, workers=1, progress=False)
    for i in ids:
        image, label = again[i].load()
        np.testing.assert_array_equal(image, good[i][0])
        np.testing.assert_array_equal(label, good[i][1])
    before = _state(cache)
    preprocess_dataset(ds, plan, cache, workers=1, progress=False)  # repaired: reused as they are
    assert _state(cache) == before
