"""medunet.io: round trips keep data and geometry; errors name the file; writes are atomic."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medunet.errors import InputError
from medunet.io import Geometry, read_image, read_label, split_suffix, write_image
from medunet.io import image as io_image

RNG = np.random.default_rng(0)


def _files(folder: Path) -> list[str]:
    """Everything in a folder, hidden temporary files and folders included."""
    return sorted(p.name for p in folder.iterdir())


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


SPACING = np.array([0.7, 1.3, 2.9])
ORIGIN = np.array([-12.5, 40.25, 7.1])
ROT = _rotation(0.35, -0.17, 0.61)
AFFINE = np.eye(4)
AFFINE[:3, :3] = ROT * SPACING  # columns: axis directions scaled by spacing
AFFINE[:3, 3] = ORIGIN


# --------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.nii.gz", ("a", ".nii.gz")),
        ("CASE_0000.NII.GZ", ("CASE_0000", ".NII.GZ")),
        ("b.nii", ("b", ".nii")),
        ("c.png", ("c", ".png")),
        ("d.mha", ("d", ".mha")),
        ("e.tiff", ("e", ".tiff")),
        ("f.tar.gz", ("f.tar", ".gz")),
        ("dir/g.nrrd", ("g", ".nrrd")),
    ],
)
def test_split_suffix(name: str, expected: tuple[str, str]) -> None:
    assert split_suffix(name) == expected


# --------------------------------------------------------------------------- 2D formats


def test_png_grey_round_trip(tmp_path: Path) -> None:
    arr = RNG.integers(0, 256, (1, 23, 31), dtype=np.uint8)
    write_image(tmp_path / "g.png", arr)
    back, geom = read_image(tmp_path / "g.png")
    assert back.shape == (1, 23, 31) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, arr)
    assert geom.spacing == (1.0, 1.0) and geom.origin == (0.0, 0.0)
    assert geom.direction == (1.0, 0.0, 0.0, 1.0) and geom.fmt == "natural"


def test_png_rgb_round_trip(tmp_path: Path) -> None:
    arr = RNG.integers(0, 256, (3, 17, 29), dtype=np.uint8)
    write_image(tmp_path / "rgb.png", arr)
    back, _ = read_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(back, arr)


def test_png_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = RNG.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    back, _ = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(back, np.moveaxis(rgba[..., :3], -1, 0))


def test_png_16bit_round_trip(tmp_path: Path) -> None:
    arr = RNG.integers(0, 65536, (1, 19, 21)).astype(np.uint16)
    arr[0, 0, 0] = 65535
    write_image(tmp_path / "deep.png", arr)
    back, _ = read_image(tmp_path / "deep.png")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, arr)


def test_png_refuses_values_it_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot be written") as err:
        write_image(tmp_path / "neg.png", np.full((5, 5), -3, np.int32))
    assert "neg.png" in str(err.value) and ".tmp" not in str(err.value)
    with pytest.raises(InputError, match="cannot be written"):
        write_image(tmp_path / "big.png", np.full((5, 5), 70000, np.int32))
    assert _files(tmp_path) == []


def test_jpg_round_trip_is_lossy_but_close(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:40, 0:48]
    smooth = np.stack([(xx * 5) % 256, (yy * 6) % 256, ((xx + yy) * 2) % 256]).astype(np.uint8)
    write_image(tmp_path / "photo.jpg", smooth)
    back, geom = read_image(tmp_path / "photo.jpg")
    assert back.shape == smooth.shape and back.dtype == np.uint8
    assert np.abs(back.astype(float) - smooth).mean() < 8
    assert geom.ndim == 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_grey_round_trip(tmp_path: Path, dtype: type) -> None:
    arr = (RNG.random((1, 13, 22)) * 1000).astype(dtype)
    write_image(tmp_path / "g.tif", arr)
    back, geom = read_image(tmp_path / "g.tif")
    assert back.dtype == dtype and geom.fmt == "tiff" and geom.ndim == 2
    np.testing.assert_array_equal(back, arr)


def test_tiff_rgb_round_trip(tmp_path: Path) -> None:
    arr = RNG.integers(0, 256, (3, 15, 11), dtype=np.uint8)
    write_image(tmp_path / "rgb.tiff", arr)
    back, _ = read_image(tmp_path / "rgb.tiff")
    np.testing.assert_array_equal(back, arr)


def test_tiff_stack_reads_as_3d_and_writes_back(tmp_path: Path) -> None:
    import tifffile

    stack = RNG.integers(0, 4000, (6, 10, 12)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    back, geom = read_image(tmp_path / "stack.tif")
    assert back.shape == (1, 6, 10, 12) and geom.ndim == 3
    label = (back[0] > 2000).astype(np.int64)
    write_image(tmp_path / "stack_label.tif", label, geom)
    np.testing.assert_array_equal(read_label(tmp_path / "stack_label.tif")[0], label)


# --------------------------------------------------------------------------- NIfTI


def _nifti_input(path: Path, mode: str, data: np.ndarray) -> np.ndarray:
    """Write ``data`` with AFFINE in one of the ways real files carry it; returns the affine
    nibabel reads back (the reference a written label must reproduce exactly)."""
    img = nib.Nifti1Image(data, AFFINE)
    if mode == "qform_only":  # common for scanner converters: no sform, quaternion only
        img.set_sform(None, code=0)
        img.set_qform(AFFINE, code=1)
    elif mode == "sform_shear":  # an sform the quaternion cannot represent
        sheared = AFFINE.copy()
        sheared[0, 1] += 0.3
        img.set_sform(sheared, code=2)
        img.set_qform(AFFINE, code=1)
    nib.save(img, str(path))
    return nib.load(str(path)).affine


@pytest.mark.parametrize("mode", ["sform_and_qform", "qform_only", "sform_shear"])
def test_nifti_label_keeps_affine_exactly(tmp_path: Path, mode: str) -> None:
    data = RNG.random((9, 7, 5)).astype(np.float32)
    ref = _nifti_input(tmp_path / "img.nii.gz", mode, data)

    arr, geom = read_image(tmp_path / "img.nii.gz")
    assert arr.shape == (1, 9, 7, 5) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[0], data)
    assert geom.fmt == "nifti" and geom.ndim == 3
    np.testing.assert_allclose(geom.affine_matrix, ref)
    np.testing.assert_allclose(geom.origin, ref[:3, 3])
    if mode != "sform_shear":
        np.testing.assert_allclose(geom.spacing, SPACING, rtol=1e-6)
        np.testing.assert_allclose(np.reshape(geom.direction, (3, 3)), ROT, atol=1e-6)

    label = (arr[0] > 0.5).astype(np.int64)  # what an argmax gives: int64, no channel axis
    write_image(tmp_path / "lab.nii.gz", label, geom)
    out = nib.load(str(tmp_path / "lab.nii.gz"))
    assert np.array_equal(out.affine, ref)
    assert out.shape == data.shape
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), label)
    lab_back, lab_geom = read_label(tmp_path / "lab.nii.gz")
    np.testing.assert_array_equal(lab_back, label)
    assert np.array_equal(lab_geom.affine_matrix, ref)


def test_nifti_geometry_survives_json(tmp_path: Path) -> None:
    """A Geometry stored in JSON (e.g. beside a cached case) still writes the exact affine."""
    ref = _nifti_input(tmp_path / "img.nii.gz", "qform_only", np.zeros((4, 5, 6), np.int16))
    _, geom = read_image(tmp_path / "img.nii.gz")
    geom2 = Geometry.from_dict(json.loads(json.dumps(geom.to_dict())))
    write_image(tmp_path / "lab.nii.gz", np.ones((4, 5, 6), np.uint8), geom2)
    assert np.array_equal(nib.load(str(tmp_path / "lab.nii.gz")).affine, ref)


def test_nifti_changed_geometry_wins_over_stored_header(tmp_path: Path) -> None:
    _nifti_input(tmp_path / "img.nii.gz", "sform_and_qform", np.zeros((4, 5, 6), np.float32))
    _, geom = read_image(tmp_path / "img.nii.gz")
    moved = AFFINE.copy()
    moved[:3, 3] += 10.0
    geom.affine = tuple(moved.ravel())
    write_image(tmp_path / "lab.nii.gz", np.ones((4, 5, 6), np.uint8), geom)
    np.testing.assert_allclose(nib.load(str(tmp_path / "lab.nii.gz")).affine, moved, atol=1e-5)


def test_nifti_2d_keeps_its_shape(tmp_path: Path) -> None:
    data = RNG.random((8, 6)).astype(np.float32)
    ref = _nifti_input(tmp_path / "slice.nii.gz", "sform_and_qform", data)
    arr, geom = read_image(tmp_path / "slice.nii.gz")
    assert arr.shape == (1, 8, 6, 1)
    lab = (arr[0] > 0.5).astype(np.uint8)  # (8, 6, 1), as the pipeline sees a 2D NIfTI
    write_image(tmp_path / "lab.nii", lab, geom)
    out = nib.load(str(tmp_path / "lab.nii"))
    assert out.shape == (8, 6) and np.array_equal(out.affine, ref)


def test_nifti_4d_reads_as_channels(tmp_path: Path) -> None:
    data = RNG.random((5, 6, 7, 2)).astype(np.float32)  # NIfTI keeps modalities last
    ref = _nifti_input(tmp_path / "multi.nii.gz", "sform_and_qform", data)
    arr, geom = read_image(tmp_path / "multi.nii.gz")
    assert arr.shape == (2, 5, 6, 7) and geom.ndim == 3
    np.testing.assert_array_equal(arr, np.moveaxis(data, -1, 0))
    write_image(tmp_path / "copy.nii.gz", arr, geom)  # channel-first goes back to channels last
    out = nib.load(str(tmp_path / "copy.nii.gz"))
    assert out.shape == data.shape and np.array_equal(out.affine, ref)
    write_image(tmp_path / "lab.nii.gz", (arr[0] > 0.5).astype(np.uint8), geom)
    assert nib.load(str(tmp_path / "lab.nii.gz")).shape == data.shape[:3]


def test_nifti_without_geometry_and_from_2d_geometry(tmp_path: Path) -> None:
    write_image(tmp_path / "plain.nii.gz", np.zeros((3, 4, 5), np.float32))
    assert np.array_equal(nib.load(str(tmp_path / "plain.nii.gz")).affine, np.eye(4))
    geom2d = Geometry(spacing=(0.5, 2.0), origin=(3.0, 4.0))
    write_image(tmp_path / "flat.nii.gz", np.zeros((6, 7), np.uint8), geom2d)
    expected = np.diag([0.5, 2.0, 1.0, 1.0])
    expected[:2, 3] = (3.0, 4.0)
    assert np.array_equal(nib.load(str(tmp_path / "flat.nii.gz")).affine, expected)


# --------------------------------------------------------------------------- ITK formats


def _itk_geometry() -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    return (0.6, 1.1, 3.0), (5.5, -20.0, 100.25), tuple(ROT.ravel().tolist())


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd", ".nhdr"])
def test_itk_round_trip_keeps_geometry(tmp_path: Path, suffix: str) -> None:
    spacing, origin, direction = _itk_geometry()
    zyx = RNG.integers(-1000, 3000, (4, 6, 9)).astype(np.int16)  # SimpleITK order (z, y, x)
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(tmp_path / f"in{suffix}"))

    arr, geom = read_image(tmp_path / f"in{suffix}")
    assert arr.shape == (1, 9, 6, 4)  # (C, x, y, z): spacing[i] belongs to array axis i + 1
    np.testing.assert_array_equal(arr[0], zyx.transpose(2, 1, 0))
    assert geom.fmt == "itk"
    np.testing.assert_allclose(geom.spacing, spacing)
    np.testing.assert_allclose(geom.origin, origin)
    np.testing.assert_allclose(geom.direction, direction, atol=1e-12)

    label = (arr[0] > 1000).astype(np.int64)
    out_dir = tmp_path / "out"
    write_image(out_dir / f"lab{suffix}", label, geom)
    back = sitk.ReadImage(str(out_dir / f"lab{suffix}"))
    np.testing.assert_allclose(back.GetSpacing(), spacing)
    np.testing.assert_allclose(back.GetOrigin(), origin)
    np.testing.assert_allclose(back.GetDirection(), direction, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label.transpose(2, 1, 0))
    # detached headers keep their data file beside them, under its final name; no temp files
    expected = {".mhd": ["lab.mhd", "lab.zraw"], ".nhdr": ["lab.nhdr", "lab.raw.gz"]}
    assert _files(out_dir) == expected.get(suffix, [f"lab{suffix}"])


def test_mha_2d_and_vector_round_trip(tmp_path: Path) -> None:
    grey = RNG.random((1, 12, 7)).astype(np.float32)
    geom = Geometry(spacing=(0.25, 0.5), origin=(1.0, 2.0), direction=(0.0, 1.0, 1.0, 0.0))
    write_image(tmp_path / "grey.mha", grey, geom)
    back, bgeom = read_image(tmp_path / "grey.mha")
    np.testing.assert_array_equal(back, grey)
    assert bgeom.spacing == geom.spacing and bgeom.direction == geom.direction

    multi = RNG.random((3, 5, 6, 4)).astype(np.float32)  # 3 channels of a volume
    write_image(tmp_path / "multi.mha", multi, Geometry(spacing=(1.0, 2.0, 3.0)))
    back, bgeom = read_image(tmp_path / "multi.mha")
    np.testing.assert_array_equal(back, multi)
    assert bgeom.spacing == (1.0, 2.0, 3.0)


def _placement(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where SimpleITK (LPS world, for every format) puts an image."""
    img = sitk.ReadImage(str(path))
    return np.array(img.GetSpacing()), np.array(img.GetOrigin()), np.array(img.GetDirection())


