"""Hostile inputs (issue 17): what medunet does with each, and the peak memory it takes.

    python bench/hostile_inputs.py [--out result.json] [--only NAME ...]

Every input runs in a fresh child process (peak memory is per process), under an address-space
cap (``--cap-gb``, so that a reader that believes a lying header fails with MemoryError instead
of taking the machine). The child reports the outcome (the array it read, or the exception type
and message), its seconds, and the growth of its peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` once the imports and the model are loaded) and of tracemalloc's peak.

To measure another commit, run this file with that commit's sources first on the path:
``PYTHONPATH=/tmp/wt_old/src python bench/hostile_inputs.py`` (the JSON records which
``medunet`` was imported). Only APIs that exist on both sides of the hardening are used.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- the inputs


def _nifti_header(shape: tuple[int, ...], datatype: int, bitpix: int) -> bytes:
    """A valid NIfTI-1 header (352 bytes) declaring ``shape``, without any voxel data."""
    import nibabel as nib
    import numpy as np

    raw = bytearray(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).to_bytes()[:352])
    struct.pack_into("<8h", raw, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    struct.pack_into("<hh", raw, 70, datatype, bitpix)
    return bytes(raw)


def _dicom_slice(rows: int, cols: int, pixel_bytes: int | None = None, position: float = 0.0,
                 series: str = "1.2.826.0.1.3680043.2.1125.17") -> bytes:
    """One CT slice (explicit VR little endian, int16) whose header says rows x cols."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{series}.{int(position) + 1}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, series + ".0"
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, position]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    n = rows * cols * 2 if pixel_bytes is None else pixel_bytes
    ds.PixelData = np.zeros(n // 2, np.int16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _model(work: Path, spacing: list[float], normalization: str) -> Path:
    """A random 3D U-Net model directory (memory and outcomes do not depend on the weights)."""
    import torch

    from medunet.nets import build_network
    from medunet.planning import Plan

    plan = Plan(dataset_name="hostile", dim=3, in_channels=1, channel_names=["MRI"], label_names=["bg", "fg"],
                label_values=[0, 1], spacing=spacing, median_shape=[16, 16, 16],
                normalization=[{"scheme": normalization}], patch_size=[16, 16, 16], batch_size=1,
                network={"preset": "default", "features": [4, 8], "strides": [[2, 2, 2]]},
                preprocessing={"resample": True, "crop_nonzero": False, "image_order": 3})
    model = work / "model"
    plan.save(model / "plan.json")
    torch.manual_seed(0)
    net = build_network(3, 1, 2, "default", features=[4, 8], strides=[[2, 2, 2]])
    with torch.no_grad():  # the head's bias tilted to foreground: a finite image gets some
        head = [t for k, t in net.state_dict().items() if k.endswith("bias") and t.shape == (2,)][-1]
        head[1] += 1.0
    torch.save({"model": net.state_dict(), "ema_model": None}, model / "checkpoint_last.pt")
    return model


def _read(path: Path) -> Callable[[], str]:
    def run() -> str:
        from medunet.io import read_image

        arr, _ = read_image(path)
        return f"read an array of shape {tuple(arr.shape)}"
    return run


def _series(folder: Path) -> Callable[[], str]:
    def run() -> str:
        from medunet.io import read_dicom_series

        arr, _ = read_dicom_series(folder)
        return f"read an array of shape {tuple(arr.shape)}"
    return run


def _zip(path: Path, out: Path, limit: int) -> Callable[[], str]:
    def run() -> str:
        from medunet.io import read_dicom_series
        from medunet.serve.uploads import extract_dicom_zip

        arr, _ = read_dicom_series(extract_dicom_zip(path, out, limit))
        return f"read an array of shape {tuple(arr.shape)}"
    return run


def _predict(model: Path, image: Path, out: Path) -> Callable[[], str]:
    def run() -> str:
        import numpy as np

        from medunet.inference import Predictor
        from medunet.io import read_image

        Predictor.load(model).predict(image, out, progress=False, tta="none")
        labels, _ = read_image(next(p for p in out.iterdir() if p.name.endswith(".nii.gz")))
        return f"wrote a mask with {int(np.count_nonzero(labels))} foreground voxels of {labels.size}"
    return run


def _prepare(name: str, work: Path) -> tuple[str, Callable[[], str]]:
    """Write input ``name`` into ``work``; returns its description and the call that uses it."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    if name == "nifti_gz_600":
        data = gzip.compress(_nifti_header((600, 600, 600), 2, 8))
        (work / "a.nii.gz").write_bytes(data)
        return (f"{len(data)}-byte .nii.gz whose header declares 600^3 uint8 voxels, no data",
                _read(work / "a.nii.gz"))
    if name == "nifti_gz_1000_float":
        data = gzip.compress(_nifti_header((1000, 1000, 1000), 16, 32))
        (work / "a.nii.gz").write_bytes(data)
        return (f"{len(data)}-byte .nii.gz declaring 1000^3 float32 (4 GB, under the 1024^3 voxel limit)",
                _read(work / "a.nii.gz"))
    if name == "nifti_600_short":
        (work / "a.nii").write_bytes(_nifti_header((600, 600, 600), 16, 32) + bytes(4096))
        return ".nii declaring 600^3 float32 (864 MB) with 4 kB of data", _read(work / "a.nii")
    if name == "nrrd_raw_600":
        (work / "a.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 600 600 600\n"
                                      b"spacings: 1 1 1\nencoding: raw\nendian: little\n\n" + bytes(1024))
        return "raw .nrrd declaring 600^3 float32 with 1 kB of data", _read(work / "a.nrrd")
    if name == "mha_deflate_600":
        (work / "a.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 600 600 600\n"
                                     b"ElementSpacing = 1 1 1\nElementType = MET_FLOAT\n"
                                     b"CompressedData = True\nElementDataFile = LOCAL\n"
                                     + zlib.compress(bytes(1 << 20)))
        return "deflated .mha declaring 600^3 float32, its stream holds 1 MB", _read(work / "a.mha")
    if name == "nrrd_truncated":
        img = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 1000, (64, 64, 64), dtype=np.int16))
        sitk.WriteImage(img, str(work / "full.nrrd"), useCompression=True)
        full = (work / "full.nrrd").read_bytes()
        (work / "a.nrrd").write_bytes(full[: len(full) // 2])
        return "gzip .nrrd of 64^3 int16 cut at half its length", _read(work / "a.nrrd")
    if name == "tiff_20000":
        import tifffile

        tifffile.imwrite(work / "full.tif", np.ones((8, 8), np.uint8))
        raw = bytearray((work / "full.tif").read_bytes())
        ifd = struct.unpack_from("<I", raw, 4)[0]
        for i in range(struct.unpack_from("<H", raw, ifd)[0]):
            tag, typ = struct.unpack_from("<HH", raw, ifd + 2 + 12 * i)
            if tag in (256, 257, 278):  # width, length, rows per strip
                struct.pack_into("<H" if typ == 3 else "<I", raw, ifd + 10 + 12 * i, 20000)
        (work / "a.tif").write_bytes(raw)
        return "8x8 .tif whose tags say 20000x20000 (400 MB) with 64 bytes of data", _read(work / "a.tif")
    if name == "png_9000":
        from PIL import Image

        Image.fromarray(np.ones((8, 8), np.uint8)).save(work / "full.png")
        raw = bytearray((work / "full.png").read_bytes())
        struct.pack_into(">II", raw, 16, 9000, 9000)
        struct.pack_into(">I", raw, 29, zlib.crc32(bytes(raw[12:29])))
        (work / "a.png").write_bytes(raw)
        return "8x8 .png whose IHDR says 9000x9000 (CRC fixed)", _read(work / "a.png")
    if name == "spacing_250":
        img = nib.Nifti1Image(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32),
                              np.diag([250.0, 250.0, 250.0, 1.0]))
        nib.save(img, str(work / "a.nii.gz"))
        return ("8^3 NIfTI at 250 mm, predicted by a 1 mm model (resampling to 2000^3)",
                _predict(_model(work, [1.0, 1.0, 1.0], "zscore"), work / "a.nii.gz", work / "out"))
    if name == "zero_spacing":
        (work / "a.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\n"
                                     b"ElementSpacing = 1 0 1\nElementType = MET_UCHAR\n"
                                     b"ElementDataFile = LOCAL\n" + bytes(512))
        return ".mha with spacing 1 0 1, predicted by a 1 mm model", _predict(
            _model(work, [1.0, 1.0, 1.0], "zscore"), work / "a.mha", work / "out")
    if name in ("nan_voxel", "nan_control"):
        vol = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
        if name == "nan_control":  # the same image without the NaN: what the model makes of it
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(work / "a.nii.gz"))
            return ("the same 16^3 NIfTI without the NaN (control)",
                    _predict(_model(work, [1.0, 1.0, 1.0], "zscore"), work / "a.nii.gz", work / "out"))
        vol[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(work / "a.nii.gz"))
        return ("16^3 NIfTI with one NaN voxel, predicted (z-score)",
                _predict(_model(work, [1.0, 1.0, 1.0], "zscore"), work / "a.nii.gz", work / "out"))
    if name == "dicom_20000":
        (work / "series").mkdir()
        (work / "series" / "a.dcm").write_bytes(_dicom_slice(20000, 20000, pixel_bytes=128))
        return "DICOM slice whose header says 20000x20000 int16 (800 MB), 128 bytes of pixels", _series(
            work / "series")
    if name == "dicom_rows_15000":
        (work / "series").mkdir()
        for k in range(3):
            blob = _dicom_slice(15000, 15000, pixel_bytes=128, position=k)
            (work / "series" / f"{k}.dcm").write_bytes(blob)
        return "3 DICOM slices whose headers say 15000x15000 int16 (3 x 450 MB), 128 bytes each", _series(
            work / "series")
    if name == "dicom_zip_bomb":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("a.dcm", bytes(1 << 30))
        (work / "a.zip").write_bytes(buf.getvalue())
        return (f"{len(buf.getvalue()) // 1024} kB DICOM zip expanding to 1 GB (limit: 4 x a 32 MB upload)",
                _zip(work / "a.zip", work / "out", 4 * 32 * 2**20))
    if name == "dicom_zip_corrupt":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("a.dcm", _dicom_slice(64, 64))
        raw = bytearray(buf.getvalue())
        raw[60:80] = b"\xff" * 20  # inside the deflated data
        (work / "a.zip").write_bytes(raw)
        return "DICOM zip whose deflated data is damaged", _zip(work / "a.zip", work / "out", 4 * 32 * 2**20)
    raise KeyError(name)


CASES = ("nifti_gz_600", "nifti_gz_1000_float", "nifti_600_short", "nrrd_raw_600", "mha_deflate_600",
         "nrrd_truncated", "tiff_20000", "png_9000", "spacing_250", "zero_spacing", "nan_voxel",
         "nan_control", "dicom_20000", "dicom_rows_15000", "dicom_zip_bomb", "dicom_zip_corrupt")


def child(name: str) -> dict:
    """One input in this process: prepare it, then measure the call on it."""
    import medunet

    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    what, run = _prepare(name, work)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    rss = _status_mb("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        outcome = {"result": run()}
    except BaseException as exc:  # the point is to see which exception each input gives
        outcome = {"error": type(exc).__name__, "message": str(exc)[:400]}
    seconds = time.perf_counter() - t0
    python_peak = tracemalloc.get_traced_memory()[1] / 2**20
    return {"input": name, "what": what, **outcome, "seconds": round(seconds, 3),
            "peak_rss_growth_mb": round(_status_mb("VmHWM") - rss, 1),
            "python_peak_mb": round(python_peak, 1), "medunet": str(Path(medunet.__file__).parents[1])}


def _cap(gb: float) -> Callable[[], None]:
    def limit() -> None:
        cap = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return limit


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(CASES), choices=CASES)
    ap.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap of each child")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per input")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return {}
    rows = []
    for name in args.only:
        try:
            res = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                                 timeout=args.timeout, preexec_fn=_cap(args.cap_gb))
        except subprocess.TimeoutExpired:
            rows.append({"input": name, "error": f"no answer within {args.timeout:g} s"})
            continue
        if res.returncode != 0:  # killed, or crashed outside Python
            tail = (res.stderr.strip().splitlines() or [""])[-1]
            rows.append({"input": name, "error": f"exit code {res.returncode}", "message": tail[:400]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    result = {"benchmark": "hostile_inputs", "cap_gb": args.cap_gb, "rows": rows, "machine": machine()}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
