"""Shared fixtures: tiny generated datasets and the path to the real shared data.

Tests that need ``../shared/data`` (next to the repo root) are marked
``@pytest.mark.shared_data`` and are skipped when it is absent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """A ``bench/`` script as a module (its folder on the path while it imports ``_common``)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"shared data not found at {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``): one
    intra-op thread is faster than several, which spin-wait on a busy 2-core machine (3-10x)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill_in_epoch_two(code: str, run_dir: Path, timeout: float = 120.0) -> None:
    """Run ``python -c code`` (a training run into ``run_dir``) and SIGKILL it once epoch 1's
    checkpoint is written, i.e. during epoch 2; asserts the kill landed there."""
    import signal
    import subprocess
    import sys
    import time

    import torch

    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + timeout
    last = run_dir / "checkpoint_last.pt"
    while not last.exists() or torch.load(last, weights_only=True)["state"]["epoch"] < 1:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(last, weights_only=True)["state"]["epoch"] == 1, "killed too late: epoch 2 had finished"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write ``(H, W)`` or ``(H, W, 3)`` uint8/uint16 with Pillow (independent of medunet.io)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write an array in NIfTI axis order with nibabel (independent of medunet.io)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), np.eye(4) if affine is None else affine),
             str(path))
    return path


def write_any(path: Path, array: np.ndarray, spacing: Sequence[float] | None = None) -> Path:
    """Write a spatial (or ``(H, W, 3)`` RGB) array as PNG or NIfTI by the path's suffix."""
    if path.name.endswith((".nii.gz", ".nii")):
        affine = np.diag([*(spacing or (1.0,) * 3), 1.0])
        return write_nifti(path, array, affine)
    return write_png(path, array)


def _label_map(rng: np.random.Generator, shape: tuple[int, ...],
               values: Sequence[int]) -> np.ndarray:
    """Background with one box per foreground value, so every value is present."""
    lab = np.zeros(shape, np.uint8 if max(values) <= 255 else np.int32)
    for i, v in enumerate(values[1:]):
        lo = [int(rng.integers(0, max(1, n // 2))) for n in shape]
        box = tuple(slice(a, a + max(2, n // (3 + i))) for a, n in zip(lo, shape, strict=True))
        lab[box] = v
    return lab


@pytest.fixture
def tmp_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a tiny dataset under ``tmp_path``; returns its root.

    Args (all keywords):
        layout: ``"nnunet"`` (dataset.json, imagesTr/CASE_0000.ext, labelsTr/CASE.ext) or
            ``"folders"`` (images/CASE.ext, masks/CASE<mask_suffix>.ext, no dataset.json).
        n_train / n_test: case counts (test cases go to imagesTs/labelsTs).
        shape: spatial shape; 3 axes means NIfTI volumes unless ``suffix`` says otherwise.
        channel_files: single-channel files per case (``_0000``, ``_0001``, ...).
        rgb: one RGB PNG per case instead (channel names R, G, B).
        labels: ``{name: value}`` for dataset.json; files hold these raw values.
        mask_scale: multiply label values in the files (255 gives 0/255 masks).
        mask_suffix: appended to the case id in the mask name (``"_mask"``).
        suffix: file ending; default ``.png`` for 2D, ``.nii.gz`` for 3D.
        spacing: voxel size for NIfTI files.
    """
    counter = iter(range(1000))

    def make(*, layout: str = "nnunet", n_train: int = 3, n_test: int = 0,
             shape: tuple[int, ...] = (24, 20), channel_files: int = 1, rgb: bool = False,
             labels: dict[str, int] | None = None, mask_scale: int = 1, mask_suffix: str = "",
             suffix: str | None = None, spacing: Sequence[float] | None = None,
             seed: int = 0) -> Path:
        labels = labels or {"background": 0, "foreground": 1}
        values = sorted(labels.values())
        suffix = suffix or (".nii.gz" if len(shape) == 3 else ".png")
        rng = np.random.default_rng(seed)
        root = tmp_path / f"Dataset{900 + next(counter)}_Tiny"
        if layout == "nnunet":
            channel_names = (
                {"0": "R", "1": "G", "2": "B"} if rgb
                else {str(i): f"mod{i}" for i in range(channel_files)}
            )
            meta = {"name": root.name, "channel_names": channel_names, "labels": labels,
                    "numTraining": n_train, "file_ending": suffix}
            (root / "imagesTr").mkdir(parents=True)
            (root / "dataset.json").write_text(json.dumps(meta, indent=2))
            splits = [("imagesTr", "labelsTr", n_train), ("imagesTs", "labelsTs", n_test)]
        else:
            splits = [("images", "masks", n_train)]
        for img_dir, lab_dir, n in splits:
            for i in range(n):
                case = f"case{i:03d}" if img_dir != "imagesTs" else f"test{i:03d}"
                if rgb:
                    files = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8)]
                else:
                    files = [rng.integers(0, 256, shape, dtype=np.uint8)
                             for _ in range(channel_files if layout == "nnunet" else 1)]
                for ch, arr in enumerate(files):
                    name = f"{case}_{ch:04d}{suffix}" if layout == "nnunet" else f"{case}{suffix}"
                    write_any(root / img_dir / name, arr, spacing)
                lab = _label_map(rng, shape, values) * mask_scale
                write_any(root / lab_dir / f"{case}{mask_suffix}{suffix}",
                          lab.astype(np.uint8) if lab.max() <= 255 else lab, spacing)
        return root

    return make


def sized_dataset(root: Path, relative: bool, seed: int = 0) -> Path:
    """Square PNGs of 160-480 px with a disc whose radius follows the image (or not)."""
    rng = np.random.default_rng(seed)
    for i, n in enumerate(np.linspace(160, 480, 10).astype(int)):
        r = 0.3 * n * rng.uniform(0.9, 1.1) if relative else 40 * rng.uniform(0.9, 1.1)
        yy, xx = np.mgrid[:n, :n]
        label = ((yy - n / 2) ** 2 + (xx - n / 2) ** 2 <= r * r).astype(np.uint8)
        image = rng.integers(30, 90, (n, n)).astype(np.uint8)
        image[label > 0] += 100
        write_png(root / "imagesTr" / f"c{i:02d}_0000.png", image)
        write_png(root / "labelsTr" / f"c{i:02d}.png", label)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "grey"}, "labels": {"background": 0, "object": 1},
        "numTraining": 10, "file_ending": ".png"}))
    return root


def write_dicom_series(folder: Path, vol_zyx: np.ndarray, spacing: Sequence[float] = (0.8, 0.7, 2.5),
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.77") -> list[Path]:
    """Single-frame CT slices (explicit VR little endian, int16) written with pydicom, one file per
    slice, named in slice order; independent of medunet.io. Returns the files."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = vol_zyx.shape
    files = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "P001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = series_uid + ".0", series_uid
        ds.FrameOfReferenceUID = series_uid + ".9"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * float(spacing[2])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(vol_zyx[k], dtype=np.int16).tobytes()
        path = folder / f"im{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
