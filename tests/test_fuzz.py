"""Every reader against hostile files (issue 17): random bytes, truncated files, and small valid
files whose header fields (sizes, data type, spacing, offsets, encodings) were overwritten.

Each example must end in either a sane array or the project's own one-line error (``InputError``;
``UploadError`` for the server's zip step) - never another exception type, a hang or a large
allocation. Memory is measured around every read, two ways: tracemalloc's peak (Python and numpy
allocations, counted when requested even if never touched) and the growth of the kernel's peak
resident set (``VmHWM``, reset before each read through ``/proc/self/clear_refs``), which sees
what the C libraries (ITK, GDCM, Pillow, zlib) actually touch. Both must stay under
:data:`MEMORY_BOUND` while the headers declare up to 2**31 voxels per axis.

Examples are derandomised (the same in every run, no example database) and bounded by
``max_examples``; the whole file takes well under a minute on two cores.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import tempfile
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import write_dicom_series
from medunet.errors import InputError
from medunet.io import read_dicom_series, read_image, read_label
from medunet.io.image import max_voxels
from medunet.serve.uploads import UploadError, extract_dicom_zip

MEMORY_BOUND = 200 * 2**20  # bytes, per read: Python peak and resident-set growth, each
READ_SECONDS = 10.0  # a read of these few-kB files taking longer is a hang in the making
ZIP_LIMIT = 4 * 2**20  # what the zip step may expand to (the server passes 4 x its upload limit)

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# the readers: a name, the suffix of its files
READERS = {"png": ".png", "jpg": ".jpg", "bmp": ".bmp", "tif": ".tif", "nii": ".nii", "nii.gz": ".nii.gz",
           "nrrd": ".nrrd", "mha": ".mha", "dicom": "", "zip": ".zip"}

# header values worth trying: zero, negative, one, the 600, int16/uint16/int32/uint32 edges
SPECIAL_INTS = [0, 1, -1, 2, 3, 8, 600, 32767, -32768, 65535, 2**31 - 1, 2**31, 2**32 - 1]
SPECIAL_FLOATS = [0.0, -1.0, 1e-30, 250.0, 1e30, float("nan"), float("inf"), float("-inf")]


# ----------------------------------------------------------------------------- measuring a read


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Set the kernel's peak resident set (VmHWM) back to the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _measured(read: Callable[[], object]) -> tuple[object, int, int, float]:
    """``read()``'s result (or the exception it raised), its Python allocation peak, its growth
    of the resident set's peak, and its seconds."""
    _reset_peak_rss()
    rss = _status_bytes("VmRSS")
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        result = read()
    except Exception as exc:  # judged by the caller: only the project's own errors pass
        result = exc
    seconds = time.perf_counter() - t0
    return (result, tracemalloc.get_traced_memory()[1] - traced, _status_bytes("VmHWM") - rss, seconds)


def _check(read: Callable[[], object], name: str, errors: tuple[type[Exception], ...] = (InputError,),
           label: bool = False) -> None:
    """One hostile read: a sane array (a label map has no channel axis) or a one-line error of
    ours naming ``name``, bounded memory and time; any other exception is re-raised with its own
    traceback."""
    result, python_peak, rss_peak, seconds = _measured(read)
    if isinstance(result, Exception) and not isinstance(result, errors):
        raise result
    assert python_peak < MEMORY_BOUND, f"{name}: Python allocations peaked at {python_peak / 2**20:.0f} MB"
    assert rss_peak < MEMORY_BOUND, f"{name}: the resident set grew by {rss_peak / 2**20:.0f} MB"
    assert seconds < READ_SECONDS, f"{name}: the read took {seconds:.1f} s"
    if isinstance(result, Exception):
        message = str(result)
        assert message and "\n" not in message, repr(message)
        if isinstance(result, InputError):
            assert name in message, message
        return
    arr, geom = result  # type: ignore[misc]
    assert isinstance(arr, np.ndarray) and 3 - label <= arr.ndim <= 5 - label, getattr(arr, "shape", arr)
    assert 0 < arr.size <= max_voxels() and min(arr.shape) > 0, arr.shape
    spacing = np.asarray(geom.spacing, dtype=np.float64)
    assert np.isfinite(spacing).all() and (spacing > 0).all(), spacing


