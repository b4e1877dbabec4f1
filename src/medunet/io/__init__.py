"""Read and write images with their geometry.

Arrays are channel-first (``(C, H, W)`` or ``(C, X, Y, Z)``); label maps are written without
the channel axis. The geometry travels beside the array in :class:`Geometry`.
"""

from medunet.io.dicom import dicom_series_files, list_dicom_series, read_dicom_series
from medunet.io.dicom_seg import write_dicom_seg
from medunet.io.geometry import Geometry
from medunet.io.image import (
    IMAGE_SUFFIXES,
    MAX_VOXELS,
    all_finite,
    read_image,
    read_label,
    split_suffix,
    write_image,
)

__all__ = ["IMAGE_SUFFIXES", "MAX_VOXELS", "Geometry", "all_finite", "dicom_series_files",
           "list_dicom_series", "read_dicom_series", "read_image", "read_label", "split_suffix",
           "write_dicom_seg", "write_image"]
