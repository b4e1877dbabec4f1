"""Receive one uploaded image safely: streamed to a server-named file, size-capped, typed by suffix.

The multipart body is parsed here (not by Starlette's form parser) so that the file goes
straight into the request's own temporary directory under a name the server chooses, and so
that an upload over the limit is refused as soon as it crosses it, not after it was stored.
The limit counts every byte of the body as it arrives (the file, other parts, part headers,
bytes after the closing boundary), not only the file, so no part of a body is unbounded.
"""

from __future__ import annotations

import lzma
import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import ClientDisconnect, Request

# suffixes accepted from the client's file name; longest first so ".nii.gz" wins over ".gz"
ACCEPTED_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff",
                     ".nrrd", ".mha", ".zip")
MAX_FIELDS = 16
MAX_FIELD_BYTES = 1024
MAX_PARTS = 32  # the file, the form fields and a few ignored parts
MAX_PART_HEADER_BYTES = 8 * 1024  # all header lines of one part together
MULTIPART_SLACK = 64 * 1024  # boundaries, part headers and the small form fields
ZIP_EXPANSION = 4  # a DICOM zip may expand to this many times the upload limit
ZIP_MAX_MEMBERS = 20_000


class UploadError(Exception):
    """A request the server refuses, with the HTTP status and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """The stored upload: its server-chosen path, the client's (display-only) name, the form fields."""

    path: Path
    filename: str
    suffix: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """A safe case name from the client's file name (for responses only, never for paths)."""
        return safe_stem(self.filename, self.suffix)


def accepted_suffix(filename: str) -> str | None:
    """The whitelisted suffix the client's file name ends with, or None."""
    low = filename.lower()
    return next((s for s in ACCEPTED_SUFFIXES if low.endswith(s)), None)


def safe_stem(filename: str, suffix: str | None = None) -> str:
    """ASCII letters, digits, ``-_.`` only, at most 64 characters; ``image`` when nothing is left."""
    name = Path(filename.replace("\\", "/")).name
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:64]
    return name or "image"


