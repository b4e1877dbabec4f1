"""Format readers and writers.

2D natural formats (PNG, JPG, BMP, TIFF) go through Pillow/tifffile; NIfTI through nibabel,
which keeps the header affine exactly; NRRD/MHA/MHD through SimpleITK. Arrays keep the file's
own axis order for NIfTI (x, y, z), so spacing, affine and shape line up without transposes;
SimpleITK's (z, y, x) arrays are transposed to (x, y, z) for the same reason.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from medunet.errors import InputError
from medunet.io.geometry import Geometry

NATURAL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + NATURAL_SUFFIXES + TIFF_SUFFIXES + ITK_SUFFIXES

# The most values (voxels x channels) a file may hold. Readers check the header's size against it
# before reading the data, so a damaged header or a decompression bomb fails with a message
# instead of an out-of-memory kill. 1024**3 (4 GiB as float32) is well above clinical volumes
# (a whole-body CT of 512 x 512 x 2000 is 0.5 G). Raise it with set_max_voxels (the command
# line: medunet --max-voxels N COMMAND); no environment variable changes it (DESIGN.md).
MAX_VOXELS = 1024**3

# Deflate (gzip, zlib: compressed NIfTI, NRRD, MHA, PNG) cannot expand data more than ~1032:1 (a
# 258-byte match per 2 bits), so a header declaring more than that many times the bytes on disk
# lies; the check costs one stat() and catches a 53-byte .nii.gz that declares 600**3 voxels.
DEFLATE_RATIO = 1032
# Readers allocate the declared size before they find out that the data is short (nibabel fills a
# zeroed buffer of that size). A declared payload above this many bytes is first verified to be
# there: raw data by the file's size, compressed data by a streaming pass that keeps nothing. Below
# it, a lying header costs at most this much memory before the library's own error.
TRUSTED_BYTES = 64 * 2**20


def split_suffix(path: str | Path) -> tuple[str, str]:
    """Split a file name into stem and (possibly double) suffix.

    ``a.nii.gz`` -> ``("a", ".nii.gz")``; names without a known image suffix split at the
    last dot.
    """
    name = Path(path).name
    low = name.lower()
    for suf in IMAGE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)], name[-len(suf) :]
    return Path(name).stem, Path(name).suffix


def _fmt_of(path: Path) -> str:
    suffix = split_suffix(path)[1].lower()
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in NATURAL_SUFFIXES:
        return "natural"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in ITK_SUFFIXES:
        return "itk"
    raise InputError(
        f"unsupported file type '{suffix}'",
        path,
        f"use one of {', '.join(IMAGE_SUFFIXES)}",
    )


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read an image as a channel-first array and its geometry.

    Returns ``(C, H, W)`` for 2D files and ``(C, X, Y, Z)`` for volumes. Raises
    :class:`InputError` naming the file when it is missing, empty or unreadable.
    """
    return _read(Path(path), label=False)


def _read(path: Path, label: bool) -> tuple[np.ndarray, Geometry]:
    if not path.exists():
        raise InputError("file not found", path)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError("file is empty (0 bytes)", path, "re-export or remove it")
    fmt = _fmt_of(path)
    try:
        if fmt == "nifti":
            arr, geom = _read_nifti(path)
        elif fmt == "natural":
            arr, geom = _read_natural(path, label)
        elif fmt == "tiff":
            arr, geom = _read_tiff(path)
        else:
            arr, geom = _read_itk(path)
    except InputError:
        raise
    except Exception as exc:  # every library raises its own types; the user needs the file name
        raise InputError(
            f"cannot read image ({type(exc).__name__}: {exc})".replace("\n", " "),
            path,
            "check that the file is complete and in the format its name says",
        ) from exc
    if arr.size == 0 or 0 in arr.shape:
        raise InputError(f"image has no pixels (shape {arr.shape})", path)
    return _plain_values(arr, path), geom


