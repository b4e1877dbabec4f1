"""Read a DICOM series (a folder of slice files) as one volume with its geometry.

SimpleITK/GDCM groups the files by Series Instance UID and sorts the slices by their position
along the slice normal (not by file name or instance number, which exporters get wrong). The
array comes back as ``(C, X, Y, Z)`` like every other ITK-read volume in :mod:`medunet.io`, and
the geometry is ITK's (LPS world), tagged ``fmt="itk"`` so writers convert it to NIfTI's RAS.
The slice files, in volume order, travel in ``geometry.extra["files"]``: a DICOM-SEG written
for a prediction references them frame by frame (:mod:`medunet.io.dicom_seg`).

Size: before any pixel is read, the series is bounded from its headers alone, like every other
reader: at most :data:`MAX_DICOM_FILES` files, Rows x Columns x frames x samples x files values
within the voxel limit (:func:`medunet.io.image.max_voxels`), a positive finite spacing, and for
uncompressed transfer syntaxes every file at least as long as the pixel data it declares (a
truncated or tampered slice would otherwise make GDCM allocate the declared size first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medunet.errors import InputError
from medunet.io.geometry import Geometry
from medunet.io.image import _check_header

# The most slice files one series may have: a whole-body CT at 0.5 mm is ~4,000; far more files
# is a wrong folder (or a hostile upload), and GDCM would parse every header before failing.
MAX_DICOM_FILES = 20_000

# Transfer syntaxes whose pixel data is stored as is (implicit VR LE, explicit VR LE/BE): a file
# holds Rows x Columns x frames x samples x BitsAllocated / 8 bytes of it, so its size says
# whether the data is there.
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def list_dicom_series(folder: str | Path) -> list[tuple[Path, str]]:
    """``(directory, series UID)`` for every DICOM series in ``folder`` and its subfolders."""
    import SimpleITK as sitk

    folder = Path(folder)
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, _ in os.walk(folder):
        dirnames.sort()
        try:
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath) or ()
        except Exception as exc:  # GDCM gives up on the whole folder for one damaged header
            raise InputError(f"cannot scan the folder for DICOM series ({type(exc).__name__}: "
                             f"{str(exc)[-160:]})".replace("\n", " "), dirpath,
                             "a file there has a damaged DICOM header: remove it, or re-export the "
                             "series") from exc
        found.extend((Path(dirpath), str(uid)) for uid in uids)
    return found


def dicom_series_files(folder: str | Path, series_uid: str) -> list[Path]:
    """The files of one series in volume order (sorted along the slice normal by GDCM): slice
    ``k`` of the array :func:`read_dicom_series` returns comes from file ``k``."""
    import SimpleITK as sitk

    return [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)]


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read the one DICOM series in ``folder`` (or the one named by ``series_uid``).

    Returns a channel-first ``(C, X, Y, Z)`` array (C is 3 for colour DICOM) and its
    :class:`Geometry`. Raises :class:`InputError` when the folder holds no series, several
    series and none was chosen, or slices that cannot be read together.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("DICOM folder not found", folder)
    series = list_dicom_series(folder)
    if series_uid is not None:
        series = [s for s in series if s[1] == series_uid]
    if not series:
        what = f"no DICOM series with UID {series_uid}" if series_uid else "no DICOM series found"
        raise InputError(what, folder, "give a folder holding the .dcm slice files of one series")
    if len(series) > 1:
        uids = ", ".join(uid for _, uid in series[:5]) + (" ..." if len(series) > 5 else "")
        raise InputError(f"{len(series)} DICOM series found ({uids})", folder,
                         "give a folder with one series, or choose one by its series UID")
    directory, uid = series[0]
    try:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid)
        _check_series_size(folder, files)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        img = reader.Execute()
    except InputError:
        raise
    except Exception as exc:  # GDCM's errors name no file the user knows; add the folder
        raise InputError(f"cannot read DICOM series ({type(exc).__name__}: {exc})".replace("\n", " "),
                         folder, "check that every slice file is complete") from exc
    _check_header(folder, (), img.GetSpacing())  # the slice spacing comes from the positions
    arr = _itk_to_channel_first(img)
    if arr.size == 0:
        raise InputError("DICOM series has no pixels", folder)
    geom = Geometry(spacing=img.GetSpacing(), origin=img.GetOrigin(), direction=img.GetDirection(),
                    fmt="itk", extra={"source": "dicom", "series_uid": uid, "n_files": len(files),
                                      "files": [str(f) for f in files]})
    return arr, geom


def _check_series_size(folder: Path, files: Sequence[str]) -> None:
    """Bound a series from its headers before GDCM reads a pixel: the number of files, the
    voxels (the first file's Rows x Columns x frames x samples times the number of files, the
    size ITK allocates; it refuses later files of another size), the spacing, and for native
    (uncompressed) pixel data each file's length against the bytes its header declares."""
    import SimpleITK as sitk

    if len(files) > MAX_DICOM_FILES:
        raise InputError(f"the DICOM series has {len(files):,} files, more than {MAX_DICOM_FILES:,}", folder,
                         "give the folder of one series (or split it)")
    if not files:
        return
    info = sitk.ImageFileReader()
    info.SetImageIO("GDCMImageIO")
    info.SetFileName(str(files[0]))
    info.ReadImageInformation()
    size = [int(n) for n in info.GetSize()] + [1]  # columns, rows, frames (1 when single-frame)
    channels = int(info.GetNumberOfComponents())
    per_file = channels * size[0] * size[1] * size[2]
    _check_header(folder, (channels, size[0], size[1], size[2] * len(files)), info.GetSpacing()[:2])

    bits = info.GetMetaData("0028|0100").strip(" \0") if info.HasMetaDataKey("0028|0100") else ""
    if not bits.isdigit():
        return
    need = per_file * max(1, int(bits)) // 8
    for f in files:
        held = os.path.getsize(f)
        if held < need and _transfer_syntax(f) in _NATIVE_SYNTAXES:  # compressed: the voxel limit bounds it
            raise InputError(f"the slice file holds {held:,} bytes but its header declares {need:,} bytes of "
                             "pixel data (truncated, or a damaged header)", f,
                             "re-export the series; remove the damaged file")


def _transfer_syntax(path: str | Path) -> str:
    """The file's transfer syntax UID from its meta header (GDCM's dictionary leaves it out);
    a file without one is implicit VR little endian, as GDCM reads it."""
    from pydicom.filereader import read_file_meta_info

    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", _NATIVE_SYNTAXES[0]))
    except Exception:  # an unreadable meta header: GDCM reads such a file as native, if at all
        return _NATIVE_SYNTAXES[0]


def _itk_to_channel_first(img) -> np.ndarray:
    """SimpleITK's ``(z, y, x[, c])`` array as ``(C, x, y, z)``, as ``_read_itk`` returns it."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    nd = img.GetDimension()
    arr = np.moveaxis(arr, -1, 0) if img.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    return np.ascontiguousarray(np.moveaxis(arr, list(range(1, nd + 1)), list(range(nd, 0, -1))))