def test_cross_format_writes_keep_the_physical_placement(tmp_path: Path) -> None:
    """NIfTI (RAS) -> MHA (LPS) and back: the output lies where the input lies."""
    _nifti_input(tmp_path / "in.nii.gz", "sform_and_qform", np.zeros((5, 6, 7), np.float32))
    arr, geom = read_image(tmp_path / "in.nii.gz")
    write_image(tmp_path / "out.mha", arr, geom)
    for a, b in zip(_placement(tmp_path / "in.nii.gz"), _placement(tmp_path / "out.mha"),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)

    spacing, origin, direction = _itk_geometry()
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    arr, geom = read_image(tmp_path / "in.nrrd")
    write_image(tmp_path / "out.nii.gz", arr, geom)
    for a, b in zip(_placement(tmp_path / "in.nrrd"), _placement(tmp_path / "out.nii.gz"),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------- labels


def test_read_label_accepts_grey_rgb_and_refuses_colour(tmp_path: Path) -> None:
    lab = RNG.integers(0, 3, (10, 12)).astype(np.uint8)
    Image.fromarray(np.stack([lab] * 3, -1)).save(tmp_path / "greyrgb.png")
    back, _ = read_label(tmp_path / "greyrgb.png")
    assert back.shape == (10, 12) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, lab)

    colour = np.stack([lab, lab * 2, lab], -1).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(InputError, match="colour channels") as err:
        read_label(tmp_path / "colour.png")
    assert "colour.png" in str(err.value)