def _plain_values(arr: np.ndarray, path: Path) -> np.ndarray:
    """Real numbers only: packed colour voxels (NIfTI RGB24/RGBA32) become channels, long
    doubles float64; complex or other record types are refused here, not deep in a later step."""
    if arr.dtype.names:  # (C, *S) of records: one channel per field, e.g. R, G, B
        if arr.shape[0] != 1 or not all(arr.dtype[n].kind in "iuf" for n in arr.dtype.names):
            raise InputError(f"voxels of type {arr.dtype} are not supported", path,
                             "save the image with one number per voxel and channel")
        return np.ascontiguousarray(np.stack([arr[0][n] for n in arr.dtype.names]))
    if arr.dtype.kind not in "biuf":
        raise InputError(f"voxels of type {arr.dtype} are not supported", path,
                         "save the image with real (integer or floating-point) values")
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
        return arr.astype(np.float64)
    return arr


def all_finite(image: np.ndarray) -> bool:
    """No NaN or inf (integer arrays trivially): min and max propagate both, so checking a large
    image costs two passes and allocates nothing image-sized."""
    if not np.issubdtype(image.dtype, np.inexact) or image.size == 0:
        return True
    return bool(np.isfinite(image.min()) and np.isfinite(image.max()))


def max_voxels() -> int:
    """The voxel limit in force (:data:`MAX_VOXELS`, or what :func:`set_max_voxels` set)."""
    return int(MAX_VOXELS)


def set_max_voxels(limit: int) -> None:
    """Set :data:`MAX_VOXELS` for this process (``medunet serve --max-voxels``): one option at
    start-up, not a value every call site has to pass."""
    global MAX_VOXELS
    if isinstance(limit, bool) or int(limit) != limit or limit <= 0:
        raise InputError(f"the voxel limit must be a positive whole number, not {limit!r}",
                         fix="e.g. --max-voxels 500000000")
    MAX_VOXELS = int(limit)


def _check_header(path: Path, shape: tuple[int, ...], spacing: tuple[float, ...] = ()) -> None:
    """Refuse, from the header alone, a file too large to read (see :data:`MAX_VOXELS`) and a
    voxel spacing that is zero, negative or not a number (it would poison resampling)."""
    n = int(np.prod([int(d) for d in shape], dtype=np.float64))
    limit = max_voxels()
    if n > limit:
        raise InputError(f"image of shape {tuple(int(d) for d in shape)} holds {n:,} values, more than the "
                         f"limit of {limit:,}", path,
                         "crop or downsample it, or raise the limit (medunet --max-voxels N) on a machine "
                         "with the memory")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.size and not (np.isfinite(sp).all() and (sp > 0).all()):
        raise InputError(f"voxel spacing {tuple(sp.tolist())} is not positive and finite", path,
                         "fix the pixel size in the header (NIfTI pixdim, NRRD/MHA spacing, DICOM "
                         "PixelSpacing)")


def _short_data(path: Path, declared: int, held: str) -> InputError:
    return InputError(f"the header declares {declared:,} bytes of voxel data but the file holds {held} "
                      "(truncated, or a damaged header)", path,
                      "re-export the image; if it opens elsewhere, check the header's size and data type")


def _inflated_size(path: Path, offset: int, limit: int) -> int:
    """How many bytes the deflate stream (gzip members or zlib) at ``offset`` of ``path``
    expands to, counted up to ``limit`` without keeping them (a few MB of memory at any size).

    Damaged or truncated data ends the count where it stops, as a reader would fail there.
    """
    total, buf = 0, b""
    d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
    with open(path, "rb") as f:
        f.seek(offset)
        while total < limit:
            if not buf:
                buf = f.read(1 << 20)
                if not buf:
                    break
            try:
                total += len(d.decompress(buf, 1 << 22))
            except zlib.error:
                break
            if d.eof:  # one gzip member ended; another may follow (pigz, bgzip)
                buf = d.unused_data
                d = zlib.decompressobj(zlib.MAX_WBITS | 32)
            else:
                buf = d.unconsumed_tail
    return total