# ----------------------------------------------------------------------------- valid seed files


def _seed_bytes(kind: str, folder: Path) -> bytes | list[bytes]:
    """A small valid file of each kind (a DICOM series is a list of three slice files)."""
    rng = np.random.default_rng(17)
    path = folder / f"seed{READERS[kind]}"
    if kind in ("png", "jpg"):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    elif kind == "bmp":  # 8-bit palette: RLE8 is a value of its compression field
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(path)
    elif kind == "tif":
        tifffile.imwrite(path, rng.integers(0, 4000, (3, 12, 10), dtype=np.uint16), photometric="minisblack")
    elif kind in ("nii", "nii.gz"):
        affine = np.diag([0.8, 0.7, 2.5, 1.0])
        nib.save(nib.Nifti1Image(rng.normal(size=(6, 5, 4)).astype(np.float32), affine), str(path))
    elif kind in ("nrrd", "mha"):
        img = sitk.GetImageFromArray(rng.integers(0, 1000, (4, 5, 6), dtype=np.int16))
        img.SetSpacing((0.8, 0.7, 2.5))
        sitk.WriteImage(img, str(path), useCompression=kind == "mha")  # raw NRRD, deflated MHA
    elif kind in ("dicom", "zip"):
        files = write_dicom_series(folder / "series", rng.integers(0, 1000, (3, 8, 6), dtype=np.int16))
        if kind == "dicom":
            return [f.read_bytes() for f in files]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                zf.write(f, f"study/{f.name}")
        return buf.getvalue()
    return path.read_bytes()


class Seeds(dict):
    """The seed files by reader; shown by name only in hypothesis' reports (they are kilobytes)."""

    def __repr__(self) -> str:
        return f"<seeds: {', '.join(self)}>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    out = Seeds()
    for kind in READERS:
        folder = tmp_path_factory.mktemp(kind.replace(".", "_"))
        out[kind] = _seed_bytes(kind, folder)
        _check_seed_reads(kind, out[kind])
    return out


def _check_seed_reads(kind: str, data: bytes | list[bytes]) -> None:
    """The seeds themselves must read, or the tampering below proves nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        arr, _ = _reader(kind, data, Path(tmp), label=False)()
    assert arr.size > 0


def _reader(kind: str, data: bytes | list[bytes], tmp: Path, label: bool) -> Callable[[], tuple]:
    """Store ``data`` as the reader's input in ``tmp``; return the call that reads it."""
    if kind == "dicom":
        folder = tmp / "series"
        folder.mkdir()
        for i, blob in enumerate(data):
            (folder / f"im{i:03d}.dcm").write_bytes(blob)
        return lambda: read_dicom_series(folder)
    path = tmp / f"case{READERS[kind]}"
    path.write_bytes(data)  # type: ignore[arg-type]
    if kind == "zip":
        def read_zip() -> tuple:
            return read_dicom_series(extract_dicom_zip(path, tmp / "series", ZIP_LIMIT))
        return read_zip
    return (lambda: read_label(path)) if label else (lambda: read_image(path))