def test_read_label_keeps_palette_indices(tmp_path: Path) -> None:
    lab = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    im = Image.fromarray(lab, mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # VOC-style colour palette
    im.save(tmp_path / "voc.png")
    np.testing.assert_array_equal(read_label(tmp_path / "voc.png")[0], lab)
    assert read_image(tmp_path / "voc.png")[0].shape == (3, 2, 3)  # as an image: RGB colours


def test_read_label_types(tmp_path: Path) -> None:
    write = lambda name, a: nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / name))  # noqa: E731
    write("f.nii.gz", np.array([[[0.0, 1.0], [2.0, 0.0]]], np.float32))
    lab, _ = read_label(tmp_path / "f.nii.gz")
    assert lab.dtype == np.uint8 and lab.tolist() == [[[0, 1], [2, 0]]]
    write("big.nii.gz", np.array([[[0, 300]]], np.int16))
    assert read_label(tmp_path / "big.nii.gz")[0].dtype == np.int64
    write("neg.nii.gz", np.array([[[0, -1]]], np.int16))  # must not wrap round to 255
    assert read_label(tmp_path / "neg.nii.gz")[0].tolist() == [[[0, -1]]]
    write("frac.nii.gz", np.array([[[0.0, 0.5]]], np.float32))
    with pytest.raises(InputError, match="non-integer") as err:
        read_label(tmp_path / "frac.nii.gz")
    assert "frac.nii.gz" in str(err.value)


