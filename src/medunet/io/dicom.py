"""Read a DICOM series (a folder of slice files) as one volume with its geometry.

SimpleITK/GDCM groups the files by Series Instance UID and sorts the slices by their position
along the slice normal (not by file name or instance number, which exporters get wrong). The
array comes back as ``(C, X, Y, Z)`` like every other ITK-read volume in :mod:`medunet.io`, and
the geometry is ITK's (LPS world), tagged ``fmt="itk"`` so writers convert it to NIfTI's RAS.
The slice files, in volume order, travel in ``geometry.extra["files"]``: a DICOM-SEG written
for a prediction references them frame by frame (:mod:`medunet.io.dicom_seg`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medunet.errors import InputError
from medunet.io.geometry import Geometry


def list_dicom_series(folder: str | Path) -> list[tuple[Path, str]]:
    """``(directory, series UID)`` for every DICOM series in ``folder`` and its subfolders."""
    import SimpleITK as sitk

    folder = Path(folder)
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, _ in os.walk(folder):
        dirnames.sort()
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath) or ():
            found.append((Path(dirpath), str(uid)))
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
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        img = reader.Execute()
    except Exception as exc:  # GDCM's errors name no file the user knows; add the folder
        raise InputError(f"cannot read DICOM series ({type(exc).__name__}: {exc})".replace("\n", " "),
                         folder, "check that every slice file is complete") from exc
    arr = _itk_to_channel_first(img)
    if arr.size == 0:
        raise InputError("DICOM series has no pixels", folder)
    geom = Geometry(spacing=img.GetSpacing(), origin=img.GetOrigin(), direction=img.GetDirection(),
                    fmt="itk", extra={"source": "dicom", "series_uid": uid, "n_files": len(files),
                                      "files": [str(f) for f in files]})
    return arr, geom


def _itk_to_channel_first(img) -> np.ndarray:
    """SimpleITK's ``(z, y, x[, c])`` array as ``(C, x, y, z)``, as ``_read_itk`` returns it."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    nd = img.GetDimension()
    arr = np.moveaxis(arr, -1, 0) if img.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    return np.ascontiguousarray(np.moveaxis(arr, list(range(1, nd + 1)), list(range(nd, 0, -1))))
