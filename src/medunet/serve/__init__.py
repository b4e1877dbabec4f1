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
        precision: str | None = None, checkpoint: str = "best", log_level: str = "info") -> None:
    """Load the model once and serve the API and the page with uvicorn until interrupted.

    ``workers`` are prediction threads sharing the one model (not processes, which would each
    load it); ``queue_size`` requests may wait beyond them before the server answers 503.
    """
    import uvicorn

    from medunet.inference import Predictor

    if not 0 < port < 65536:
        raise InputError(f"port {port} is out of range", fix="use 1..65535")
    predictor = Predictor.load(model_dir, checkpoint=checkpoint, device=device, precision=precision)
    app = create_app(predictor, workers=workers, queue_size=queue_size, max_upload_mb=max_upload_mb)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
