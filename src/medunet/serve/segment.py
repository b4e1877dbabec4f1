"""One segmentation job, independent of HTTP: read the stored upload, predict, measure, encode.

Kept apart from the web app so it can be tested and reused (e.g. by a batch worker) without a
server, and so everything heavy runs in one function on a worker thread.
"""

from __future__ import annotations

import base64
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunet.errors import InputError
from medunet.io import Geometry, read_dicom_series, read_image, write_image
from medunet.serve.deadline import check_deadline
from medunet.serve.uploads import ZIP_EXPANSION, Upload, extract_dicom_zip

OUTPUT_FORMATS = ("json", "png", "nifti")
MEDIA_TYPES = {"png": "image/png", "nifti": "application/gzip"}
# one colour per foreground class (index 1, 2, ...); background is drawn transparent
PALETTE = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55",
           "#a2845e", "#30d158")


def class_colour(index: int) -> str | None:
    """The page's colour of a class index (None for the background, index 0)."""
    return None if index == 0 else PALETTE[(index - 1) % len(PALETTE)]


@dataclass
class SegmentResult:
    """What the app sends back: the mask file's bytes, the statistics and, for the page, a view."""

    stats: dict
    mask: bytes
    mask_filename: str
    mask_format: str
    view: dict | None = None

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.mask_format]


def load_upload(upload: Upload, work_dir: Path, max_bytes: int) -> tuple[np.ndarray, Geometry]:
    """Read the stored upload (a .zip is one DICOM series) as a channel-first array and geometry."""
    if upload.suffix == ".zip":
        folder = extract_dicom_zip(upload.path, work_dir / "dicom", max_bytes * ZIP_EXPANSION)
        upload.path.unlink()  # the zip is no longer needed: halve the disk held by this request
        return read_dicom_series(folder)
    return read_image(upload.path)


def fit_to_model(image: np.ndarray, plan) -> tuple[np.ndarray, bool]:
    """Forgive two harmless mismatches before the Predictor's own checks.

    A grey model given an RGB file whose channels are identical (a grey image saved as RGB)
    gets one channel; a 2D model given a volume of one slice (``(C, X, Y, 1)``, e.g. a 2D
    NIfTI or a one-file DICOM series) gets that slice. Returns the image and whether a
    trailing slice axis was dropped (to put it back on the mask).
    """
    if plan.in_channels == 1 and image.shape[0] in (3, 4) and all(
            np.array_equal(image[0], image[c]) for c in range(1, 3)):
        image = image[:1]
    squeezed = plan.dim == 2 and image.ndim == 4 and image.shape[-1] == 1
    if squeezed:
        image = image[..., 0]
    return image, squeezed


def run_segmentation(predictor, upload: Upload, work_dir: Path, *, tta: str = "none",
                     out_format: str = "json", view: bool = False,
                     max_bytes: int = 512 * 2**20) -> SegmentResult:
    """Read, check, predict, measure and encode one uploaded image.

    Raises :class:`InputError` for anything wrong with the image (the app answers 422); the
    messages name the client's file, never the server's temporary path. Between its phases (and,
    through the app's Predictor, before every window batch) it checks the job's deadline and
    raises :class:`~medunet.serve.deadline.JobCancelled` once it has passed.
    """
    plan = predictor.plan
    t_start = time.perf_counter()
    try:
        image, geom = load_upload(upload, work_dir, max_bytes)
        check_deadline()
        kind = mask_kind(out_format, plan.dim, geom)  # refuse a bad format before the work
        image, squeezed = fit_to_model(image, plan)
        t0 = time.perf_counter()
        spacing = geom.spacing if geom is not None and len(geom.spacing) == image.ndim - 1 else None
        labels, _ = predictor.predict_array(image, tta=tta, probabilities=False,  # labels only: less memory
                                            spacing=spacing)
        seconds = time.perf_counter() - t0
    except InputError as exc:
        raise InputError(_client_message(exc, upload, work_dir)) from exc
    check_deadline()
    name = f"{upload.stem}_mask{'.png' if kind == 'png' else '.nii.gz'}"
    stored = labels[..., None] if squeezed else labels  # the input's own shape, for the file
    path = write_image(work_dir / ("mask.png" if kind == "png" else "mask.nii.gz"), stored,
                       None if kind == "png" else geom)
    mask = path.read_bytes()
    stats = segmentation_stats(labels, geom, plan, upload.stem, tta=tta)
    stats["inference_seconds"] = round(seconds, 4)
    result = SegmentResult(stats, mask, name, kind)
    if view:
        check_deadline()
        result.view = make_view(image, labels, plan)
    stats["total_seconds"] = round(time.perf_counter() - t_start, 4)
    return result