def _fuzz_one(kind: str, data: bytes | list[bytes], label: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        read = _reader(kind, data, Path(tmp), label)
        errors = (InputError, UploadError) if kind == "zip" else (InputError,)
        label = label and kind not in ("dicom", "zip")  # series have no label reader
        _check(read, "series" if kind in ("dicom", "zip") else f"case{READERS[kind]}", errors, label)


# ----------------------------------------------------------------------------- header tampering

def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Edge values first, then any value in range."""
    return st.one_of(st.sampled_from([v for v in SPECIAL_INTS if lo <= v <= hi]), st.integers(lo, hi))


def _floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(width=32))


# NIfTI-1: (offset, struct format, values) of the fields that size, type and place the data
NIFTI_FIELDS = {
    "dim0": (40, "<h", _ints(-32768, 32767)), "dim1": (42, "<h", _ints(-32768, 32767)),
    "dim2": (44, "<h", _ints(-32768, 32767)), "dim3": (46, "<h", _ints(-32768, 32767)),
    "dim4": (48, "<h", _ints(-32768, 32767)),
    "datatype": (70, "<h", st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536,
                                            1792, 2048, 2304, 99, -1])),
    "bitpix": (72, "<h", _ints(-32768, 32767)), "pixdim1": (80, "<f", _floats()),
    "pixdim2": (84, "<f", _floats()), "pixdim3": (88, "<f", _floats()),
    "vox_offset": (108, "<f", _floats()), "scl_slope": (112, "<f", _floats()),
    "sizeof_hdr": (0, "<i", _ints(-(2**31), 2**31 - 1)),
}


def _cube(value: int) -> list[tuple[str, int]]:
    """All three spatial dims at once (``600`` is the issue's 600x600x600)."""
    return [("dim0", 3), ("dim1", value), ("dim2", value), ("dim3", value)]


nifti_edits = st.one_of(
    st.lists(st.sampled_from(sorted(NIFTI_FIELDS)).flatmap(
        lambda f: st.tuples(st.just(f), NIFTI_FIELDS[f][2])), min_size=1, max_size=3),
    st.sampled_from([600, 1000, 1290, 2048, 32767]).map(_cube))


def _tamper_nifti(seed: bytes, edits: list[tuple[str, float]], compressed: bool) -> bytes:
    raw = bytearray(gzip.decompress(seed) if compressed else seed)
    for field, value in edits:
        offset, fmt, _ = NIFTI_FIELDS[field]
        struct.pack_into(fmt, raw, offset, value)
    return gzip.compress(bytes(raw)) if compressed else bytes(raw)


# PNG IHDR (big-endian, the chunk's CRC recomputed so that the reader gets past it)
PNG_FIELDS = {"width": (16, ">I", _ints(0, 2**32 - 1)), "height": (20, ">I", _ints(0, 2**32 - 1)),
              "bit_depth": (24, "B", _ints(0, 255)), "colour_type": (25, "B", _ints(0, 255)),
              "interlace": (28, "B", _ints(0, 255))}


def _tamper_png(seed: bytes, edits: list[tuple[str, int]]) -> bytes:
    raw = bytearray(seed)
    for field, value in edits:
        offset, fmt, _ = PNG_FIELDS[field]
        struct.pack_into(fmt, raw, offset, value)
    struct.pack_into(">I", raw, 29, zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


# JPEG SOF0 (offsets from the marker)
JPEG_FIELDS = {"precision": (4, "B", _ints(0, 255)), "height": (5, ">H", _ints(0, 65535)),
               "width": (7, ">H", _ints(0, 65535)), "components": (9, "B", _ints(0, 255)),
               "sampling": (11, "B", _ints(0, 255))}


def _tamper_jpeg(seed: bytes, edits: list[tuple[str, int]]) -> bytes:
    raw = bytearray(seed)
    sof = raw.find(b"\xff\xc0")
    for field, value in edits:
        offset, fmt, _ = JPEG_FIELDS[field]
        struct.pack_into(fmt, raw, sof + offset, value)
    return bytes(raw)


# BMP file and info headers (little-endian)
BMP_FIELDS = {"data_offset": (10, "<I", _ints(0, 2**32 - 1)), "width": (18, "<i", _ints(-(2**31), 2**31 - 1)),
              "height": (22, "<i", _ints(-(2**31), 2**31 - 1)), "planes": (26, "<H", _ints(0, 65535)),
              "bits": (28, "<H", st.sampled_from([0, 1, 2, 4, 8, 16, 24, 32, 64, 65535])),
              "compression": (30, "<I", st.sampled_from([0, 1, 2, 3, 4, 5, 6, 2**32 - 1])),
              "image_size": (34, "<I", _ints(0, 2**32 - 1)), "colours": (46, "<I", _ints(0, 2**32 - 1))}


def _tamper_bmp(seed: bytes, edits: list[tuple[str, int]]) -> bytes:
    raw = bytearray(seed)
    for field, value in edits:
        offset, fmt, _ = BMP_FIELDS[field]
        struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


# TIFF tags of the first page (tifffile writes them inline: SHORT or LONG values)
TIFF_TAGS = {"ImageWidth": 256, "ImageLength": 257, "BitsPerSample": 258, "Compression": 259,
             "Photometric": 262, "StripOffsets": 273, "SamplesPerPixel": 277, "RowsPerStrip": 278,
             "StripByteCounts": 279, "PlanarConfig": 284, "SampleFormat": 339}


def _tamper_tiff(seed: bytes, edits: list[tuple[str, int]]) -> bytes:
    raw = bytearray(seed)
    ifd = struct.unpack_from("<I", raw, 4)[0]
    entries = {}
    for i in range(struct.unpack_from("<H", raw, ifd)[0]):
        tag, typ = struct.unpack_from("<HH", raw, ifd + 2 + 12 * i)
        entries[tag] = (ifd + 2 + 12 * i, typ)
    for name, value in edits:
        if TIFF_TAGS[name] in entries:
            pos, typ = entries[TIFF_TAGS[name]]
            if typ == 3:  # SHORT
                struct.pack_into("<H", raw, pos + 8, value & 0xFFFF)
            else:
                struct.pack_into("<I", raw, pos + 8, value & 0xFFFFFFFF)
    return bytes(raw)


# NRRD / MetaImage text headers: a field and what to write into it
SIZES = st.one_of(st.sampled_from(["600 600 600", "2147483648 2 2", "0 4 4", "-1 5 6", "6 5", "6 5 4 3",
                                   "1e9 1 1", "x y z", "4294967296 1 1", "2048 2048 2048"]),
                  st.lists(_ints(-1, 2**33), min_size=1, max_size=4).map(lambda v: " ".join(map(str, v))))
SPACINGS = st.one_of(st.sampled_from(["0 0 0", "nan 1 1", "-1 1 1", "inf 1 1", "1e308 1 1", "1 1"]),
                     st.lists(_floats(), min_size=3, max_size=3).map(lambda v: " ".join(map(repr, v))))
ITK_FIELDS = {
    "nrrd": {"sizes": SIZES, "dimension": st.sampled_from(["0", "1", "2", "3", "4", "17", "-1"]),
             "type": st.sampled_from(["double", "int64", "uchar", "block", "float", "nonsense"]),
             "encoding": st.sampled_from(["raw", "gzip", "bzip2", "ascii", "hex", "nonsense"]),
             "spacings": SPACINGS,
             "space directions": st.sampled_from(["(0,0,0) (0,0.7,0) (0,0,2.5)", "(nan,0,0) (0,1,0) (0,0,1)",
                                                  "(1e308,0,0) (0,1e308,0) (0,0,1e308)", "none none none"]),
             "data file": st.sampled_from(["missing.raw", "LIST", "%d 1 10 1", "seed.nrrd"]),
             "byte skip": st.sampled_from(["-1", "0", "100000", "-5"])},
    "mha": {"DimSize": SIZES, "NDims": st.sampled_from(["0", "1", "2", "3", "4", "17", "-1"]),
            "ElementType": st.sampled_from(["MET_DOUBLE", "MET_LONG_LONG", "MET_UCHAR", "MET_NONE", "junk"]),
            "CompressedData": st.sampled_from(["True", "False"]), "ElementSpacing": SPACINGS,
            "ElementNumberOfChannels": st.sampled_from(["0", "1", "3", "65535", "-1"]),
            "HeaderSize": st.sampled_from(["-1", "0", "100000"]),
            "CompressedDataSize": st.sampled_from(["0", "1", "99999999999", "-1"])},
}


def _tamper_itk(seed: bytes, kind: str, edits: list[tuple[str, str]]) -> bytes:
    """Replace (or add) header fields; the voxel data stays right after the header."""
    if kind == "nrrd":
        cut = seed.index(b"\n\n") + 2
        header, data = seed[:cut].decode("latin-1"), seed[cut:]
        lines = header.rstrip("\n").split("\n")
        for field, value in edits:
            lines = [ln for ln in lines if not ln.lower().startswith(field + ":")]
            lines.append(f"{field}: {value}")
        return ("\n".join(lines) + "\n\n").encode("latin-1") + data
    cut = seed.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header, data = seed[:cut].decode("latin-1"), seed[cut:]
    lines = header.rstrip("\n").split("\n")[:-1]  # the data file line goes back last
    for field, value in edits:
        lines = [ln for ln in lines if not re.match(rf"{field}\s*=", ln)]
        lines.append(f"{field} = {value}")
    return ("\n".join([*lines, "ElementDataFile = LOCAL"]) + "\n").encode("latin-1") + data


# DICOM attributes (set through pydicom, within each attribute's value representation)
DICOM_FIELDS = {
    "Rows": _ints(0, 65535), "Columns": _ints(0, 65535),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64, 255]),
    "SamplesPerPixel": _ints(0, 16), "PixelRepresentation": _ints(0, 3),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "2000", "99999999", "-1"]),
    "PixelSpacing": st.sampled_from([["0", "1"], ["nan", "1"], ["-1", "-1"], ["1e308", "1e308"], ["1"]]),
    "ImagePositionPatient": st.sampled_from([[0, 0, 0], [0, 0, float("nan")], [1e308, 0, 0]]),
    "PhotometricInterpretation": st.sampled_from(["RGB", "PALETTE COLOR", "YBR_FULL", "MONOCHROME1", "X"]),
    "TransferSyntaxUID": st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.2",  # native
                                          "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5",  # JPEG, RLE
                                          "1.2.840.10008.1.2.1.99", "1.2.3"]),  # deflated, unknown
    "PixelData": st.integers(0, 95),  # keep this many bytes of the 96
}