def sniff_suffix(path: Path) -> str | None:
    """Guess the format of a file sent without a suffix from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return ".tif"
    if head.startswith(b"BM"):
        return ".bmp"
    if head.startswith(b"\x1f\x8b"):
        return ".nii.gz"
    if head[344:348] in (b"n+1\x00", b"n+2\x00"):
        return ".nii"
    if head.startswith(b"NRRD"):
        return ".nrrd"
    if head.startswith(b"ObjectType"):
        return ".mha"
    if head.startswith(b"PK\x03\x04"):
        return ".zip"
    return None


def _unsupported(name: str) -> UploadError:
    return UploadError(415, f"unsupported file type '{name}': upload one of {', '.join(ACCEPTED_SUFFIXES)} "
                            "(a .zip holds one DICOM series)")


async def receive_upload(request: Request, directory: Path, max_bytes: int,
                         file_field: str = "file") -> Upload:
    """Stream the multipart body; the file in ``file_field`` goes to ``directory/upload<suffix>``.

    The whole body may hold ``max_bytes`` plus :data:`MULTIPART_SLACK` bytes; reading stops at
    the first byte beyond. Raises :class:`UploadError` with 413 (over the limit), 415 (not
    multipart, or a file type outside the whitelist) or 422 (no file, malformed body).
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, f"send multipart/form-data with the image in the field '{file_field}'")
    body_limit = max_bytes + MULTIPART_SLACK
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > body_limit:
        raise UploadError(413, _too_large(max_bytes))

    state: dict = {"headers": {}, "name": "", "kind": None, "buf": bytearray(), "header": b"", "value": b"",
                   "parts": 0, "header_bytes": 0}
    fields: dict[str, str] = {}
    stored: dict = {}

    def on_part_begin() -> None:
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise UploadError(422, f"the form has more than {MAX_PARTS} parts: "
                                   "send the file and its options only")
        state.update(headers={}, name="", kind=None, buf=bytearray(), header_bytes=0)

    def _count_header(n: int) -> None:
        state["header_bytes"] += n
        if state["header_bytes"] > MAX_PART_HEADER_BYTES:
            raise UploadError(422, f"a form part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        _count_header(end - start)
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        _count_header(end - start)
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header"].lower()] = state["value"]
        state["header"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if b"filename" not in opts:
            if len(fields) >= MAX_FIELDS:
                raise UploadError(422, "too many form fields")
            state["kind"] = "field"
            return
        if name != file_field:
            state["kind"] = "skip"  # another file field: read past it, store nothing
            return
        if stored:
            raise UploadError(422, f"send one file in the field '{file_field}'")
        filename = opts[b"filename"].decode("utf-8", "replace")
        suffix = accepted_suffix(filename)
        if suffix is None and "." in Path(filename.replace("\\", "/")).name:
            raise _unsupported(Path(filename).name[-40:])
        path = directory / f"upload{suffix or '.bin'}"
        stored.update(path=path, filename=filename, suffix=suffix, size=0, fh=open(path, "xb"))  # noqa: SIM115
        state["kind"] = "file"

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["kind"] == "file":
            stored["size"] += end - start
            if stored["size"] > max_bytes:
                raise UploadError(413, _too_large(max_bytes))
            stored["fh"].write(data[start:end])
        elif state["kind"] == "field":
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FIELD_BYTES:
                raise UploadError(422, f"form field '{state['name'][:40]}' is too long")

    def on_part_end() -> None:
        if state["kind"] == "field":
            fields[state["name"]] = state["buf"].decode("utf-8", "replace")
        elif state["kind"] == "file":
            stored["fh"].close()
            stored["complete"] = True

    callbacks = {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
                 "on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_headers_finished": on_headers_finished}
    parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:  # every byte counts: other parts, padding, data after the end
                raise UploadError(413, _too_large(max_bytes))
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect as exc:
        raise UploadError(400, "the upload was interrupted") from exc
    except FormParserError as exc:
        raise UploadError(422, f"malformed multipart body ({exc})".replace("\n", " ")[:300]) from exc
    finally:
        if "fh" in stored:
            stored["fh"].close()
    if not stored:
        raise UploadError(422, f"no file in the form field '{file_field}'")
    if not stored.get("complete"):
        raise UploadError(422, "the upload ended before the file did")
    if stored["size"] == 0:
        raise UploadError(422, f"the file '{safe_stem(stored['filename'])}' is empty")
    suffix = stored["suffix"]
    path = stored["path"]
    if suffix is None:  # a name without a suffix (e.g. a pasted blob): look at the bytes
        suffix = sniff_suffix(path)
        if suffix is None:
            raise _unsupported(Path(stored["filename"]).name[-40:] or "(no name)")
        path = path.rename(directory / f"upload{suffix}")
    return Upload(path=path, filename=stored["filename"], suffix=suffix, size=stored["size"], fields=fields)


def _too_large(max_bytes: int) -> str:
    return (f"the upload is larger than the server's limit of {max_bytes / 2**20:g} MB "
            "(start the server with a larger --max-upload-mb)")


def extract_dicom_zip(zip_path: Path, out_dir: Path, max_bytes: int) -> Path:
    """Extract a zip's files into ``out_dir`` as ``00000.dcm``, ``00001.dcm``, ...

    Member names are never used as paths (no zip-slip); the uncompressed total is capped at
    ``max_bytes`` while copying (declared sizes can lie), so a zip bomb stops early.
    """
    out_dir.mkdir()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and not _junk(m.filename)]
            if not members:
                raise UploadError(422, "the zip holds no files: zip the .dcm files of one series")
            if len(members) > ZIP_MAX_MEMBERS:
                raise UploadError(413, f"the zip holds more than {ZIP_MAX_MEMBERS} files")
            if sum(m.file_size for m in members) > max_bytes:
                raise UploadError(413, f"the zip expands to more than {max_bytes / 2**20:g} MB")
            total = 0
            for i, m in enumerate(members):
                with zf.open(m) as src, open(out_dir / f"{i:05d}.dcm", "xb") as dst:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise UploadError(413, f"the zip expands to more than {max_bytes / 2**20:g} MB")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError,
            OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        # damaged deflate data (zlib.error), a non-UTF-8 name flagged as UTF-8 (ValueError): found by
        # tests/test_fuzz.py; they were 500s
        shutil.rmtree(out_dir, ignore_errors=True)
        raise UploadError(422, f"cannot read the zip ({type(exc).__name__}: {exc})") from exc
    return out_dir


def _junk(name: str) -> bool:
    """macOS resource forks, hidden files and DICOMDIR indexes are not slices."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.startswith(".") or base.upper() == "DICOMDIR"
