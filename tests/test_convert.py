"""medunet convert: MSD tasks and image/mask folders -> nnU-Net v2 raw layout, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medunet.datasets import find_dataset, load_case, validate_dataset
from medunet.datasets.convert import convert_dataset
from medunet.errors import InputError
from medunet.io import read_image

AFFINE = np.array([[0.0, -1.5, 0.0, 40.0],
                   [1.2, 0.0, 0.0, -12.5],
                   [0.0, 0.0, 3.0, 7.25],
                   [0.0, 0.0, 0.0, 1.0]])


def _msd_task(root: Path, n_train: int = 2) -> Path:
    """A tiny Decathlon task: 2 modalities in 4D NIfTI, labels 0/1/2, one test case."""
    task = root / "Task09_Tiny"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    training = []
    for i in range(n_train):
        img = rng.integers(-100, 1000, (6, 5, 4, 2)).astype(np.int16)
        lab = np.zeros((6, 5, 4), np.uint8)
        lab[1:3, 1:3, 1:3] = 1
        lab[4, 3, 2] = 2
        nib.save(nib.Nifti1Image(img, AFFINE), task / "imagesTr" / f"tiny_{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, AFFINE), task / "labelsTr" / f"tiny_{i:02d}.nii.gz")
        training.append({"image": f"./imagesTr/tiny_{i:02d}.nii.gz",
                         "label": f"./labelsTr/tiny_{i:02d}.nii.gz"})
    # a macOS resource fork, listed as the archives sometimes do: it must be skipped
    (task / "imagesTr" / "._tiny_00.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    training.append({"image": "./imagesTr/._tiny_00.nii.gz", "label": "./labelsTr/._tiny_00.nii.gz"})
    test_img = rng.integers(0, 50, (6, 5, 4, 2)).astype(np.int16)
    nib.save(nib.Nifti1Image(test_img, AFFINE), task / "imagesTs" / "tiny_99.nii.gz")
    meta = {
        "name": "TINY", "description": "generated", "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": n_train, "numTest": 1,
        "training": training, "test": ["./imagesTs/tiny_99.nii.gz"],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def _png_folder(root: Path) -> Path:
    """images/ (two RGB PNGs and one RGB JPG) + masks/ with 0/255 values."""
    src = root / "pairs"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i, ext in enumerate([".png", ".png", ".jpg"]):
        img = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
        Image.fromarray(img).save(src / "images" / f"case{i}{ext}")
        mask = np.zeros((12, 10), np.uint8)
        mask[2:6, 3:8] = 255
        name = f"case{i}_mask.png" if i == 2 else f"case{i}.png"  # matched by stem, _mask too
        Image.fromarray(mask).save(src / "masks" / name)
    (src / "images" / "._case0.png").write_bytes(b"junk")  # macOS junk: ignored
    return src


def test_msd_task_with_two_modalities(tmp_path):
    task = _msd_task(tmp_path)
    out = convert_dataset(task, tmp_path / "raw", dataset_id=9)
    assert out == tmp_path / "raw" / "Dataset009_Tiny"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1w"}
    assert meta["labels"] == {"background": 0, "edema": 1, "tumour": 2}
    assert meta["numTraining"] == 2 and meta["numTest"] == 1 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "tiny_00_0000.nii.gz", "tiny_00_0001.nii.gz", "tiny_01_0000.nii.gz", "tiny_01_0001.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [
        "tiny_99_0000.nii.gz", "tiny_99_0001.nii.gz"]

    ds = find_dataset(out)
    facts = validate_dataset(ds, "train")
    validate_dataset(ds, "test", require_labels=False)
    assert ds.num_channels == 2 and ds.label_values == [0, 1, 2]
    assert [f["channels"] for f in facts] == [2, 2]
    assert sorted({v for f in facts for v in f["label_values"]}) == [0, 1, 2]

    for case in ("tiny_00", "tiny_01"):
        src = nib.load(task / "imagesTr" / f"{case}.nii.gz")
        for c in range(2):
            ch = nib.load(out / "imagesTr" / f"{case}_{c:04d}.nii.gz")
            assert ch.shape == (6, 5, 4)
            np.testing.assert_array_equal(np.asarray(ch.dataobj), np.asarray(src.dataobj)[..., c])
            np.testing.assert_allclose(ch.affine, src.affine, atol=1e-6)
            assert ch.get_data_dtype() == np.int16
        lab_src = nib.load(task / "labelsTr" / f"{case}.nii.gz")
        lab_out = nib.load(out / "labelsTr" / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(lab_out.dataobj), np.asarray(lab_src.dataobj))
        np.testing.assert_allclose(lab_out.affine, AFFINE, atol=1e-6)
    image, label, _ = load_case(ds.train[0], ds)
    assert image.shape == (2, 6, 5, 4) and label.max() == 2
    # nothing else was left beside the output
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset009_Tiny"]


def test_image_mask_folder_png_and_jpg(tmp_path):
    src = _png_folder(tmp_path)
    out = convert_dataset(src, tmp_path / "Pairs", name="Pairs")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "foreground": 1}
    assert meta["label_mapping"] == {"0": 0, "255": 1}
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["file_ending"] == ".png" and meta["numTraining"] == 3 and meta["name"] == "Pairs"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "case0_0000.png", "case1_0000.png", "case2_0000.png"]
    assert not (out / "imagesTs").exists()

    ds = find_dataset(out)
    validate_dataset(ds, "train")
    assert ds.num_channels == 3 and ds.label_values == [0, 1]
    for i, ext in enumerate([".png", ".png", ".jpg"]):
        want, _ = read_image(src / "images" / f"case{i}{ext}")  # the JPG's decoded pixels
        got, _ = read_image(out / "imagesTr" / f"case{i}_0000.png")
        np.testing.assert_array_equal(got, want)
        lab = np.asarray(Image.open(out / "labelsTr" / f"case{i}.png"))
        assert sorted(np.unique(lab).tolist()) == [0, 1]
        assert lab[2:6, 3:8].all() and lab.sum() == 20


def test_mask_values_become_consecutive_classes(tmp_path):
    src = tmp_path / "grey"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    img = np.zeros((2, 3, 4), np.float32)  # 3D NIfTI volumes, one with a rotated affine
    nib.save(nib.Nifti1Image(img, AFFINE), src / "images" / "a.nii.gz")
    nib.save(nib.Nifti1Image(img + 1, np.eye(4)), src / "images" / "b.nii.gz")
    m = np.zeros((2, 3, 4), np.uint8)
    m[0, 0, 0], m[1, 2, 3] = 100, 200
    nib.save(nib.Nifti1Image(m, AFFINE), src / "masks" / "a.nii.gz")
    nib.save(nib.Nifti1Image(m // 2, np.eye(4)), src / "masks" / "b.nii.gz")  # values 0, 50, 100
    out = convert_dataset(src, tmp_path / "out")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["label_mapping"] == {"0": 0, "50": 1, "100": 2, "200": 3}
    assert meta["labels"] == {"background": 0, "class_50": 1, "class_100": 2, "class_200": 3}
    assert meta["file_ending"] == ".nii.gz" and meta["name"] == "out"
    a = nib.load(out / "labelsTr" / "a.nii.gz")
    assert a.get_fdata()[0, 0, 0] == 2 and a.get_fdata()[1, 2, 3] == 3
    np.testing.assert_allclose(a.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(nib.load(out / "imagesTr" / "a_0000.nii.gz").affine, AFFINE, atol=1e-6)
    ds = find_dataset(out)
    validate_dataset(ds)
    assert ds.label_values == [0, 1, 2, 3] and ds.num_channels == 1


def _assert_nothing_left(parent: Path, before: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == before


def test_errors_leave_nothing_behind(tmp_path):
    out_root = tmp_path / "outputs"
    out_root.mkdir()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no dataset found"):
        convert_dataset(empty, out_root / "x")
    _assert_nothing_left(out_root, set())

    # an image without a mask
    src = _png_folder(tmp_path)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(src / "images" / "orphan.png")
    with pytest.raises(InputError, match="no mask") as err:
        convert_dataset(src, out_root / "x")
    assert "orphan.png" in str(err.value)
    _assert_nothing_left(out_root, set())
    (src / "images" / "orphan.png").unlink()

    # an unreadable image: fails while writing, after the temporary folder exists
    (src / "images" / "case1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InputError, match="cannot read") as err:
        convert_dataset(src, out_root / "x")
    assert "case1.png" in str(err.value)
    _assert_nothing_left(out_root, set())

    # the raw root the id form would create is removed again too
    with pytest.raises(InputError):
        convert_dataset(src, out_root / "new_root", dataset_id=3)
    _assert_nothing_left(out_root, set())


def test_msd_errors(tmp_path):
    task = _msd_task(tmp_path, n_train=1)
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    meta = json.loads((task / "dataset.json").read_text())

    meta["modality"] = {"0": "FLAIR"}  # but the 4D files hold 2 channels
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="2 channel") as err:
        convert_dataset(task, out_root / "x")
    assert "tiny_00.nii.gz" in str(err.value)
    _assert_nothing_left(out_root, set())

    meta["modality"] = {"0": "FLAIR", "1": "T1w"}
    meta["labels"] = {"0": "background", "1": "edema"}  # label value 2 is undeclared
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"label values \[2\]"):
        convert_dataset(task, out_root / "x")
    _assert_nothing_left(out_root, set())

    meta["training"][0]["label"] = "./labelsTr/gone.nii.gz"
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="missing") as err:
        convert_dataset(task, out_root / "x")
    assert "gone.nii.gz" in str(err.value)
    _assert_nothing_left(out_root, set())

    (task / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        convert_dataset(task, out_root / "x")
    _assert_nothing_left(out_root, set())


def test_refuses_a_non_empty_destination(tmp_path):
    src = _png_folder(tmp_path)
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        convert_dataset(src, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # an empty destination folder is fine
    empty = tmp_path / "empty_dst"
    empty.mkdir()
    assert convert_dataset(src, empty) == empty and (empty / "dataset.json").is_file()
    with pytest.raises(InputError, match="already in the nnU-Net v2 layout"):
        convert_dataset(empty, tmp_path / "again")


def test_lossy_masks_are_refused(tmp_path):
    src = tmp_path / "jpg_masks"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(src / "images" / "a.png")
    # a grey JPEG "mask": dozens of distinct values, not classes
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(src / "masks" / "a.jpg")
    with pytest.raises(InputError, match="distinct values") as err:
        convert_dataset(src, tmp_path / "out")
    assert "a.jpg" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jpg_masks"]
