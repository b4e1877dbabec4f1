"""The demo pipeline reaches its promised Dice, and the synthetic data is what it says."""

from __future__ import annotations

import numpy as np

from medunet.datasets import find_dataset, validate_dataset
from medunet.datasets.synthetic import make_synthetic_dataset, synthetic_case
from medunet.demo import run_demo


def test_synthetic_case_2d_and_3d():
    rng = np.random.default_rng(0)
    for shape in [(64, 48), (16, 32, 24)]:
        img, lab = synthetic_case(shape, rng)
        assert img.shape == lab.shape == shape
        assert set(np.unique(lab)) == {0, 1}
        # lesions are brighter than their surroundings on average
        assert img[lab == 1].mean() > img[lab == 0].mean() + 0.5
    _, lab3 = synthetic_case((64, 64), rng, num_classes=3, n_blobs=(6, 6))
    assert set(np.unique(lab3)) <= {0, 1, 2}


def test_synthetic_dataset_is_valid(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n_train=3, n_test=2, shape=(8, 24, 24))
    ds = find_dataset(root)
    facts = validate_dataset(ds)
    assert len(ds.train) == 3 and len(ds.test) == 2
    assert facts[0]["spacing"] == [1.5, 1.0, 1.0]


def test_demo_reaches_dice_090(tmp_path):
    # epochs rather than a time budget: the result must not depend on the machine's load
    res = run_demo(tmp_path / "demo", epochs=4, n_train=12, n_test=4, size=64, progress=False)
    assert res.dice >= 0.90, res.dice
    assert res.overlay.is_file() and res.overlay.stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "demo" / "predictions").glob("*.png")) == [
        f"synth_ts{i:03d}.png" for i in range(4)]