# --------------------------------------------------------------------------- errors


def _assert_names_file(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert path.name in msg, msg
    assert "\n" not in msg, msg
    assert err.value.exit_code == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as err:
        read_image(tmp_path / "nothere.nii.gz")
    _assert_names_file(err, tmp_path / "nothere.nii.gz")


@pytest.mark.parametrize("name", ["empty.png", "empty.nii.gz", "empty.mha", "empty.tif"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError, match="empty") as err:
        read_image(tmp_path / name)
    _assert_names_file(err, tmp_path / name)


@pytest.mark.parametrize("name", ["cut.png", "cut.nii.gz", "cut.jpg", "cut.nrrd"])
def test_truncated_file(tmp_path: Path, name: str) -> None:
    arr = RNG.integers(0, 256, (1, 40, 50), dtype=np.uint8)
    write_image(tmp_path / f"full_{name}", arr, Geometry.identity(3) if "nrrd" in name else None)
    data = (tmp_path / f"full_{name}").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read") as err:
        read_image(tmp_path / name)
    _assert_names_file(err, tmp_path / name)


def test_garbage_with_image_suffix(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("this is not a PNG")
    with pytest.raises(InputError, match="cannot read") as err:
        read_image(tmp_path / "fake.png")
    _assert_names_file(err, tmp_path / "fake.png")


def test_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file type '.txt'") as err:
        read_image(tmp_path / "notes.txt")
    _assert_names_file(err, tmp_path / "notes.txt")
    with pytest.raises(InputError, match="cannot write format '.xyz'") as err:
        write_image(tmp_path / "out.xyz", np.zeros((4, 4), np.uint8))
    _assert_names_file(err, tmp_path / "out.xyz")
    assert _files(tmp_path) == ["notes.txt"]


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("name", ["a.png", "a.tif", "a.nii.gz", "a.nrrd", "sub/dir/a.mha"])
def test_write_leaves_only_the_target(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    write_image(target, np.ones((5, 6), np.uint8), Geometry.identity(2))
    assert _files(target.parent) == ["a" + split_suffix(name)[1]]


def test_written_file_has_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_image(tmp_path / "p.nii.gz", np.zeros((2, 3, 4), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "p.nii.gz").stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "pred.png"
    write_image(target, np.full((4, 4), 7, np.uint8))
    before = target.read_bytes()
    with pytest.raises(InputError, match="2D image") as err:  # 5 channels: not a 2D image
        write_image(target, np.zeros((5, 4, 4), np.uint8))
    _assert_names_file(err, target)
    assert target.read_bytes() == before
    assert _files(tmp_path) == ["pred.png"]


def test_crash_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "vol.nii.gz"
    write_image(target, np.zeros((3, 3, 3), np.uint8))
    before = target.read_bytes()

    def half_written(tmp: Path, array: np.ndarray, geometry: Geometry | None) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_image, "_write_nifti", half_written)
    with pytest.raises(InputError, match="No space left") as err:
        write_image(target, np.ones((3, 3, 3), np.uint8))
    _assert_names_file(err, target)
    assert target.read_bytes() == before
    assert _files(tmp_path) == ["vol.nii.gz"]


def test_write_into_unwritable_place_is_an_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError) as err:
        write_image(blocker / "out.png", np.zeros((2, 2), np.uint8))
    assert "out.png" in str(err.value)


def _huge_headers(tmp_path: Path) -> list[Path]:
    """Small files whose headers claim 5000**3 values: reading their data would need ~500 GB."""
    import struct

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "small.nii"))
    raw = bytearray((tmp_path / "small.nii").read_bytes())
    struct.pack_into("<8h", raw, 40, 3, 5000, 5000, 5000, 1, 1, 1, 1)  # the header's dim field
    (tmp_path / "huge.nii").write_bytes(raw)
    (tmp_path / "huge.nrrd").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 5000 5000 5000\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\nendian: little\n\n")
    (tmp_path / "huge.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 5000 5000 5000\nElementSpacing = 1 1 1\n"
        b"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n" + bytes(64))
    return [tmp_path / "huge.nii", tmp_path / "huge.nrrd", tmp_path / "huge.mha"]


def test_oversized_headers_are_refused_before_reading(tmp_path, monkeypatch):
    for path in _huge_headers(tmp_path):
        with pytest.raises(InputError, match=r"holds 125,000,000,000 values, more than the limit of 1,073,"):
            read_image(path)
        with pytest.raises(InputError, match="more than the limit"):
            read_label(path)
    # 2D formats: Pillow and tifffile give the size before decoding
    write_image(tmp_path / "c.png", np.zeros((3, 40, 30), np.uint8))
    import tifffile

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((5, 30, 20), np.uint8))
    monkeypatch.setattr(io_image, "MAX_VOXELS", 3000)
    with pytest.raises(InputError, match=r"c.png: image of shape \(3, 40, 30\) holds 3,600 values"):
        read_image(tmp_path / "c.png")
    monkeypatch.setattr(io_image, "MAX_VOXELS", 2999)
    with pytest.raises(InputError, match=r"s.tif: image of shape \(5, 30, 20\) holds 3,000 values, more than "
                                         r"the limit of 2,999 .* raise the limit \(medunet --max-voxels N\)"):
        read_image(tmp_path / "s.tif")
    monkeypatch.setenv("MEDUNET_MAX_VOXELS", "4000")  # no environment variable changes the limit
    with pytest.raises(InputError, match="holds 3,600 values"):
        read_image(tmp_path / "c.png")
    io_image.set_max_voxels(4000)
    assert read_image(tmp_path / "c.png")[0].shape == (3, 40, 30)
    with pytest.raises(InputError, match="the voxel limit must be a positive whole number"):
        io_image.set_max_voxels(0)