def mask_kind(out_format: str, dim: int, geom: Geometry) -> str:
    """``png`` or ``nifti``: asked for, or by default PNG for 2D pictures, NIfTI for the rest.

    A 2D image read from NIfTI/NRRD/DICOM gets a NIfTI mask too, so its placement is kept.
    """
    if out_format == "png":
        if dim != 2:
            raise InputError("format 'png' holds 2D masks only; this model is 3D",
                             fix="ask for nifti or json")
        return "png"
    if out_format == "nifti":
        return "nifti"
    return "png" if dim == 2 and geom.fmt in ("natural", "tiff", "") else "nifti"


def physical_unit(geom: Geometry) -> str:
    """Millimetres for medical formats (their spacing is in mm), pixels for pictures."""
    return "px" if geom.fmt in ("natural", "tiff", "") else "mm"


def segmentation_stats(labels: np.ndarray, geom: Geometry, plan, case: str, tta: str = "none") -> dict:
    """Per-class voxel counts, fractions and areas/volumes (count x the product of the spacing)."""
    dim = labels.ndim
    spacing = [float(s) for s in (list(geom.spacing) + [1.0] * dim)[:dim]]
    voxel = math.prod(spacing)
    measure = "area" if dim == 2 else "volume"
    unit = f"{physical_unit(geom)}^{dim}"
    values = np.asarray(plan.label_values)
    counts = np.bincount(class_index(labels, values).ravel(), minlength=len(values))
    total = max(1, labels.size)
    classes = [{"index": i, "value": int(v), "name": str(n), "color": class_colour(i),
                "voxels": int(c), "fraction": round(int(c) / total, 6), measure: float(c) * voxel}
               for i, (v, n, c) in enumerate(zip(values, plan.label_names, counts, strict=False))]
    return {"case": case, "dimension": dim, "shape": list(labels.shape), "spacing": spacing,
            "measure": measure, "unit": unit, "voxel_size": voxel, "tta": tta, "classes": classes}


def class_index(labels: np.ndarray, label_values) -> np.ndarray:
    """Raw label values -> class indices (positions in the plan's ``label_values``, any order)."""
    values = np.asarray(label_values)
    order = np.argsort(values, kind="stable")
    pos = np.clip(np.searchsorted(values[order], labels), 0, len(values) - 1)
    return order[pos]


def display_uint8(image: np.ndarray) -> np.ndarray:
    """Image channels for the screen: RGB or the first channel, scaled to 0..255 (0.5-99.5th pct)."""
    img = image[:3] if image.shape[0] == 3 else image[:1]
    if img.dtype == np.uint8:
        return img
    out = np.empty(img.shape, np.uint8)
    for c in range(img.shape[0]):
        x = img[c].astype(np.float32)
        finite = x[np.isfinite(x)]
        lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out[c] = np.clip((np.nan_to_num(x, nan=lo) - lo) * scale, 0, 255).astype(np.uint8)
    return out


def make_view(image: np.ndarray, labels: np.ndarray, plan) -> dict:
    """Slices for the page: the image as grey/RGB PNGs and the mask as coloured RGBA PNGs.

    2D images keep their rows and columns. Volumes ``(X, Y, Z)`` are cut along Z and each
    slice is shown with Y upwards (rows = Y reversed, columns = X), as viewers show axial
    slices. PNGs (data URLs) let the browser decode them natively; the mask PNG is transparent
    on the background, so the page only has to stack it on the image.
    """
    disp = display_uint8(image)
    index = class_index(labels, plan.label_values).astype(np.uint8)
    if labels.ndim == 2:
        img_slices, mask_slices = disp[None], index[None]
    else:  # (C, X, Y, Z) -> (Z, C, Y, X), Y flipped
        img_slices = np.transpose(disp, (3, 0, 2, 1))[:, :, ::-1, :]
        mask_slices = np.transpose(index, (2, 1, 0))[:, ::-1, :]
    lut = np.zeros((256, 4), np.uint8)
    for i in range(1, len(plan.label_values)):
        colour = class_colour(i) or "#000000"
        lut[i] = [int(colour[k:k + 2], 16) for k in (1, 3, 5)] + [255]
    fg = (mask_slices > 0).reshape(len(mask_slices), -1).sum(1)
    return {
        "slices": int(len(mask_slices)),
        "height": int(mask_slices.shape[1]),
        "width": int(mask_slices.shape[2]),
        "best_slice": int(np.argmax(fg)) if fg.any() else len(mask_slices) // 2,
        "orientation": ("rows, columns" if labels.ndim == 2
                        else "slices along axis 3; rows = axis 2 (reversed), columns = axis 1"),
        "images": [_png_data_url(np.moveaxis(s, 0, -1) if s.shape[0] == 3 else s[0]) for s in img_slices],
        "masks": [_png_data_url(lut[m]) for m in mask_slices],
    }


def _png_data_url(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _client_message(exc: InputError, upload: Upload, work_dir: Path) -> str:
    """The error text with the server's temporary paths replaced by the client's file name."""
    text = str(exc)
    shown = Path(upload.filename.replace("\\", "/")).name[-80:] or "upload"
    for p in sorted({str(upload.path), str(work_dir / "dicom"), str(work_dir)}, key=len, reverse=True):
        text = text.replace(p, shown)
    return text
