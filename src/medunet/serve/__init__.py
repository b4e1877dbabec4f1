"""``medunet serve``: a REST API and a web page to segment uploaded images with one model.

Example:
    >>> from medunet.serve import create_app               # doctest: +SKIP
    >>> app = create_app(Predictor.load("model_dir"))      # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from medunet.errors import InputError

__all__ = ["create_app", "run"]


def create_app(predictor, **kwargs):
    """Build the FastAPI app around a loaded Predictor (see :func:`medunet.serve.app.create_app`)."""
    from medunet.serve.app import create_app as _create_app

    return _create_app(predictor, **kwargs)


def run(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
        max_upload_mb: float = 512, queue_size: int = 8, device: str | None = None,
        precision: str | None = None, checkpoint: str = "best", log_level: str = "info", *,
        tmp_dir: str | Path | None = None, upload_timeout: float = 120.0, job_timeout: float = 600.0,
        token: str | None = None, max_voxels: int | None = None, backend: str = "torch") -> None:
    """Load the model once and serve the API and the page with uvicorn until interrupted.

    ``workers`` are prediction threads sharing the one model (not processes, which would each
    load it); ``queue_size`` requests may wait beyond them before the server answers 503.
    ``max_voxels`` sets the largest image (voxels x channels) this process reads (default
    :data:`medunet.io.MAX_VOXELS`). ``backend`` is :meth:`Predictor.load`'s (``onnx`` and
    ``openvino`` export the model first where it has no up-to-date export). Listening beyond this
    machine without a ``token`` prints a warning on stderr. The other options are
    :func:`medunet.serve.app.create_app`'s.
    """
    import logging
    import sys

    import uvicorn

    from medunet.inference import Predictor
    from medunet.inference.predictor import EXPORT_BACKENDS, check_backend
    from medunet.io.image import set_max_voxels
    from medunet.serve.auth import RedactTokenFilter, check_token, exposure_warning

    if not 0 < port < 65536:
        raise InputError(f"port {port} is out of range", fix="use 1..65535")
    token = check_token(token)
    if max_voxels is not None:
        set_max_voxels(max_voxels)
    check_backend(backend, precision)
    if backend in EXPORT_BACKENDS:
        from medunet.export import ensure_onnx_all

        ensure_onnx_all(model_dir, checkpoint)
    predictor = Predictor.load(model_dir, checkpoint=checkpoint, device=device, precision=precision,
                               backend=backend)
    app = create_app(predictor, workers=workers, queue_size=queue_size, max_upload_mb=max_upload_mb,
                     tmp_dir=tmp_dir, upload_timeout=upload_timeout, job_timeout=job_timeout, token=token)
    warning = exposure_warning(host, token)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    access = logging.getLogger("uvicorn.access")  # uvicorn's logging set-up keeps a logger's filters
    if not any(isinstance(f, RedactTokenFilter) for f in access.filters):
        access.addFilter(RedactTokenFilter())
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