def test_nonpositive_or_nonfinite_spacing_is_refused(tmp_path):
    import struct

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "a.nii"))
    raw = bytearray((tmp_path / "a.nii").read_bytes())
    struct.pack_into("<4f", raw, 76, 1.0, 1.0, float("nan"), 1.0)  # pixdim[0..3]
    (tmp_path / "nan.nii").write_bytes(raw)
    with pytest.raises(InputError, match=r"nan.nii: voxel spacing \(1.0, nan, 1.0\) is not positive and fin"):
        read_image(tmp_path / "nan.nii")
    (tmp_path / "zero.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementSpacing = 1 0 1\nElementType = MET_UCHAR\n"
        b"ElementDataFile = LOCAL\n" + bytes(8))
    with pytest.raises(InputError, match=r"zero.mha: voxel spacing \(1.0, 0.0, 1.0\)"):
        read_label(tmp_path / "zero.mha")


# --------------------------------------------------------------------------- declared data must be there


def _nifti_header(shape: tuple[int, ...], datatype: int = 2, bitpix: int = 8) -> bytes:
    """A NIfTI-1 header (352 bytes, data offset 352) declaring ``shape``, without voxel data."""
    import struct

    raw = bytearray(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).to_bytes()[:352])
    struct.pack_into("<8h", raw, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    struct.pack_into("<hh", raw, 70, datatype, bitpix)
    return bytes(raw)


def _python_peak(call) -> tuple[BaseException | None, int]:
    """The exception ``call()`` raised (or None) and the peak of Python/numpy allocations meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
        error = None
    except Exception as exc:
        error = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return error, peak


def test_nifti_declaring_more_data_than_it_holds_is_refused_before_allocating(tmp_path: Path) -> None:
    """Issue 17: a 53-byte .nii.gz declaring 600^3 voxels made nibabel fill a 216 MB buffer first."""
    import gzip

    small = tmp_path / "bomb.nii.gz"
    small.write_bytes(gzip.compress(_nifti_header((600, 600, 600))))
    assert len(small.read_bytes()) < 120
    error, peak = _python_peak(lambda: read_image(small))
    assert isinstance(error, InputError) and peak < 8 * 2**20, (error, peak)
    assert re.search(r"bomb.nii.gz: the header declares 216,000,352 bytes of voxel data but the file holds "
                     r"\d+ compressed, at most [\d,]+ when decompressed \(truncated, or a damaged header\) — "
                     r"re-export the image", str(error)), str(error)
    raw = tmp_path / "short.nii"  # uncompressed: 600^3 float32 declared, 4 kB there
    raw.write_bytes(_nifti_header((600, 600, 600), 16, 32) + bytes(4096))
    error, peak = _python_peak(lambda: read_label(raw))
    assert isinstance(error, InputError) and peak < 8 * 2**20, (error, peak)
    assert ("short.nii: the header declares 864,000,000 bytes of voxel data but the file holds 4,096 after "
            "the header") in str(error)
    assert "\n" not in str(error)


def test_large_compressed_nifti_is_counted_before_reading(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Above TRUSTED_BYTES a gzip payload within deflate's ratio is decompressed once, keeping
    nothing, to see that it is all there; complete files (several gzip members too) still read."""
    import gzip

    monkeypatch.setattr(io_image, "TRUSTED_BYTES", 1000)
    noise = RNG.integers(0, 256, 40_000, dtype=np.uint8).tobytes()  # incompressible: within the ratio
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(_nifti_header((64, 64, 64), 16, 32) + noise))
    with pytest.raises(InputError, match=r"short.nii.gz: the header declares 1,048,928 bytes .* holds 40,352 "
                                         r"when decompressed"):
        read_image(tmp_path / "short.nii.gz")
    vol = RNG.normal(size=(20, 30, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "whole.nii"))
    whole = (tmp_path / "whole.nii").read_bytes()
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(whole[:5000]) + gzip.compress(whole[5000:]))
    for name in ("members.nii.gz", "whole.nii"):
        arr, _ = read_image(tmp_path / name)
        np.testing.assert_array_equal(arr[0], vol)


