"""How does ``medunet serve`` hold up under concurrent clients? Prints JSON.

    .venv/bin/python bench/serve_load.py [--requests 200] [--clients 8] [--size 64]
                                         [--workers 1] [--queue-size 8] [--out result.json]

Trains a tiny 2D model on synthetic ``--size`` x ``--size`` images (a few seconds), starts the
real server (``python -m medunet.cli serve``, a separate process, as a user runs it) on a free
loopback port, then sends ``--requests`` uploads from ``--clients`` concurrent clients (threads,
each with its own keep-alive connection) and reports the status codes, latency percentiles and
throughput. A second phase repeats it against a server whose queue is smaller than the number of
clients, to show that overload is answered quickly with 503 + Retry-After instead of piling up.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: Path, workers: int, queue_size: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "medunet.cli", "serve", str(model), "--port", str(port),
           "--workers", str(workers), "--queue-size", str(queue_size)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not start in 120 s")


def _load(url: str, uploads: list[tuple[str, bytes]], n_requests: int, n_clients: int) -> dict:
    """``n_requests`` POSTs shared by ``n_clients`` threads; latencies and status counts."""
    import httpx

    counter = iter(range(n_requests))
    lock = threading.Lock()
    records: list[tuple[int, float, float]] = []  # status, latency, server inference seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = uploads[i % len(uploads)]
                t0 = time.perf_counter()
                try:
                    r = http.post("/api/segment", files={"file": (name, data, "image/png")},
                                  data={"format": "png"})
                    status = r.status_code
                    inf = (json.loads(r.headers["x-medunet-stats"])["inference_seconds"]
                           if status == 200 else 0.0)
                except httpx.HTTPError:
                    status, inf = -1, 0.0
                with lock:
                    records.append((status, time.perf_counter() - t0, inf))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    status = np.array([r[0] for r in records])
    lat = np.array([r[1] for r in records])
    ok = status == 200
    counts = {str(s): int((status == s).sum()) for s in sorted(set(status.tolist()))}

    def pct(x: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(x, q)) * 1000, 1) if x.size else None

    return {
        "requests": len(records),
        "clients": n_clients,
        "status_counts": counts,
        "errors": int((~ok).sum()),
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(records) / wall, 2),
        "ok_throughput_rps": round(int(ok.sum()) / wall, 2),
        "latency_ms_ok": {"p50": pct(lat[ok], 50), "p95": pct(lat[ok], 95), "p99": pct(lat[ok], 99),
                          "max": pct(lat[ok], 100)},
        "latency_ms_rejected": {"p50": pct(lat[~ok], 50), "max": pct(lat[~ok], 100)},
        "server_inference_ms_mean": round(
            float(np.mean([r[2] for r in records if r[0] == 200] or [0])) * 1000, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=1, help="server prediction threads")
    ap.add_argument("--queue-size", type=int, default=8, help="server queue for the main phase")
    ap.add_argument("--overload-queue-size", type=int, default=2, help="server queue for the overload phase")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and model (default: temporary)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    from PIL import Image

    from medunet.datasets.synthetic import make_synthetic_dataset
    from medunet.training import train

    info = machine()
    tmp = tempfile.TemporaryDirectory(prefix="medunet-serve-load-")
    work = args.work or Path(tmp.name)
    data, model = work / "data", work / "model"
    t0 = time.perf_counter()
    make_synthetic_dataset(data, n_train=8, n_test=8, shape=(args.size, args.size), seed=0)
    train(data, model, epochs=2, overrides={"training.iterations_per_epoch": 5}, progress=False)
    train_s = time.perf_counter() - t0
    uploads = []
    for p in sorted((data / "imagesTs").glob("*.png")):
        buf = io.BytesIO()
        Image.open(p).save(buf, format="PNG")
        uploads.append((p.name, buf.getvalue()))

    phases = {}
    for name, queue in (("main", args.queue_size), ("overload", args.overload_queue_size)):
        log = work / f"server_{name}.log"
        proc, url = _start_server(model, args.workers, queue, log)
        try:
            _load(url, uploads, 8, 2)  # warm-up: first calls pay for lazy imports and allocations
            res = _load(url, uploads, args.requests, args.clients)
            res["server"] = {"workers": args.workers, "queue_size": queue}
            phases[name] = res
        finally:
            proc.terminate()
            proc.wait(30)
    info["loadavg_end"] = os.getloadavg()
    emit({"benchmark": "serve_load", "machine": info, "image": [args.size, args.size],
          "train_s": round(train_s, 1), "phases": phases}, args.out)
    tmp.cleanup()


if __name__ == "__main__":
    main()