def _tamper_dicom(seed: bytes, edits: list[tuple[str, object]]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(seed))
    with pydicom.config.disable_value_validation():
        _set_dicom_fields(ds, [e for e in edits if e[0] != "TransferSyntaxUID"])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    blob = out.getvalue()
    for field, value in edits:  # the data set stays as it is encoded: only the meta header lies
        if field == "TransferSyntaxUID":
            blob = _set_syntax(blob, str(value))
    return blob


def _set_syntax(blob: bytes, uid: str) -> bytes:
    """Rewrite (0002,0010) in the file meta header, and the meta group's length with it."""
    at = blob.index(b"\x02\x00\x10\x00UI")
    old = int.from_bytes(blob[at + 6:at + 8], "little")
    new = uid.encode() + b"\0" * (len(uid) % 2)
    blob = blob[:at + 6] + len(new).to_bytes(2, "little") + new + blob[at + 8 + old:]
    group = blob.index(b"\x02\x00\x00\x00UL")
    length = int.from_bytes(blob[group + 8:group + 12], "little") + len(new) - old
    return blob[:group + 8] + length.to_bytes(4, "little") + blob[group + 12:]


def _set_dicom_fields(ds: pydicom.Dataset, edits: list[tuple[str, object]]) -> None:
    for field, value in edits:
        if field == "PixelData":
            ds.PixelData = ds.PixelData[: int(value)]  # type: ignore[index]
        else:
            setattr(ds, field, value)