def test_itk_files_declaring_more_data_than_they_hold(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import zlib

    head = "NRRD0004\ntype: float\ndimension: 3\nsizes: 600 600 600\nspacings: 1 1 1\nendian: little\n"
    (tmp_path / "raw.nrrd").write_bytes(f"{head}encoding: raw\n\n".encode() + bytes(1024))
    with pytest.raises(InputError, match=r"raw.nrrd: the header declares 864,000,000 bytes of voxel data but "
                                         r"the file holds 1,024 \(truncated"):
        read_image(tmp_path / "raw.nrrd")
    (tmp_path / "text.nrrd").write_bytes(f"{head}encoding: ascii\n\n1 2 3 4\n".encode())
    with pytest.raises(InputError, match=r"text.nrrd: the header declares 216,000,000 values but the text "
                                         r"data holds at most 5"):
        read_image(tmp_path / "text.nrrd")
    mha = (b"ObjectType = Image\nNDims = 3\nDimSize = 600 600 600\nElementSpacing = 1 1 1\n"
           b"ElementType = MET_FLOAT\nCompressedData = True\nElementDataFile = LOCAL\n")
    (tmp_path / "deflated.mha").write_bytes(mha + zlib.compress(bytes(1 << 20)))
    with pytest.raises(InputError, match=r"deflated.mha: the header declares 864,000,000 bytes .* at most "
                                         r"[\d,]+ when decompressed"):
        read_image(tmp_path / "deflated.mha")
    monkeypatch.setattr(io_image, "TRUSTED_BYTES", 1000)  # within the ratio: counted by decompressing
    small = mha.replace(b"600 600 600", b"64 64 64").replace(b"MET_FLOAT", b"MET_UCHAR")
    noise = RNG.integers(0, 256, 10_000, np.uint8).tobytes()
    (tmp_path / "counted.mha").write_bytes(small + zlib.compress(noise))
    with pytest.raises(InputError, match=r"counted.mha: the header declares 262,144 bytes .* holds 10,000 "
                                         r"when "
                                         r"decompressed"):
        read_image(tmp_path / "counted.mha")
    (tmp_path / "detached.mhd").write_bytes(mha.replace(b"CompressedData = True\n", b"").replace(
        b"LOCAL", b"detached.raw"))
    with pytest.raises(InputError, match=r"detached.mhd: the data file 'detached.raw' named in the header is "
                                         r"missing — keep the data file beside its header"):
        read_image(tmp_path / "detached.mhd")
    for suffix in (".nrrd", ".mha", ".mhd", ".nhdr"):  # complete files, compressed or not, still read
        for compress in (False, True):
            vol = RNG.integers(0, 255, (5, 6, 7)).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / f"ok{suffix}"),
                            useCompression=compress)
            np.testing.assert_array_equal(read_image(tmp_path / f"ok{suffix}")[0][0], vol.transpose(2, 1, 0))


