"""DICOM-SEG output (highdicom) for predictions made on a DICOM series.

A Segmentation object is what PACS viewers and research platforms (OHIF, 3D Slicer, XNAT)
accept as a mask of a DICOM study: it references the source series and each source slice,
so it opens on top of the images without any geometry of its own to get wrong.

Conventions: BINARY segmentation, one segment per foreground class (segment ``i`` is the
``i``-th non-background entry of ``label_values``, labelled with its name); slice ``k`` of
the label volume belongs to source file ``k`` (the volume order that
:func:`medunet.io.dicom.read_dicom_series` reads) and its frames reference that file's SOP
instance. highdicom stores the frames segment by segment, ordered along the slice normal (a
right-handed row/column/frame system), which for a position-sorted series is the source order
or its reverse; readers place frames by their references and positions, not by frame number.
Empty frames are omitted (highdicom's default): ``NumberOfFrames`` is the number of
(slice, segment) pairs holding foreground; a prediction without any foreground keeps every
(slice, segment) frame, empty (a SEG object must hold frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medunet.errors import InputError
from medunet.files import atomic_file

__all__ = ["write_dicom_seg"]


def _frames(labels: np.ndarray, layout: str) -> np.ndarray:
    """The label volume as ``(frames, rows, columns)``."""
    if layout == "xyz":  # medunet.io's (X, Y, Z): columns, rows, slices
        return np.transpose(labels, (2, 1, 0))
    if layout == "zyx":
        return labels
    raise ValueError(f"unknown layout '{layout}' (use xyz or zyx)")


def write_dicom_seg(labels: np.ndarray, source_files: Sequence[str | Path], out_path: str | Path,
                    label_values: Sequence[int], label_names: Sequence[str], *, layout: str = "xyz",
                    algorithm_name: str = "medunet", algorithm_version: str | None = None,
                    series_description: str = "medunet segmentation", series_number: int = 300,
                    ) -> Path:
    """Write ``labels`` (raw label values) as a DICOM-SEG that references ``source_files``.

    Args:
        labels: the label map, ``(X, Y, Z)`` as :mod:`medunet.io` reads a series
            (``layout="xyz"``) or ``(Z, rows, columns)`` (``layout="zyx"``); slice ``k``
            lies on ``source_files[k]``.
        source_files: the series' single-frame files in volume order.
        label_values: raw value of each class; the first is the background (no segment).
        label_names: a name per class (segment labels).

    The file appears under ``out_path`` only once complete. Raises :class:`InputError`
    when the label map does not fit the series or the series cannot carry a SEG.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    import medunet

    out_path = Path(out_path)
    files = [Path(f) for f in source_files]
    if not files:
        raise InputError("no source DICOM files to reference", out_path)
    frames = _frames(np.asarray(labels), layout)
    try:
        sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    except Exception as exc:  # pydicom raises several types; the user needs the file name
        raise InputError(f"cannot read DICOM header ({type(exc).__name__}: {exc})", files[0]) from exc
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if frames.shape != (len(files), rows, cols):
        raise InputError(f"label map of {frames.shape[0]} x {frames.shape[1]} x {frames.shape[2]} (slices x "
                         f"rows x columns) does not fit the series ({len(files)} x {rows} x {cols})",
                         files[0].parent, "predict the series itself, without resizing")
    if len(label_values) != len(label_names):
        raise ValueError("label_values and label_names differ in length")
    version = algorithm_version or medunet.__version__
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i, segment_label=str(name)[:64],
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.cid7166.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for i, name in enumerate(label_names[1:], start=1)
    ]
    if not descriptions:
        raise InputError("the model has no foreground class to store as a segment", out_path)
    # raw label values -> segment numbers (0 = background, and any value the model does not know)
    seg_numbers = np.zeros(frames.shape, dtype=np.uint8 if len(descriptions) < 256 else np.uint16)
    for i, value in enumerate(label_values[1:], start=1):
        seg_numbers[frames == value] = i
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=seg_numbers,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="medunet", manufacturer_model_name=algorithm_name,
            software_versions=version, device_serial_number="0",
            series_description=series_description,
            omit_empty_frames=bool(seg_numbers.any()),  # highdicom keeps all frames of an empty mask
            content_label="MEDUNET")
    except Exception as exc:  # highdicom validates the sources; say which series is unfit
        raise InputError(f"cannot build a DICOM-SEG ({type(exc).__name__}: {exc})".replace("\n", " "),
                         files[0].parent, "write the NIfTI output only (--no-dicom-seg)") from exc
    try:
        with atomic_file(out_path) as tmp:
            seg.save_as(tmp)
    except OSError as exc:
        raise InputError(f"cannot write DICOM-SEG ({exc.strerror or exc})", out_path) from exc
    return out_path

