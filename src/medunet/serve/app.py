"""The FastAPI app behind ``medunet serve``: a REST API and a static page around one loaded model.

The model is loaded once. Each request takes a slot in a :class:`JobGate` (running plus
waiting jobs are bounded, so a burst cannot exhaust memory or disk: over the bound the answer
is 503 with ``Retry-After``), streams its upload into a fresh temporary directory, and hands
the heavy work to a small thread pool. The directory is removed when the job ends, whatever
happened. A slot is never held for ever: the upload must arrive within ``upload_timeout``
seconds (408, so slow senders cannot lock everyone out) and the job must finish within
``job_timeout`` seconds (504; the worker thread stops at its next window, see
:mod:`medunet.serve.deadline`). With a ``token``, the API and the page need it (401 without).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

from medunet.errors import InputError
from medunet.inference.predictor import TTA_MODES
from medunet.serve.auth import TOKEN_QUERY, check_token, token_matches
from medunet.serve.deadline import JobCancelled, JobControl, with_deadline_checks
from medunet.serve.segment import OUTPUT_FORMATS, SegmentResult, class_colour, run_segmentation
from medunet.serve.uploads import ACCEPTED_SUFFIXES, UploadError, receive_upload
from medunet.serve.workdirs import make_work_dir, remove_stale_work_dirs, tmp_root

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("medunet.serve")

API_DESCRIPTION = """
Segment medical images with one trained medunet model.

* `GET /health`: liveness and queue occupancy.
* `GET /api/model`: what the model expects (dimension, channels) and predicts (labels, colours),
  and a summary of its plan.
* `POST /api/segment`: upload one image (multipart field `file`) and get its label map.

**Accepted files**: PNG, JPG, BMP, TIFF, NIfTI (`.nii`, `.nii.gz`), NRRD, MHA, or a `.zip` holding
the slice files of one DICOM series. The type is taken from the file name's suffix (or, for a
name without one, from the file's first bytes).

**Options** (form fields): `tta` = `none` | `flip` (average over mirrored copies) | `full` (mirrors
and small rotations);
`format` = `json` (default) | `png` | `nifti`; `view` = `true` to add PNG slices for a viewer.

**Responses of `POST /api/segment`**:

* `format=json`: `{"stats": STATS, "mask": {"filename", "media_type", "encoding": "base64", "data"},
  "view": VIEW}` (`view` only when asked for). The mask file is a PNG for 2D pictures and a NIfTI
  (`.nii.gz`, in the input's geometry) for volumes and for anything read from NIfTI/NRRD/MHA/DICOM.
* `format=png` (2D models) or `format=nifti`: the mask file itself, with `STATS` as compact JSON in
  the `X-Medunet-Stats` header and the file name in `Content-Disposition`.

Mask files hold the dataset's raw label values. `STATS` is `{"case", "dimension", "shape",
"spacing", "measure": "area"|"volume", "unit": "mm^3"|"px^2"|..., "voxel_size", "tta",
"classes": [{"index", "value", "name", "color", "voxels", "fraction", "area"|"volume"}],
"inference_seconds", "total_seconds"}`: areas/volumes are voxel counts times the product of the
voxel spacing (millimetres for medical formats, pixels for pictures).

**Access**: a server started with `--token` wants `Authorization: Bearer <token>` on `/api/*`
(the page: open `/?token=<token>`); `/health`, `/static/*` and these docs stay open.

**Limits**: the whole request body (the file, other parts, everything) may hold the upload
limit plus 64 KiB; the upload must arrive within the server's `--upload-timeout` and the
segmentation finish within its `--job-timeout`; images may hold at most `max_voxels` values
(see `GET /api/model`).

**Errors** are `{"detail": "message"}`: 401 missing or wrong token, 408 upload too slow,
413 upload too large, 415 unsupported file type, 422 unreadable image or one that does not fit
the model (channels, dimension, size) or a bad option, 503 server busy (retry after the
`Retry-After` header's seconds), 504 segmentation over the time limit.
"""

_SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": f"the image: {', '.join(ACCEPTED_SUFFIXES)}"},
                "tta": {"type": "string", "enum": list(TTA_MODES), "default": "none"},
                "format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "json"},
                "view": {"type": "boolean", "default": False,
                         "description": "add PNG slices of the image and the coloured mask (for the page)"},
            },
        }}},
    }
}
_ERROR = {"content": {"application/json": {"example": {"detail": "message"}}}}
_SEGMENT_RESPONSES: dict = {
    200: {"description": "the mask and its statistics (shape depends on `format`, see above)",
          "content": {"application/json": {}, "image/png": {}, "application/gzip": {}}},
    401: {"description": "the server wants a token and none or a wrong one was sent", **_ERROR},
    408: {"description": "the upload did not arrive within the server's upload time limit", **_ERROR},
    413: {"description": "the request body (or the unpacked zip) is over the size limit", **_ERROR},
    415: {"description": "not a supported file type", **_ERROR},
    422: {"description": "unreadable image, wrong channels or dimension, or a bad option", **_ERROR},
    503: {"description": "too many requests in progress; see Retry-After", **_ERROR},
    504: {"description": "the segmentation took longer than the server's time limit per job", **_ERROR},
}
_PAGE_HEADERS = {"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}
_NO_TOKEN = ("missing or wrong access token: send the header 'Authorization: Bearer <token>' with the "
             "token the server was started with (--token)")
_PAGE_NO_TOKEN = (f"this medunet server needs its access token: open /?{TOKEN_QUERY}=<token> with the token "
                  "it was started with (--token)\n")


def _upload_too_slow(seconds: float) -> str:
    return (f"the upload did not arrive within the server's limit of {seconds:g} s (a slow or stalled "
            "connection): send it again, or start the server with a larger --upload-timeout")


def _job_too_slow(seconds: float) -> str:
    return (f"the segmentation took longer than the server's limit of {seconds:g} s: try tta=none or a "
            "smaller image, or start the server with a larger --job-timeout")


class _Slot:
    """One request's place in the gate, released exactly once (by the job's end or by a timeout)."""

    def __init__(self, gate: JobGate) -> None:
        self._gate = gate
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._gate.release()


class JobGate:
    """Admission control: at most ``workers`` running and ``queue_size`` waiting requests.

    A request holds its slot from before its upload is read until its job has finished, so
    uploads in progress count too (they hold disk space). The Retry-After estimate comes from a
    running mean of job times.
    """

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.capacity = workers + queue_size
        self._lock = threading.Lock()
        self._count = 0
        self._mean_seconds = 1.0
        self.completed = 0

    def try_acquire(self) -> bool:
        with self._lock:
            if self._count >= self.capacity:
                return False
            self._count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._count = max(0, self._count - 1)

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._mean_seconds = seconds if self.completed == 0 else 0.8 * self._mean_seconds + 0.2 * seconds
            self.completed += 1

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead divided among the workers."""
        with self._lock:
            ahead = max(1, self._count - self.workers + 1)
            return max(1, math.ceil(self._mean_seconds * ahead / self.workers))

    def snapshot(self) -> dict:
        with self._lock:
            return {"in_progress": self._count, "workers": self.workers, "queue_size": self.queue_size,
                    "capacity": self.capacity, "completed": self.completed}


def create_app(predictor, *, workers: int = 1, queue_size: int = 8, max_upload_mb: float = 512,
               tmp_dir: str | Path | None = None, upload_timeout: float = 120.0, job_timeout: float = 600.0,
               token: str | None = None) -> FastAPI:
    """Build the app around a loaded :class:`~medunet.inference.Predictor`.

    Args:
        predictor: the model, loaded once and shared by all requests.
        workers: prediction threads (1 is best on a CPU: one prediction already uses every core).
        queue_size: requests allowed to wait beyond the running ones; more get 503.
        max_upload_mb: largest accepted upload (a DICOM zip may unpack to 4 times this); the
            whole request body may hold this plus 64 KiB.
        tmp_dir: where the per-request temporary directories go (default: the system's);
            folders there that a crashed server left behind are removed now.
        upload_timeout: seconds a request may take to send its whole body (408 after).
        job_timeout: seconds from the end of the upload to the answer (504 after).
        token: when given, ``Authorization: Bearer <token>`` is required on the API and the page.
    """
    if workers < 1 or queue_size < 0 or max_upload_mb <= 0:
        raise InputError("workers must be >= 1, queue size >= 0 and the upload limit > 0")
    if not (math.isfinite(upload_timeout) and upload_timeout > 0 and math.isfinite(job_timeout)
            and job_timeout > 0):
        raise InputError(f"time limits must be positive seconds (upload {upload_timeout}, job {job_timeout})",
                         fix="e.g. --upload-timeout 120 --job-timeout 600")
    token = check_token(token)
    root = tmp_root(tmp_dir)
    remove_stale_work_dirs(root)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medunet-predict")
    gate = JobGate(workers, queue_size)
    max_bytes = int(max_upload_mb * 2**20)
    served = with_deadline_checks(predictor)  # same model, backends that honour the job deadline
    bearer = HTTPBearer(auto_error=False, description="the token given to `medunet serve --token`")

    async def require_token(request: Request, _scheme=Security(bearer)) -> None:
        """401 unless the request carries the token (only installed when there is one)."""
        if token is not None and not token_matches(token, request.headers.get("authorization")):
            raise HTTPException(401, _NO_TOKEN, headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_token)] if token is not None else []

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="medunet", version=_version(), description=API_DESCRIPTION, lifespan=lifespan)
    app.state.predictor = predictor
    app.state.gate = gate
    app.state.executor = executor
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        # a browser cannot add a header when it opens a page: the page takes ?token= (app.js
        # then sends the header on its API calls)
        if token is not None and not token_matches(token, request.headers.get("authorization"),
                                                   request.query_params.get(TOKEN_QUERY)):
            return PlainTextResponse(_PAGE_NO_TOKEN, status_code=401,
                                     headers={"WWW-Authenticate": "Bearer", **_PAGE_HEADERS})
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    @app.get("/health", summary="Liveness and queue occupancy")
    async def health() -> dict:
        # open for liveness probes; the model's name only when the server is open anyway
        info: dict = {"status": "ok", "queue": gate.snapshot()}
        if token is None:
            info["model"] = predictor.plan.dataset_name
        return info

    @app.get("/api/model", summary="What the model expects and predicts", dependencies=guarded)
    async def model_info() -> dict:
        return describe_model(predictor, max_bytes, upload_timeout=upload_timeout, job_timeout=job_timeout)

    @app.post("/api/segment", summary="Segment one uploaded image", openapi_extra=_SEGMENT_BODY,
              responses=_SEGMENT_RESPONSES, response_class=Response, dependencies=guarded)
    async def segment(request: Request) -> Response:
        """Upload an image in the form field `file`; see the API description for the response shapes."""
        if not gate.try_acquire():
            raise HTTPException(503, "the server is busy: too many images in progress; try again shortly",
                                headers={"Retry-After": str(gate.retry_after())})
        slot = _Slot(gate)
        work = make_work_dir(root)
        handed_over = False
        control: JobControl | None = None
        try:
            try:
                upload = await asyncio.wait_for(receive_upload(request, work, max_bytes), upload_timeout)
            except asyncio.TimeoutError as exc:
                raise UploadError(408, _upload_too_slow(upload_timeout)) from exc
            tta, out_format, view = _options(upload.fields)
            control = JobControl(job_timeout)

            def job() -> SegmentResult:
                assert control is not None
                t0 = time.perf_counter()
                try:
                    with control.active():
                        return run_segmentation(served, upload, work, tta=tta, out_format=out_format,
                                                view=view, max_bytes=max_bytes)
                finally:
                    gate.observe(time.perf_counter() - t0)

            future = executor.submit(job)
            handed_over = True  # from here the job's end frees the slot and the directory
            future.add_done_callback(lambda _f: _finish(work, slot))
            try:  # a job still waiting for a worker at the deadline is cancelled by wait_for
                result = await asyncio.wait_for(asyncio.wrap_future(future), job_timeout)
            except asyncio.TimeoutError as exc:
                raise JobCancelled from exc
        except UploadError as exc:
            raise HTTPException(exc.status, exc.message) from exc
        except JobCancelled as exc:
            if control is not None:
                control.cancel()  # the worker stops at its next window; its folder goes then
            slot.release()  # the time is up: the slot is free now, not when the thread notices
            raise HTTPException(504, _job_too_slow(job_timeout)) from exc
        except InputError as exc:
            raise HTTPException(422, str(exc)) from exc
        except HTTPException:
            raise
        except Exception as exc:  # a bug: log it, answer without a traceback
            log.exception("segmentation failed")
            raise HTTPException(500, f"internal error while segmenting ({type(exc).__name__}); "
                                     "see the server log") from exc
        finally:
            if not handed_over:
                _finish(work, slot)
        return _response(result, out_format)

    return app


def _finish(work: Path, slot: _Slot, _future: Future | None = None) -> None:
    shutil.rmtree(work, ignore_errors=True)
    slot.release()


def _options(fields: dict[str, str]) -> tuple[str, str, bool]:
    """Validate the form options; a bad one is a 422 that names the allowed values."""
    tta = fields.get("tta", "none").strip().lower() or "none"
    out_format = fields.get("format", "json").strip().lower() or "json"
    view = fields.get("view", "false").strip().lower()
    if tta not in TTA_MODES:
        raise UploadError(422, f"unknown tta '{tta[:20]}': use {' or '.join(TTA_MODES)}")
    if out_format not in OUTPUT_FORMATS:
        raise UploadError(422, f"unknown format '{out_format[:20]}': use {', '.join(OUTPUT_FORMATS)}")
    if view not in ("true", "false", "1", "0", "yes", "no", ""):
        raise UploadError(422, f"view must be true or false, not '{view[:20]}'")
    return tta, out_format, view in ("true", "1", "yes")


def _response(result: SegmentResult, out_format: str) -> Response:
    if out_format == "json":
        import base64

        body: dict = {"stats": result.stats,
                      "mask": {"filename": result.mask_filename, "media_type": result.media_type,
                               "encoding": "base64", "data": base64.b64encode(result.mask).decode("ascii")}}
        if result.view is not None:
            body["view"] = result.view
        return JSONResponse(body)
    return Response(result.mask, media_type=result.media_type, headers={
        "X-Medunet-Stats": json.dumps(result.stats, separators=(",", ":")),
        "Content-Disposition": f'attachment; filename="{result.mask_filename}"',
    })


def describe_model(predictor, max_bytes: int, *, upload_timeout: float | None = None,
                   job_timeout: float | None = None) -> dict:
    """The model's contract for clients: inputs, labels (with the page's colours), plan summary
    and the server's limits."""
    from medunet.io.image import max_voxels

    plan = predictor.plan
    return {
        "name": plan.dataset_name,
        "dimension": plan.dim,
        "input_channels": plan.in_channels,
        "channel_names": list(plan.channel_names),
        "labels": [{"index": i, "value": int(v), "name": str(n), "color": class_colour(i)}
                   for i, (v, n) in enumerate(zip(plan.label_values, plan.label_names, strict=False))],
        "plan": {
            "patch_size": list(plan.patch_size),
            "spacing": list(plan.spacing),
            "normalization": [n.get("scheme", "?") for n in plan.normalization],
            "network": plan.network.get("preset", "default"),
        },
        "device": str(getattr(predictor, "device", "cpu")),
        "precision": getattr(predictor, "precision", "fp32"),
        "tta_modes": list(TTA_MODES),
        "formats": list(OUTPUT_FORMATS),
        "accepted_suffixes": list(ACCEPTED_SUFFIXES),
        "max_upload_mb": round(max_bytes / 2**20, 3),
        "max_voxels": max_voxels(),
        "upload_timeout_s": upload_timeout,
        "job_timeout_s": job_timeout,
    }


def _version() -> str:
    from medunet import __version__

    return __version__