def _check_deflated(path: Path, offset: int, stored: int, declared: int) -> None:
    """Compressed voxel data: refuse a declared size beyond deflate's best ratio at once, and
    verify a large one (above :data:`TRUSTED_BYTES`) by decompressing it once, keeping nothing."""
    if declared > stored * DEFLATE_RATIO + 4096:
        raise _short_data(path, declared, f"{stored:,} compressed, at most {stored * DEFLATE_RATIO:,} "
                                          "when decompressed")
    if declared > TRUSTED_BYTES:
        found = _inflated_size(path, offset, declared)
        if found < declared:
            raise _short_data(path, declared, f"{found:,} when decompressed")


def _check_nifti_payload(path: Path, img) -> None:
    """The voxel data the NIfTI header declares must be in the file before nibabel allocates it."""
    offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))  # where nibabel will read
    declared = int(np.prod([int(d) for d in img.shape], dtype=object)) * img.header.get_data_dtype().itemsize
    size = path.stat().st_size
    if split_suffix(path)[1].lower() == ".nii":
        if offset + declared > size:
            raise _short_data(path, declared, f"{max(0, size - offset):,} after the header")
        return
    _check_deflated(path, 0, size, offset + declared)


def _itk_component_bytes(pixel_id: int) -> int:
    """Bytes per component of a SimpleITK pixel type ("vector of 16-bit signed integer": 2)."""
    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(pixel_id)
    bits = re.search(r"(\d+)-bit", name)
    size = int(bits.group(1)) // 8 if bits else 8
    return size * (2 if name.startswith("complex") else 1)


class _ItkLayout(NamedTuple):
    """What an NRRD or MetaImage text header says about its voxel data."""

    data: Path | None  # the file holding it; None when the header names a list or pattern of files
    offset: int  # where the data starts in that file
    encoding: str  # raw, deflate, text, hex or other
    sizes: tuple[int, ...]  # the header's own sizes (empty when they do not parse as counts)
    compressed_size: int | None  # MetaImage CompressedDataSize, when given


def _counts(text: str) -> tuple[int, ...]:
    tokens = text.split()
    return tuple(int(t) for t in tokens) if tokens and all(t.isdigit() for t in tokens) else ()


