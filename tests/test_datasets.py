"""medunet.datasets: layouts are recognised, cases load, and every bad case is a clear error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import write_nifti, write_png
from medunet.datasets import Dataset, find_dataset, load_case, validate_dataset
from medunet.errors import InputError

MakeDataset = Callable[..., Path]


def _error(ds: Dataset, **kw) -> str:
    with pytest.raises(InputError) as err:
        validate_dataset(ds, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- layouts


def test_nnunet_layout_found(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(n_train=3, n_test=2, labels={"background": 0, "liver": 1, "tumour": 2})
    ds = find_dataset(root)
    assert ds.layout == "nnunet" and ds.name == root.name and ds.root == root
    assert [c.case_id for c in ds.train] == ["case000", "case001", "case002"]
    assert [c.case_id for c in ds.test] == ["test000", "test001"]
    assert ds.channel_names == ["mod0"] and ds.num_channels == 1
    assert ds.label_names == ["background", "liver", "tumour"]
    assert ds.label_values == [0, 1, 2] and ds.num_classes == 3
    assert ds.file_ending == ".png"
    case = ds.train[1]
    assert case.image_paths == [root / "imagesTr" / "case001_0000.png"]
    assert case.label_path == root / "labelsTr" / "case001.png"
    assert ds.test[0].label_path == root / "labelsTs" / "test000.png"

    facts = validate_dataset(ds)
    assert [f["case_id"] for f in facts] == ["case000", "case001", "case002"]
    assert facts[0]["shape"] == [24, 20] and facts[0]["channels"] == 1
    assert facts[0]["spacing"] == [1.0, 1.0] and facts[0]["label_values"] == [0, 1, 2]
    assert len(validate_dataset(ds, split="test")) == 2

    image, label, geom = load_case(ds.train[0], ds)
    assert image.shape == (1, 24, 20) and image.dtype == np.float32
    assert label is not None and label.shape == (24, 20) and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2} and geom.ndim == 2


def test_nnunet_3d_nifti(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(shape=(10, 9, 6), spacing=(0.8, 0.8, 2.5))
    ds = find_dataset(root)
    assert ds.file_ending == ".nii.gz"
    facts = validate_dataset(ds)
    assert facts[0]["shape"] == [10, 9, 6]
    np.testing.assert_allclose(facts[0]["spacing"], [0.8, 0.8, 2.5])
    image, label, geom = load_case(ds.train[0], ds)
    assert image.shape == (1, 10, 9, 6) and label.shape == (10, 9, 6)
    np.testing.assert_allclose(geom.spacing, (0.8, 0.8, 2.5))


def test_multi_channel_case(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(channel_files=2)
    ds = find_dataset(root)
    assert ds.channel_names == ["mod0", "mod1"]
    assert [p.name for p in ds.train[0].image_paths] == ["case000_0000.png", "case000_0001.png"]
    validate_dataset(ds)
    image, _, _ = load_case(ds.train[0], ds)
    assert image.shape == (2, 24, 20)
    from medunet.io import read_image

    np.testing.assert_array_equal(image[1], read_image(ds.train[0].image_paths[1])[0][0])


def test_rgb_file_is_three_channels(tmp_dataset: MakeDataset) -> None:
    """As in nnU-Net (and the DRIVE data): one RGB PNG per case, channel_names R, G, B."""
    ds = find_dataset(tmp_dataset(rgb=True))
    assert ds.channel_names == ["R", "G", "B"]
    assert len(ds.train[0].image_paths) == 1
    assert validate_dataset(ds)[0]["channels"] == 3
    assert load_case(ds.train[0], ds)[0].shape == (3, 24, 20)


def test_non_consecutive_label_values_map_to_class_indices(tmp_dataset: MakeDataset) -> None:
    ds = find_dataset(tmp_dataset(labels={"background": 0, "a": 2, "b": 5}))
    assert ds.label_values == [0, 2, 5]
    validate_dataset(ds)
    _, label, _ = load_case(ds.train[0], ds)
    assert set(np.unique(label)) == {0, 1, 2}
    _, raw, _ = load_case(ds.train[0])  # without the dataset: raw values
    assert set(np.unique(raw)) == {0, 2, 5}


def test_folder_layout_with_0_255_masks(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(layout="folders", n_train=4, mask_scale=255)
    ds = find_dataset(root)
    assert ds.layout == "folders" and len(ds.train) == 4
    assert ds.train[0].image_paths == [root / "images" / "case000.png"]
    assert ds.train[0].label_path == root / "masks" / "case000.png"
    assert ds.channel_names == ["channel0"] and ds.label_values == []
    validate_dataset(ds)
    assert ds.label_values == [0, 255] and ds.num_classes == 2
    assert ds.label_names == ["background", "foreground"]
    _, label, _ = load_case(ds.train[0], ds)
    assert set(np.unique(label)) == {0, 1}


def test_folder_layout_mask_suffix_is_matched(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(layout="folders", n_train=2, mask_suffix="_mask")
    ds = find_dataset(root)
    assert [c.label_path for c in ds.train] == [
        root / "masks" / "case000_mask.png", root / "masks" / "case001_mask.png"
    ]
    validate_dataset(ds)
    assert ds.label_values == [0, 1]


def test_folder_layout_with_labels_dir_and_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    write_png(tmp_path / "images" / "x.png", rng.integers(0, 256, (8, 9, 3), dtype=np.uint8))
    write_png(tmp_path / "labels" / "x.png", np.eye(8, 9, dtype=np.uint8))
    ds = find_dataset(tmp_path)
    assert ds.channel_names == ["R", "G", "B"]
    assert ds.train[0].label_path == tmp_path / "labels" / "x.png"
    validate_dataset(ds)


def test_unlabelled_folder_validates_without_labels(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "u.png", np.zeros((5, 5), np.uint8))
    ds = find_dataset(tmp_path)
    assert ds.train[0].label_path is None
    assert len(validate_dataset(ds, require_labels=False)) == 1


# --------------------------------------------------------------------------- errors


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dataset folder not found"):
        find_dataset(tmp_path / "missing")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(InputError, match="no dataset found") as err:
        find_dataset(tmp_path / "stuff")
    assert "stuff" in str(err.value) and "imagesTr" in str(err.value)


def test_dataset_json_problems(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()
    meta_path = root / "dataset.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text("{ not json")
    with pytest.raises(InputError, match="cannot read JSON") as err:
        find_dataset(root)
    assert "dataset.json" in str(err.value) and "\n" not in str(err.value)

    for broken, pattern in [
        ({k: v for k, v in meta.items() if k != "labels"}, "'labels' is missing"),
        ({**meta, "labels": {"fg": 1}}, "background = 0"),
        ({**meta, "labels": {"background": 0, "fg": [1, 2]}}, "region-based"),
        ({**meta, "labels": {"background": 0, "a": 1, "b": 1}}, "repeat"),
        ({**meta, "channel_names": {"1": "T1"}}, "without gaps"),
    ]:
        meta_path.write_text(json.dumps(broken))
        with pytest.raises(InputError, match=pattern) as err:
            find_dataset(root)
        assert "dataset.json" in str(err.value)

    meta_path.unlink()
    with pytest.raises(InputError, match="dataset.json is missing"):
        find_dataset(root)


def test_no_cases(tmp_dataset: MakeDataset) -> None:
    ds = find_dataset(tmp_dataset(n_train=0))
    assert ds.train == []
    msg = _error(ds)
    assert "no cases found" in msg and "imagesTr" in msg and "CASE_0000.png" in msg


def test_missing_label(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()
    (root / "labelsTr" / "case001.png").unlink()
    ds = find_dataset(root)
    msg = _error(ds)
    assert "case 'case001' has no label" in msg and "case001_0000.png" in msg
    assert "labelsTr/case001.png" in msg


def test_shape_mismatch(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()
    write_png(root / "labelsTr" / "case002.png", np.zeros((24, 21), np.uint8))
    msg = _error(find_dataset(root))
    assert "label shape (24, 21) does not match image shape (24, 20)" in msg
    assert "case002.png" in msg


def test_spacing_mismatch(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(shape=(6, 5, 4), spacing=(1.0, 1.0, 2.0))
    write_nifti(root / "labelsTr" / "case000.nii.gz", np.zeros((6, 5, 4), np.uint8),
                np.diag([1.0, 1.0, 3.0, 1.0]))
    msg = _error(find_dataset(root))
    assert "spacing" in msg and "case000.nii.gz" in msg


def test_undeclared_label_value(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()
    lab = np.zeros((24, 20), np.uint8)
    lab[3:6, 3:6] = 7
    write_png(root / "labelsTr" / "case001.png", lab)
    msg = _error(find_dataset(root))
    assert "label values [7] are not declared (declared: [0, 1])" in msg
    assert "case001.png" in msg and "dataset.json" in msg


@pytest.mark.parametrize("which", ["imagesTr/case001_0000.png", "labelsTr/case002.png"])
def test_empty_file(tmp_dataset: MakeDataset, which: str) -> None:
    root = tmp_dataset()
    (root / which).write_bytes(b"")
    msg = _error(find_dataset(root))
    assert "empty (0 bytes)" in msg and which.split("/")[1] in msg


def test_unreadable_file(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()
    data = (root / "imagesTr" / "case000_0000.png").read_bytes()
    (root / "imagesTr" / "case000_0000.png").write_bytes(data[: len(data) // 3])
    msg = _error(find_dataset(root))
    assert "cannot read image" in msg and "case000_0000.png" in msg


def test_mixed_2d_and_3d(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", np.zeros((6, 6), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.eye(6, dtype=np.uint8))
    write_nifti(tmp_path / "images" / "b.nii.gz", np.zeros((6, 6, 3), np.float32))
    write_nifti(tmp_path / "masks" / "b.nii.gz", np.ones((6, 6, 3), np.uint8))
    msg = _error(find_dataset(tmp_path))
    assert "3D but earlier cases are 2D" in msg and "b.nii.gz" in msg


def test_mixed_channel_counts_in_folders(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", np.zeros((6, 6), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.eye(6, dtype=np.uint8))
    write_png(tmp_path / "images" / "b.png", np.zeros((6, 6, 3), np.uint8))
    write_png(tmp_path / "masks" / "b.png", np.eye(6, dtype=np.uint8))
    msg = _error(find_dataset(tmp_path))
    assert "3 channels, earlier cases have 1" in msg and "b.png" in msg


def test_wrong_channel_count(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()  # dataset.json declares 1 channel
    write_png(root / "imagesTr" / "case001_0000.png", np.zeros((24, 20, 3), np.uint8))
    msg = _error(find_dataset(root))
    assert "3 channel(s) but dataset.json declares 1" in msg and "case001_0000.png" in msg


def test_channel_file_beyond_declared_channels(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()
    write_png(root / "imagesTr" / "case000_0001.png", np.zeros((24, 20), np.uint8))
    with pytest.raises(InputError, match="declares 1 channel") as err:
        find_dataset(root)
    assert "case000_0001.png" in str(err.value)


def test_case_missing_a_channel_file(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(channel_files=2)
    (root / "imagesTr" / "case002_0001.png").unlink()
    with pytest.raises(InputError, match="case 'case002' lacks channel file") as err:
        find_dataset(root)
    assert "case002_0001" in str(err.value)


def test_image_without_channel_suffix(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()
    write_png(root / "imagesTr" / "stray.png", np.zeros((24, 20), np.uint8))
    with pytest.raises(InputError, match="lacks the channel suffix") as err:
        find_dataset(root)
    assert "stray.png" in str(err.value)


def test_channel_files_of_different_size(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(channel_files=2)
    write_png(root / "imagesTr" / "case000_0001.png", np.zeros((24, 19), np.uint8))
    msg = _error(find_dataset(root))
    assert "differs" in msg and "case000_0001.png" in msg


def test_only_background(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", np.zeros((6, 6), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((6, 6), np.uint8))
    assert "only background" in _error(find_dataset(tmp_path))


def test_hidden_and_other_files_are_ignored(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset()
    (root / "imagesTr" / ".case000_0000.png.tmp").write_bytes(b"")
    (root / "imagesTr" / "notes.txt").write_text("x")
    (root / "imagesTr" / ".DS_Store").write_bytes(b"\0")
    assert len(find_dataset(root).train) == 3


# --------------------------------------------------------------------------- real data


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name, n_train, channels, shape_len",
    [("Dataset002_ISBIEM", 25, 1, 2), ("Dataset003_LeftAtrium", 80, 1, 3),
     ("Dataset001_DRIVE", 20, 3, 2)],
)
def test_shared_datasets_validate(shared_data: Path, name: str, n_train: int, channels: int,
                                  shape_len: int) -> None:
    ds = find_dataset(shared_data / name)
    assert ds.layout == "nnunet" and len(ds.train) == n_train
    assert ds.num_channels == channels and ds.label_values == [0, 1]
    facts = validate_dataset(ds)
    assert len(facts) == n_train
    assert all(f["channels"] == channels and len(f["shape"]) == shape_len for f in facts)
    assert all(set(f["label_values"]) <= {0, 1} for f in facts)


def test_nonfinite_image_is_refused_naming_the_file(tmp_dataset: MakeDataset) -> None:
    root = tmp_dataset(shape=(6, 5, 4), spacing=(1.0, 1.0, 2.0))
    bad = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    bad[1, 2, 3] = np.nan
    write_nifti(root / "imagesTr" / "case001_0000.nii.gz", bad, np.diag([1.0, 1.0, 2.0, 1.0]))
    msg = _error(find_dataset(root))
    assert "case001_0000.nii.gz: case 'case001': image has 1 non-finite voxel(s)" in msg


@pytest.mark.parametrize("label_affine, expected", [
    (np.array([[1.0, 0, 0, 0.5], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]), "label origin"),
    (np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]), "label axis directions"),
    (np.array([[1.0, 0, 0, 0.001], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]), None),  # within 1 %
])
def test_label_origin_and_direction_must_match_the_image(tmp_dataset: MakeDataset, label_affine: np.ndarray,
                                                         expected: str | None) -> None:
    root = tmp_dataset(shape=(6, 5, 4), spacing=(1.0, 1.0, 2.0))
    write_nifti(root / "labelsTr" / "case002.nii.gz", np.zeros((6, 5, 4), np.uint8) + (np.arange(4) == 1),
                label_affine)
    if expected is None:
        validate_dataset(find_dataset(root))
        return
    msg = _error(find_dataset(root))
    assert f"case002.nii.gz: case 'case002': {expected}" in msg and "resample the label" in msg


def test_label_in_another_format_compares_in_one_world_frame(tmp_path: Path) -> None:
    """A NIfTI image (RAS) and its NRRD label (LPS) with the same placement are on one grid."""
    from medunet.io import Geometry, read_image, write_image

    root = tmp_path / "ds"
    affine = np.array([[-0.8, 0, 0, 12.0], [0, 0.8, 0, -7.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
    for i in range(2):
        write_nifti(root / "imagesTr" / f"c{i}_0000.nii.gz", np.ones((6, 5, 4), np.float32), affine)
        _, geom = read_image(root / "imagesTr" / f"c{i}_0000.nii.gz")
        lab = np.zeros((1, 6, 5, 4), np.uint8)
        lab[0, 2:4, 2:4, 1:3] = 1
        write_image(root / "labelsTr" / f"c{i}.nrrd", lab, geom)  # converted to LPS on the way
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "x": 1}, "numTraining": 2}))
    validate_dataset(find_dataset(root))
    write_image(root / "labelsTr" / "c1.nrrd", lab,
                Geometry(spacing=(0.8, 0.8, 2.5), origin=(12.0, -7.0, 3.0), fmt="itk"))  # RAS numbers as LPS
    assert "label origin" in _error(find_dataset(root))