def test_tiff_declaring_more_than_its_strips_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tifffile allocates the whole series before reading a strip: 8x8 pixels whose tags say
    20000x20000 are refused from the strip sizes."""
    import struct

    import tifffile

    tifffile.imwrite(tmp_path / "ok.tif", np.ones((8, 8), np.uint8))
    raw = bytearray((tmp_path / "ok.tif").read_bytes())
    ifd = struct.unpack_from("<I", raw, 4)[0]
    for i in range(struct.unpack_from("<H", raw, ifd)[0]):
        tag, typ = struct.unpack_from("<HH", raw, ifd + 2 + 12 * i)
        if tag in (256, 257, 278):  # ImageWidth, ImageLength, RowsPerStrip
            struct.pack_into("<H" if typ == 3 else "<I", raw, ifd + 10 + 12 * i, 20000)
    (tmp_path / "big.tif").write_bytes(raw)
    error, peak = _python_peak(lambda: read_image(tmp_path / "big.tif"))
    assert isinstance(error, InputError) and peak < 8 * 2**20, (error, peak)
    assert "big.tif: the header declares 400,000,000 bytes of voxel data but the file holds 64 (" in \
        str(error)
    monkeypatch.setattr(io_image, "TRUSTED_BYTES", 1000)  # stacks above it are checked, and pass
    stack = RNG.integers(0, 255, (5, 40, 30), dtype=np.uint8)
    for compression in (None, "zlib"):
        tifffile.imwrite(tmp_path / "stack.tif", stack, compression=compression)
        np.testing.assert_array_equal(read_image(tmp_path / "stack.tif")[0][0], stack)


# --------------------------------------------------------------------------- DICOM series bounds


def test_dicom_series_is_bounded_by_its_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files, voxels (Rows x Columns x frames x files), spacing and each slice's pixel bytes are
    checked from the headers before GDCM reads a pixel."""
    import pydicom

    from conftest import write_dicom_series
    from medunet.io import dicom as io_dicom
    from medunet.io import read_dicom_series

    vol = RNG.integers(0, 1000, (3, 8, 6)).astype(np.int16)
    files = write_dicom_series(tmp_path / "ok", vol)
    arr, geom = read_dicom_series(tmp_path / "ok")
    np.testing.assert_array_equal(arr[0], vol.transpose(2, 1, 0))

    monkeypatch.setattr(io_dicom, "MAX_DICOM_FILES", 2)
    with pytest.raises(InputError, match=r"ok: the DICOM series has 3 files, more than 2 — give the folder "
                                         r"of one"):
        read_dicom_series(tmp_path / "ok")
    monkeypatch.undo()
    monkeypatch.setattr(io_image, "MAX_VOXELS", 143)  # 6 x 8 x 3 = 144 values
    with pytest.raises(InputError, match=r"ok: image of shape \(1, 6, 8, 3\) holds 144 values, more than the "
                                         r"limit of 143"):
        read_dicom_series(tmp_path / "ok")
    monkeypatch.undo()

    def tampered(folder: str, index: int, n: int = 3, **fields) -> Path:
        paths = write_dicom_series(tmp_path / folder, vol[:n])
        ds = pydicom.dcmread(paths[index])
        for key, value in fields.items():
            setattr(ds, key, value)
        ds.save_as(paths[index], enforce_file_format=True)
        return paths[index]

    tampered("big", 0, n=1, Rows=20000, Columns=20000)  # 400 M values (under the limit), 96 bytes there
    error, peak = _python_peak(lambda: read_dicom_series(tmp_path / "big"))
    assert isinstance(error, InputError) and peak < 8 * 2**20, (error, peak)
    assert re.search(r"big/im000.dcm: the slice file holds [\d,]+ bytes but its header declares 800,000,000 "
                     r"bytes of pixel data", str(error)), str(error)
    tampered("huge", 0, Rows=40000, Columns=40000)
    with pytest.raises(InputError, match=r"huge: image of shape \(1, 40000, 40000, 3\) holds 4,800,000,000 "
                                         r"values"):
        read_dicom_series(tmp_path / "huge")
    cut = write_dicom_series(tmp_path / "cut", RNG.integers(0, 1000, (3, 64, 64)).astype(np.int16))[2]
    ds = pydicom.dcmread(cut)
    ds.PixelData = ds.PixelData[:4000]  # GDCM still lists it; the file is shorter than its 8,192 bytes
    ds.save_as(cut, enforce_file_format=True)
    with pytest.raises(InputError, match=r"cut/im002.dcm: the slice file holds [\d,]+ bytes but its header "
                                         r"declares 8,192 bytes of pixel data \(truncated, or a damaged "
                                         r"header\)"):
        read_dicom_series(tmp_path / "cut")
    tampered("flat", 0, PixelSpacing=[-1.0, 0.7])  # (GDCM itself reads 0 and NaN as 1)
    with pytest.raises(InputError, match=r"flat: voxel spacing \(0.7, -1.0\) is not positive and finite "
                                         r"— fix the pixel size in the header \(.*DICOM PixelSpacing\)"):
        read_dicom_series(tmp_path / "flat")
    assert files and geom.extra["n_files"] == 3