def _itk_layout(path: Path) -> _ItkLayout | None:
    """Parse the text header of an NRRD or MetaImage file (None: no header found in its first
    64 kB). Its sizes are read here too: NrrdIO allocates by its own 64-bit reading of them,
    which can differ from what ITK reports (a size of 2**32 reads as 0 there)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    nrrd = head.startswith(b"NRRD")
    fields: dict[str, str] = {}
    end = None
    pos = 0
    for raw in head.splitlines(keepends=True):
        pos += len(raw)
        line = raw.decode("latin-1").strip()
        if nrrd:
            if not line:
                end = pos
                break
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower().replace(" ", "")] = value.lstrip("=").strip()
        else:
            key, _, value = line.partition("=")
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                end = pos
                break
    name = fields.get("datafile" if nrrd else "elementdatafile")
    if end is None and name is None:
        return None
    if nrrd:
        enc = fields.get("encoding", "raw").lower()
        encoding = {"raw": "raw", "gz": "deflate", "gzip": "deflate", "txt": "text", "text": "text",
                    "ascii": "text", "hex": "hex"}.get(enc, "other")
        skip = fields.get("byteskip", "0")
        sizes = _counts(fields.get("sizes", ""))
        packed = None
    else:
        encoding = "deflate" if fields.get("compresseddata", "false").lower() == "true" else "raw"
        skip = fields.get("headersize", "0")
        channels = _counts(fields.get("elementnumberofchannels", "1"))
        sizes = _counts(fields.get("dimsize", "")) + (channels if channels else ())
        packed_text = fields.get("compresseddatasize", "").strip()
        packed = int(packed_text) if packed_text.lstrip("-").isdigit() else None
    if name is None or name.upper() == "LOCAL":
        data = path if end is not None else None
        return _ItkLayout(data, end or 0, encoding, sizes, packed)
    if name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1:
        return _ItkLayout(None, 0, encoding, sizes, packed)
    offset = int(skip) if skip.lstrip("-").isdigit() and int(skip) > 0 and encoding == "raw" else 0
    return _ItkLayout(path.parent / name, offset, encoding, sizes, packed)


def _check_itk_payload(path: Path, values: int, component_bytes: int) -> None:
    """The header's own sizes against the voxel limit, then the voxel data it declares against
    its data file, before ITK allocates the image: exactly for raw data, by deflate's ratio
    (and, above :data:`TRUSTED_BYTES`, a streaming count) for compressed data, two characters a
    value for text."""
    layout = _itk_layout(path)
    if layout is None:
        return
    if layout.sizes:
        _check_header(path, layout.sizes)
        values = max(values, int(np.prod(layout.sizes, dtype=object)))
    declared = values * component_bytes
    if layout.data is None:
        return
    data, offset, encoding = layout.data, layout.offset, layout.encoding
    if not data.is_file():
        raise InputError(f"the data file '{data.name}' named in the header is missing", path,
                         "keep the data file beside its header (or save the image as one .nrrd/.mha file)")
    stored = max(0, data.stat().st_size - offset)
    if layout.compressed_size is not None and not 0 <= layout.compressed_size <= stored:
        raise InputError(f"the header declares {layout.compressed_size:,} bytes of compressed data but the "
                         f"file holds {stored:,} (truncated, or a damaged header)", path,
                         "re-export the image; if it opens elsewhere, check CompressedDataSize")
    if encoding == "raw" and declared > stored:
        raise _short_data(path, declared, f"{stored:,}")
    if encoding == "deflate":
        _check_deflated(data, offset, stored, declared)
    if encoding == "text" and values > stored // 2 + 1:
        raise InputError(f"the header declares {values:,} values but the text data holds at most "
                         f"{stored // 2 + 1:,} (truncated, or a damaged header)", path,
                         "re-export the image; if it opens elsewhere, check the header's sizes")
    if encoding == "hex" and declared > stored // 2:
        raise _short_data(path, declared, f"{stored // 2:,} (as hex)")


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label map (no channel axis), as integers.

    Label files saved as RGB/RGBA with identical channels (a common export accident) are
    accepted; real colour labels are refused with a clear error. Palette (indexed) PNGs give
    their palette indices, which is how such label maps store class ids. Values that do not
    fit ``uint8`` (negative or above 255) come back as ``int64``.
    """
    path = Path(path)
    arr, geom = _read(path, label=True)
    if arr.shape[0] > 1:
        rgb = arr[:3]
        if not all(np.array_equal(rgb[0], c) for c in rgb[1:]):
            raise InputError(
                f"label map has {arr.shape[0]} different colour channels",
                path,
                "save labels as a single-channel image of integer class values",
            )
    lab = arr[0]
    if np.issubdtype(lab.dtype, np.floating) and (
        not np.all(np.isfinite(lab)) or not np.array_equal(lab, np.round(lab))
    ):
        raise InputError(
            "label map has non-integer values", path, "labels must be integer class ids"
        )
    small = lab.min(initial=0) >= 0 and lab.max(initial=0) <= 255
    return lab.astype(np.uint8 if small else np.int64), geom


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    img = nib.load(str(path))  # the header only: the data is read below, once it passed the checks
    zooms = tuple(float(z) for z in img.header.get_zooms())
    _check_header(path, img.shape, zooms[: min(len(img.shape), 3)])
    _check_nifti_payload(path, img)
    data = np.asanyarray(img.dataobj)
    affine = np.asarray(img.affine, dtype=float)
    file_ndim = data.ndim
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 3:
        arr = data[None]
    elif data.ndim == 4:  # 4D NIfTI: the last axis holds channels (e.g. modalities)
        arr = np.moveaxis(data, -1, 0)
    else:
        raise InputError(f"NIfTI with {data.ndim} dimensions is not supported", path)
    nsp = 3
    spacing = zooms[:nsp]
    spacing = spacing + (1.0,) * (nsp - len(spacing))
    rot = affine[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    norms[norms == 0] = 1.0
    geom = Geometry(
        spacing=spacing,
        origin=tuple(affine[:3, 3]),
        direction=tuple((rot / norms).ravel()),
        affine=tuple(affine.ravel()),
        fmt="nifti",
        extra={
            "suffix": split_suffix(path)[1].lower(),
            "spatial_ndim": min(file_ndim, 3),
            "nifti": _nifti_geometry_fields(img.header),
        },
    )
    return np.ascontiguousarray(arr), geom


# Header fields that define a NIfTI file's placement. They are kept verbatim (as JSON-friendly
# numbers) so a written label reproduces the input's affine bit for bit, whether it came from
# the sform or the qform (re-deriving the quaternion from a float64 affine does not).
_NIFTI_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                 "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


# NIfTI's world axes point to the patient's right-anterior-superior (RAS); ITK's and DICOM's to
# left-posterior-superior (LPS): the first two world axes flip between them.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _nifti_geometry_fields(header) -> dict:
    fields = {k: np.asarray(header[k]).tolist() for k in _NIFTI_FIELDS}
    fields["pixdim"] = np.asarray(header["pixdim"][:4]).tolist()  # qfac + 3 spatial zooms
    return fields


def _read_natural(path: Path, label: bool = False) -> tuple[np.ndarray, Geometry]:
    from PIL import Image

    with Image.open(path) as im:  # lazy: the size is known before the pixels are decoded
        _check_header(path, (len(im.getbands()), im.size[1], im.size[0]))
        if im.format == "JPEG":
            _check_jpeg_size(path, len(im.getbands()), im.size)
        elif im.format == "PNG":
            _check_png_size(path)
        im.load()
        mode = im.mode
        if mode in ("P", "PA") and label:  # indexed label maps store class ids as indices
            arr = np.asarray(im)
            return _hw_to_chw(arr[..., 0] if arr.ndim == 3 else arr), Geometry.identity(
                2, fmt="natural"
            )
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        elif mode in ("LA",):
            im = im.convert("L")
        elif mode == "CMYK":
            im = im.convert("RGB")
        arr = np.asarray(im)
    return _hw_to_chw(arr), Geometry.identity(2, fmt="natural")


# A Huffman-coded JPEG spends at least one bit on every 8x8 block of its full-resolution
# component, so a byte of file decodes to at most 8 x 64 pixels, 4 channels each. libjpeg fills
# what a short stream lacks with grey instead of failing, so the size must be checked first.
JPEG_RATIO = 2048


def _jpeg_frame_marker(path: Path) -> int | None:
    """The start-of-frame marker of a JPEG (0xFFC0-0xFFCF less DHT, JPG and DAC), found by walking
    the segments before the scan; None when the walk does not reach one."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None
        for _ in range(1000):
            head = f.read(4)
            if len(head) < 4 or head[0] != 0xFF or head[1] == 0xDA:
                return None
            if 0xC0 <= head[1] <= 0xCF and head[1] not in (0xC4, 0xC8, 0xCC):
                return 0xFF00 | head[1]
            f.seek(int.from_bytes(head[2:], "big") - 2, 1)
    return None


def _check_jpeg_size(path: Path, bands: int, size: tuple[int, int]) -> None:
    """Refuse a JPEG whose frame header declares more pixels than its bytes can encode."""
    values = bands * size[0] * size[1]
    stored = path.stat().st_size
    if values <= stored * JPEG_RATIO:
        return
    marker = _jpeg_frame_marker(path)
    if marker is None or marker >= 0xFFC9:  # arithmetic coding: no such ceiling
        return
    raise InputError(f"the header declares {size[0]}x{size[1]} pixels, more than a JPEG of {stored:,} bytes "
                     "can hold (truncated, or a damaged header)", path,
                     "re-export the image; if it opens elsewhere, check its size fields")


def _check_png_size(path: Path) -> None:
    """Refuse a PNG whose IHDR declares more rows than its file can hold at deflate's best ratio:
    Pillow ends a short stream without an error, the missing rows left as zeros."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[12:16] != b"IHDR":
        return
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(head[25], 1)
    raw = height * (1 + (width * channels * head[24] + 7) // 8)  # a filter byte leads every row
    stored = path.stat().st_size
    if raw > stored * DEFLATE_RATIO + 4096:
        raise InputError(f"the header declares {width}x{height} pixels ({raw:,} bytes to decompress) but the "
                         f"file holds {stored:,} bytes, at most {stored * DEFLATE_RATIO:,} decompressed "
                         "(truncated, or a damaged header)", path,
                         "re-export the image; if it opens elsewhere, check its size fields")


def _read_tiff(path: Path) -> tuple[np.ndarray, Geometry]:
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        _check_header(path, tif.series[0].shape)
        _check_tiff_payload(path, tif)
        arr = tif.asarray()
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        return _hw_to_chw(arr), Geometry.identity(2, fmt="tiff")
    if arr.ndim == 3:  # a grey stack: treat pages as the first spatial axis
        return arr[None], Geometry.identity(3, fmt="tiff")
    raise InputError(f"TIFF with shape {arr.shape} is not supported", path)


# How many bytes one stored byte of a TIFF strip or tile can decode to, by compression tag: none,
# LZW (12-bit codes of strings up to 4 kB), PackBits (2 bytes for 128), deflate / Adobe deflate.
# Other codes get a ceiling no real codec reaches on image data (ZSTD's best is ~44,000:1).
_TIFF_RATIO = {1: 1, 5: 4096, 32773: 64, 8: DEFLATE_RATIO, 32946: DEFLATE_RATIO}
_TIFF_OTHER_RATIO = 65536


def _check_tiff_payload(path: Path, tif) -> None:
    """Each page's own size against the voxel limit (a page's tags can disagree with the series
    shape, and tifffile decodes a page at its own size), and, above :data:`TRUSTED_BYTES`, the
    strips/tiles against what they must hold (tifffile allocates the whole series first)."""
    series = tif.series[0]
    pages = [p for p in series.pages if p is not None]
    declared = int(np.prod([int(d) for d in series.shape], dtype=object)) * series.dtype.itemsize
    page_bytes = 0
    for page in pages:
        shape = tuple(int(d) for d in getattr(page, "shape", ()))
        _check_header(path, shape)
        dtype = getattr(page, "dtype", None)
        page_bytes += int(np.prod(shape, dtype=object)) * (dtype.itemsize if dtype is not None else 1)
    declared = max(declared, page_bytes)
    size = path.stat().st_size
    stored, ratio = 0, 0
    for page in pages:
        offsets, counts = getattr(page, "dataoffsets", None), getattr(page, "databytecounts", None)
        compression = int(getattr(getattr(page, "keyframe", page), "compression", 0))
        if offsets is None or counts is None:
            return
        for o, c in zip(offsets, counts, strict=False):  # a strip is read into a buffer of its count
            if int(o) + int(c) > size:
                raise InputError(f"a strip or tile of {int(c):,} bytes at offset {int(o):,} runs past the "
                                 f"end of the file ({size:,} bytes; truncated, or a damaged header)", path,
                                 "re-export the image")
        ratio = max(ratio, _TIFF_RATIO.get(compression, _TIFF_OTHER_RATIO))
        stored += sum(int(c) for c in counts)
    if declared > TRUSTED_BYTES and declared > stored * ratio:
        held = f"{stored:,}" if ratio == 1 else f"{stored:,} compressed, at most {stored * ratio:,} decoded"
        raise _short_data(path, declared, held)


def _hw_to_chw(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return np.ascontiguousarray(arr[None])
    if arr.shape[-1] == 4:  # drop alpha: it carries no image content for segmentation
        arr = arr[..., :3]
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0))


def _read_itk(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header: size, components and spacing before any pixel
    _check_header(path, (reader.GetNumberOfComponents(), *reader.GetSize()), reader.GetSpacing())
    values = int(np.prod([reader.GetNumberOfComponents(), *reader.GetSize()], dtype=object))
    _check_itk_payload(path, values, _itk_component_bytes(reader.GetPixelIDValue()))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
    nd = img.GetDimension()
    arr = np.moveaxis(arr, -1, 0) if img.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    arr = np.ascontiguousarray(np.moveaxis(arr, list(range(1, nd + 1)), list(range(nd, 0, -1))))
    geom = Geometry(
        spacing=img.GetSpacing(),
        origin=img.GetOrigin(),
        direction=img.GetDirection(),
        fmt="itk",
        extra={"suffix": split_suffix(path)[1].lower()},
    )
    return arr, geom


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry | None = None) -> Path:
    """Write an array (spatial, or channel-first) atomically, in the format its suffix names.

    For NIfTI the source header's placement (sform, qform and their codes) is written back
    verbatim when ``geometry`` came from a NIfTI file, so the file overlays its source exactly
    (same affine, same shape). Integer arrays are stored in the smallest fitting integer type.
    The file appears under its final name only once it is complete: it is written into a
    hidden temporary folder beside the target (detached headers such as ``.mhd`` keep their
    data file next to them) and renamed into place; nothing is left behind on failure.
    """
    path = Path(path)
    suffix = split_suffix(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(
            f"cannot write format '{suffix}'", path, f"use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    array = np.asarray(array)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{split_suffix(path)[0]}.", suffix=".tmp",
                                        dir=path.parent))
    except OSError as exc:
        raise InputError(f"cannot write here ({exc.strerror or exc})", path) from exc
    try:
        tmp = tmp_dir / path.name
        try:
            if suffix in NIFTI_SUFFIXES:
                _write_nifti(tmp, array, geometry)
            elif suffix in NATURAL_SUFFIXES or suffix in TIFF_SUFFIXES:
                _write_2d(tmp, array, suffix, geometry, path)
            else:
                _write_itk(tmp, array, geometry, path)
        except InputError:
            raise
        except Exception as exc:  # the user needs the file name, not a library traceback
            raise InputError(
                f"cannot write image ({type(exc).__name__}: {exc})".replace("\n", " "), path
            ) from exc
        # data files first, the file the user named last: it appears only when all is there
        for f in sorted(tmp_dir.iterdir(), key=lambda q: q.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _smallest_int(data: np.ndarray) -> np.ndarray:
    """Integer/bool arrays in the smallest standard type that holds them (NIfTI has no int64)."""
    if data.dtype == bool:
        return data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer) or data.dtype.itemsize <= 2:
        return data
    lo, hi = int(data.min(initial=0)), int(data.max(initial=0))
    for t in (np.uint8, np.int16, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return data.astype(t)
    return data.astype(np.int64)


def _write_nifti(tmp: Path, array: np.ndarray, geometry: Geometry | None) -> None:
    import nibabel as nib

    data = array
    extra = geometry.extra if geometry is not None else {}
    if data.ndim == 4:  # channel-first -> channels last, as NIfTI stores them
        data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    if extra.get("spatial_ndim") == 2 and data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]  # the source was a 2D NIfTI: give back its (X, Y) shape
    data = _smallest_int(np.ascontiguousarray(data))
    affine = geometry.affine_matrix if geometry is not None else np.eye(4)
    if affine.shape != (4, 4):  # a 2D geometry: embed it in a 3D affine
        full = np.eye(4)
        n = affine.shape[0] - 1
        full[:n, :n] = affine[:n, :n]
        full[:n, 3] = affine[:n, n]
        affine = full
    elif geometry is not None and geometry.fmt == "itk" and geometry.affine is None:
        affine = _LPS_RAS @ affine  # ITK world (LPS) -> NIfTI world (RAS)
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    fields = extra.get("nifti")
    if fields:
        for key, value in fields.items():
            if key == "pixdim":
                header["pixdim"][: len(value)] = value
            else:
                header[key] = value
        if not np.array_equal(header.get_best_affine(), affine):
            fields = None  # the geometry was changed after reading: its affine wins
    if not fields:
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
    img = nib.Nifti1Image(data, header.get_best_affine(), header=header)
    nib.save(img, str(tmp))


def _write_2d(tmp: Path, array: np.ndarray, suffix: str, geometry: Geometry | None,
              path: Path) -> None:
    from PIL import Image

    arr = array
    if suffix in TIFF_SUFFIXES and geometry is not None and geometry.ndim == 3:
        # a 3D stack (pages along the first spatial axis), as the TIFF reader returns it
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3:
            raise InputError(f"cannot write an array of shape {array.shape} as a TIFF stack", path)
        import tifffile

        tifffile.imwrite(str(tmp), np.ascontiguousarray(_smallest_int(arr)))
        return
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or arr.ndim not in (2, 3):
        raise InputError(f"cannot write an array of shape {array.shape} as a 2D image", path)
    if suffix in TIFF_SUFFIXES:
        import tifffile

        tifffile.imwrite(str(tmp), np.ascontiguousarray(_smallest_int(arr)))
        return
    if arr.dtype != np.uint8:
        lo, hi = arr.min(initial=0), arr.max(initial=0)
        if lo < 0 or hi > 255:
            if suffix != ".png" or arr.ndim != 2 or lo < 0 or hi > 65535:
                raise InputError(
                    f"values {lo}..{hi} cannot be written as {suffix}",
                    path,
                    "use 0..255 (or 0..65535 for a single-channel PNG), or write .tif/.nii.gz",
                )
            arr = arr.astype(np.uint16)
        else:
            arr = arr.astype(np.uint8)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}[suffix]
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format=fmt)