# zip structure: the first local header, the first central directory entry, the end record
ZIP_FIELDS = {"local.method": (0, 8, "<H"), "local.csize": (0, 18, "<I"), "local.usize": (0, 22, "<I"),
              "local.namelen": (0, 26, "<H"), "central.method": (1, 10, "<H"), "central.csize": (1, 20, "<I"),
              "central.usize": (1, 24, "<I"), "central.offset": (1, 42, "<I"), "end.entries": (2, 10, "<H"),
              "end.cd_size": (2, 12, "<I"), "end.cd_offset": (2, 16, "<I")}


def _tamper_zip(seed: bytes, edits: list[tuple[str, int]]) -> bytes:
    raw = bytearray(seed)
    starts = [raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02"), raw.rfind(b"PK\x05\x06")]
    for field, value in edits:
        which, offset, fmt = ZIP_FIELDS[field]
        struct.pack_into(fmt, raw, starts[which] + offset, value & (0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    return bytes(raw)


def _edits(fields: dict) -> st.SearchStrategy[list[tuple[str, object]]]:
    """One to three (field, hostile value) pairs."""
    return st.lists(st.sampled_from(sorted(fields)).flatmap(lambda f: st.tuples(st.just(f), fields[f])),
                    min_size=1, max_size=3)


@st.composite
def tampered(draw: st.DrawFn, kind: str, seed: bytes | list[bytes]) -> bytes | list[bytes]:
    """A valid seed with one to three header fields overwritten."""
    if kind in ("nii", "nii.gz"):
        return _tamper_nifti(seed, draw(nifti_edits), compressed=kind == "nii.gz")  # type: ignore[arg-type]
    if kind == "png":
        fields = {k: v[2] for k, v in PNG_FIELDS.items()}
        return _tamper_png(seed, draw(_edits(fields)))  # type: ignore[arg-type]
    if kind == "jpg":
        return _tamper_jpeg(seed, draw(_edits({k: v[2] for k, v in JPEG_FIELDS.items()})))  # type: ignore
    if kind == "bmp":
        return _tamper_bmp(seed, draw(_edits({k: v[2] for k, v in BMP_FIELDS.items()})))  # type: ignore
    if kind == "tif":
        return _tamper_tiff(seed, draw(_edits({k: _ints(0, 2**32 - 1) for k in TIFF_TAGS})))  # type: ignore
    if kind in ("nrrd", "mha"):
        return _tamper_itk(seed, kind, draw(_edits(ITK_FIELDS[kind])))  # type: ignore[arg-type]
    if kind == "dicom":
        which = draw(st.integers(0, len(seed) - 1))
        files = list(seed)
        files[which] = _tamper_dicom(files[which], draw(_edits(DICOM_FIELDS)))  # type: ignore[arg-type]
        return files
    return _tamper_zip(seed, draw(_edits({k: _ints(0, 2**32 - 1) for k in ZIP_FIELDS})))  # type: ignore


# ----------------------------------------------------------------------------- the three fuzzers

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff\xe0", "bmp": b"BM", "tif": b"II*\x00",
         "nii": b"\x5c\x01\x00\x00", "nii.gz": b"\x1f\x8b\x08\x00", "nrrd": b"NRRD0004\n",
         "mha": b"ObjectType = Image\nNDims = 3\n",
         "dicom": b"\0" * 128 + b"DICM", "zip": b"PK\x03\x04"}


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("kind", list(READERS))
@FUZZ
@given(data=st.data())
def test_random_bytes(kind: str, data: st.DataObject) -> None:
    """Noise, with or without the format's magic number in front."""
    head = data.draw(st.sampled_from([b"", MAGIC[kind]]), label="head")
    blob = head + data.draw(st.binary(max_size=2048), label="body")
    if kind == "nii.gz" and data.draw(st.booleans(), label="gzip the noise"):
        blob = gzip.compress(blob)
    if kind == "dicom":  # one noise file among two valid slices would be skipped by GDCM: noise alone
        blob = [blob]  # type: ignore[assignment]
    _fuzz_one(kind, blob, label=data.draw(st.booleans(), label="read as label"))


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("kind", list(READERS))
@FUZZ
@given(data=st.data())
def test_truncated_files(kind: str, data: st.DataObject, seeds: dict) -> None:
    """A valid file cut at any offset (for gzip NIfTI: the stream, or the data before gzipping)."""
    seed = seeds[kind]
    if kind == "dicom":
        which = data.draw(st.integers(0, len(seed) - 1), label="file")
        files = list(seed)
        files[which] = files[which][: data.draw(st.integers(0, len(files[which]) - 1), label="cut")]
        _fuzz_one(kind, files)
        return
    if kind == "nii.gz" and data.draw(st.booleans(), label="cut before gzip"):
        raw = gzip.decompress(seed)
        _fuzz_one(kind, gzip.compress(raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]))
        return
    _fuzz_one(kind, seed[: data.draw(st.integers(0, len(seed) - 1), label="cut")])


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("kind", list(READERS))
@FUZZ
@given(data=st.data())
def test_tampered_headers(kind: str, data: st.DataObject, seeds: dict) -> None:
    """A valid file whose sizes, data type, spacing, offsets or encoding lie."""
    _fuzz_one(kind, data.draw(tampered(kind, seeds[kind]), label="file"),
              label=data.draw(st.booleans(), label="read as label"))


def test_memory_is_measured(tmp_path: Path) -> None:
    """The measurement itself: an allocation of twice the bound is seen by both counters."""
    def allocate() -> None:
        a = np.ones(2 * MEMORY_BOUND, dtype=np.uint8)  # touched: counts in the resident set too
        del a

    _, python_peak, rss_peak, _ = _measured(allocate)
    assert python_peak > 1.9 * MEMORY_BOUND and rss_peak > 1.9 * MEMORY_BOUND
    with pytest.raises(AssertionError, match="Python allocations peaked"):  # untouched, still counted
        _check(lambda: (np.zeros(2 * MEMORY_BOUND, np.uint8)[None, None, :1], None), "x")
    with pytest.raises(ValueError, match="not ours"):  # a foreign exception type is re-raised as is
        _check(lambda: (_ for _ in ()).throw(ValueError("not ours")), "x")


# ----------------------------------------------------------------------------- what the fuzzers found


def _zip_of(name: str, data: bytes) -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return bytearray(buf.getvalue())


def test_damaged_zips_are_a_422_not_a_crash(tmp_path: Path) -> None:
    """Damaged deflate data raised zlib.error, and a name flagged UTF-8 that is not raised
    UnicodeDecodeError, out of the zip step (a 500 from the server)."""
    damaged = _zip_of("a.dcm", bytes(range(256)) * 40)
    damaged[40:60] = b"\xff" * 20  # inside the deflated data
    bad_name = _zip_of("a.dcm", b"x" * 100)
    central = bad_name.find(b"PK\x01\x02")
    for header, name_at in ((0, 30), (central, central + 46)):  # local and central headers: UTF-8 flag
        struct.pack_into("<H", bad_name, header + (6 if header == 0 else 8), 0x800)
        bad_name[name_at] = 0xFF
    for i, raw in enumerate((damaged, bad_name)):
        (tmp_path / f"{i}.zip").write_bytes(raw)
        with pytest.raises(UploadError, match="cannot read the zip") as err:
            extract_dicom_zip(tmp_path / f"{i}.zip", tmp_path / f"out{i}", ZIP_LIMIT)
        assert err.value.status == 422 and not (tmp_path / f"out{i}").exists()
