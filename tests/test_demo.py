"""The demo pipeline reaches its promised Dice, and the synthetic data is what it says."""

from __future__ import annotations

import numpy as np
import pytest

from medunet.datasets import find_dataset, validate_dataset
from medunet.datasets.synthetic import make_synthetic_dataset, synthetic_case
from medunet.demo import DEMO_MARKER, claim_demo_dir, run_demo
from medunet.errors import InputError


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


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "scan.nii.gz").write_bytes(b"mine")
    (project / "predictions").mkdir()
    with pytest.raises(InputError, match="not a medunet demo output"):
        run_demo(project, epochs=1, n_train=2, n_test=1, size=32, progress=False)
    assert (project / "data" / "scan.nii.gz").read_bytes() == b"mine"
    assert (project / "predictions").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        run_demo(tmp_path / "file", epochs=1, progress=False)


def test_demo_reuses_its_own_folder_and_only_its_entries(tmp_path):
    out = tmp_path / "demo"
    claim_demo_dir(out)  # a new folder gets the marker
    assert (out / DEMO_MARKER).is_file()
    (out / "predictions").mkdir()
    (out / "predictions" / "old.png").write_bytes(b"old")
    (out / "overlay.png").write_bytes(b"old")
    (out / "notes.txt").write_text("the user's")
    claim_demo_dir(out)  # a previous demo output: its entries go, the rest stays
    assert not (out / "predictions").exists() and not (out / "overlay.png").exists()
    assert (out / "notes.txt").read_text() == "the user's" and (out / DEMO_MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_demo_dir(empty)
    assert (empty / DEMO_MARKER).is_file()