def _write_itk(tmp: Path, array: np.ndarray, geometry: Geometry | None, path: Path) -> None:
    import SimpleITK as sitk

    nd = geometry.ndim if geometry is not None else (array.ndim - 1 if array.ndim == 4 else
                                                     array.ndim)
    if array.ndim == nd + 1:  # channel-first
        channels = array.shape[0]
        data = array[0] if channels == 1 else np.moveaxis(array, 0, -1)
    elif array.ndim == nd:
        channels, data = 1, array
    else:
        raise InputError(f"array of shape {array.shape} does not fit a {nd}D geometry", path)
    data = _smallest_int(data)
    # (x, y, z[, c]) -> SimpleITK's (z, y, x[, c])
    order = list(range(nd))[::-1] + ([nd] if channels > 1 else [])
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, order)),
                                 isVector=channels > 1)
    if geometry is not None:
        origin, direction = np.asarray(geometry.origin), np.reshape(geometry.direction, (nd, nd))
        if geometry.fmt == "nifti" and nd == 3:  # NIfTI world (RAS) -> ITK world (LPS)
            origin, direction = _LPS_RAS[:3, :3] @ origin, _LPS_RAS[:3, :3] @ direction
        img.SetSpacing(geometry.spacing)
        img.SetOrigin(tuple(origin.tolist()))
        img.SetDirection(tuple(direction.ravel().tolist()))
    sitk.WriteImage(img, str(tmp), useCompression=True)
