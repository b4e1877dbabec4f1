"""medunet serve under hostile or careless clients (issue 17): every byte of a body counts
against the limit, slow uploads and long jobs cannot hold a slot for ever, stale temporary
folders (patient images) are removed at start-up, an optional bearer token guards the API and
the page, the voxel limit is a server option, and 1,000 malformed requests leave memory flat.

No trained model is needed: a plan is derived from a tiny generated dataset and the networks
are stand-ins whose outputs or timing the tests control.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import gzip
import io
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medunet.errors import InputError
from medunet.inference import Predictor
from medunet.inference.backends import TorchBackend
from medunet.serve import create_app
from medunet.serve.auth import RedactTokenFilter, exposure_warning, is_loopback
from medunet.serve.uploads import MULTIPART_SLACK
from medunet.serve.workdirs import process_start_time
from test_serve import CHROMIUM, CHROMIUM_ARGS, ThresholdNet, _BlockingPredictor, live_server, needs_browser

TestClient = pytest.importorskip("fastapi.testclient").TestClient
BOUNDARY = "hardeningboundary"
TOKEN = "s3cret-Token_for.tests"


# ---------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """A real 2D plan (one grey channel, background + one class), planned in well under a second."""
    from medunet.datasets import find_dataset, validate_dataset
    from medunet.datasets.synthetic import make_synthetic_dataset
    from medunet.planning import fingerprint_dataset, make_plan

    data = make_synthetic_dataset(tmp_path_factory.mktemp("plan") / "data", n_train=4, n_test=1,
                                  shape=(32, 32))
    dataset = find_dataset(data)
    p = make_plan(dataset, fingerprint_dataset(dataset, validate_dataset(dataset)))
    return dataclasses.replace(p, patch_size=[32, 32], batch_size=1)


@pytest.fixture(scope="module")
def thr2d(plan) -> Predictor:
    return Predictor(plan, [ThresholdNet()], torch.device("cpu"), "fp32")


def _png(shape=(48, 40), seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(20, 60, shape).astype(np.uint8)
    img[10:30, 8:20] = 220
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"


def _body(*parts: bytes, epilogue: bytes = b"") -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode() + epilogue


def _chunked(body: bytes, size: int = 16384):
    """The body as a generator: sent without Content-Length, so only the streaming count sees it."""
    def gen():
        for i in range(0, len(body), size):
            yield body[i:i + size]
    return gen()


def _post_raw(client, body, headers: dict | None = None):
    h = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})}
    return client.post("/api/segment", content=body, headers=h)


def _detail(r) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail  # one line
    return detail


def _empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _recv_until(sock: socket.socket, marker: bytes, seconds: float = 10) -> bytes:
    """What the server sends on a raw connection, until ``marker`` arrives or it closes."""
    sock.settimeout(seconds)
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _rss_bytes() -> int:
    """Resident memory of this process from /proc (no psutil): pages x page size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------ 1. body limit


@pytest.mark.parametrize("case", ["extra_file_part", "after_closing_boundary", "several_ignored_parts"])
def test_body_limit_counts_every_byte(thr2d, tmp_path, case):
    """Bytes outside the `file` part used to pass unbounded; now the whole body is capped."""
    work = tmp_path / "work"
    client = TestClient(create_app(thr2d, tmp_dir=work, max_upload_mb=0.05))  # 50 kB + 64 kB slack
    limit = int(0.05 * 2**20) + MULTIPART_SLACK
    png = _png()
    file_part = _part("file", png, "a.png")
    if case == "extra_file_part":
        body = _body(file_part, _part("other", b"\0" * 2 * limit, "junk.bin"))
    elif case == "after_closing_boundary":
        body = _body(file_part, epilogue=b"x" * 2 * limit)
    else:  # each part is small and there are fewer than MAX_PARTS, but together they are not small
        body = _body(file_part, *[_part(f"x{i}", b"\0" * (limit // 10), "x.bin") for i in range(20)])
    r = _post_raw(client, _chunked(body))
    assert r.status_code == 413, r.text
    assert "--max-upload-mb" in _detail(r)
    assert _empty(work)

    # the same image with small extras is still accepted: the limit is on size, not on shape
    small = _body(file_part, _part("other", b"\0" * 1000, "junk.bin"), epilogue=b"x" * 1000)
    r = _post_raw(client, _chunked(small))
    assert r.status_code == 200, r.text
    assert _empty(work)


def test_part_count_and_header_size_are_bounded(thr2d, tmp_path):
    client = TestClient(create_app(thr2d, tmp_dir=tmp_path / "w"))
    many = _body(*[_part(f"x{i}", b"", "f.bin") for i in range(40)], _part("file", _png(), "a.png"))
    r = _post_raw(client, many)
    assert r.status_code == 422 and "parts" in _detail(r)
    # three lines each under python-multipart's own 4 kB line limit, together over 8 kB
    padding = "".join(f"X-Pad-{i}: {'y' * 3000}\r\n" for i in range(3))
    long_header = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                   f"{padding}\r\n").encode() + _png() + b"\r\n"
    r = _post_raw(client, _body(long_header))
    assert r.status_code == 422 and "headers are longer" in _detail(r)


# ------------------------------------------------------------------------------- 2. time limits


def test_slow_uploads_time_out_and_free_their_slots(thr2d, tmp_path):
    """Slow-loris: clients that start an upload and stall get 408 after --upload-timeout, and a
    normal client is served again (before, the stalled ones held every slot for ever)."""
    import httpx

    work = tmp_path / "work"
    app = create_app(thr2d, tmp_dir=work, workers=1, queue_size=1, upload_timeout=2.0)
    stalled: list[socket.socket] = []
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        try:
            for _ in range(2):  # the gate's capacity: 1 worker + 1 waiting
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall((f"POST /api/segment HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n"
                           f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
                          + _part("file", b"\x89PNG" + b"\0" * 200, "a.png")[:150])
                stalled.append(s)
            assert _wait_for(lambda: httpx.get(f"{url}/health").json()["queue"]["in_progress"] == 2, 5)
            files = {"file": ("ok.png", _png(), "image/png")}
            busy = httpx.post(f"{url}/api/segment", files=files, timeout=10)
            assert busy.status_code == 503  # the stalled uploads hold both slots ...

            t0 = time.monotonic()
            for s in stalled:  # ... until their deadline: then each gets a 408
                reply = _recv_until(s, b"--upload-timeout")
                assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
                assert b"--upload-timeout" in reply
            assert time.monotonic() - t0 < 6
            assert _wait_for(lambda: httpx.get(f"{url}/health").json()["queue"]["in_progress"] == 0, 5)
            ok = httpx.post(f"{url}/api/segment", files=files, timeout=30)
            assert ok.status_code == 200, ok.text
        finally:
            for s in stalled:
                s.close()
    assert _wait_for(lambda: _empty(work), 5)


def test_job_timeout_answers_504_and_frees_the_slot(thr2d, tmp_path):
    blocking = _BlockingPredictor(thr2d)
    work = tmp_path / "work"
    client = TestClient(create_app(blocking, tmp_dir=work, workers=1, queue_size=0, job_timeout=0.5))
    safety = threading.Timer(20, blocking.release.set)  # never leave the worker blocked
    safety.start()
    try:
        t0 = time.monotonic()
        r = client.post("/api/segment", files={"file": ("a.png", _png())})
        assert r.status_code == 504, r.text
        assert "--job-timeout" in _detail(r) and time.monotonic() - t0 < 5
        # the slot is free although the worker is still blocked: the next request is admitted
        assert client.get("/health").json()["queue"]["in_progress"] == 0
        r = client.post("/api/segment", files={"file": ("b.png", _png())})
        assert r.status_code == 504  # it waited for the busy worker past its own deadline
        assert not _empty(work)  # the blocked job's folder stays while its thread runs
    finally:
        blocking.release.set()
        safety.cancel()
    assert _wait_for(lambda: _empty(work), 10)  # and goes when it ends
    assert client.post("/api/segment", files={"file": ("c.png", _png())}).status_code == 200


class _SlowNet(torch.nn.Module):
    """Two-class logits after a pause, counting its calls: a long prediction made cheap."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.05)
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] - 0.5], dim=1)


def test_job_deadline_stops_the_worker_thread(plan, tmp_path):
    """Past the deadline the worker stops at its next window instead of running to the end."""
    net = _SlowNet()
    pred = Predictor(plan, [net], torch.device("cpu"), "fp32")
    work = tmp_path / "work"
    client = TestClient(create_app(pred, tmp_dir=work, job_timeout=0.5))
    big = _png((256, 256), seed=1)  # 225 windows of 32 x 32, one per call: ~11 s to the end
    r = client.post("/api/segment", files={"file": ("big.png", big)})
    assert r.status_code == 504, r.text
    assert _wait_for(lambda: _empty(work), 3)  # the thread ended (its folder is gone) ...
    assert net.calls < 60  # ... long before the 225 windows
    assert type(pred.members[0].backend) is TorchBackend  # the caller's Predictor is untouched


def test_time_limits_are_checked(thr2d):
    for kwargs in ({"upload_timeout": 0}, {"job_timeout": -1}, {"job_timeout": float("nan")}):
        with pytest.raises(InputError, match="time limits"):
            create_app(thr2d, **kwargs)


# ------------------------------------------------------------------------- 3. stale work folders


def test_stale_work_folders_are_removed_at_start(thr2d, tmp_path):
    root = tmp_path / "tmp"
    root.mkdir()
    old = time.time() - 3600

    def folder(name: str, mtime: float | None = old) -> Path:
        d = root / name
        d.mkdir()
        (d / "upload.nii.gz").write_bytes(b"patient data")
        if mtime is not None:
            os.utime(d, (mtime, mtime))
        return d

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = [folder("medunet-serve-ab12cd34"),  # written before folder names carried a pid
             folder(f"medunet-serve-{gone.pid}-zz99yy88"),  # its server is gone
             folder(f"medunet-serve-{os.getpid()}-aa00bb11")]  # this pid, but before this process
    kept = [folder("medunet-serve-qq11ww22", mtime=None),  # newer than this process
            folder("medunet-serve-notes"), folder("medunet-serve-ab12cd345"), folder("other-ab12cd34")]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    os.utime(outside, (old, old))
    (root / "medunet-serve-ll00kk11").symlink_to(outside, target_is_directory=True)
    (root / "medunet-serve-ff00ee11").write_text("a file, not a folder")
    os.utime(root / "medunet-serve-ff00ee11", (old, old))

    # a folder of a server that is still running (a process started before it) is kept
    ours = process_start_time(os.getpid())
    live = None
    for pid in (1, os.getppid()):
        start = process_start_time(pid)
        if ours is not None and start is not None and ours - start > 4:
            live = folder(f"medunet-serve-{pid}-ll22mm33", mtime=(start + ours) / 2)
            break

    create_app(thr2d, tmp_dir=root)
    for d in stale:
        assert not d.exists(), d.name
    for d in kept + ([live] if live else []):
        assert (d / "upload.nii.gz").exists(), d.name
    assert (outside / "keep.txt").exists() and (root / "medunet-serve-ll00kk11").is_symlink()
    assert (root / "medunet-serve-ff00ee11").is_file()


def test_work_folders_carry_the_pid_and_go_away(thr2d, tmp_path):
    seen: list[str] = []
    original = thr2d.predict_array

    class Spy:
        plan = thr2d.plan

        def predict_array(self, image, **kwargs):
            seen.extend(p.name for p in (tmp_path / "w").iterdir())
            return original(image, **kwargs)

    client = TestClient(create_app(Spy(), tmp_dir=tmp_path / "w"))
    assert client.post("/api/segment", files={"file": ("a.png", _png())}).status_code == 200
    assert len(seen) == 1 and seen[0].startswith(f"medunet-serve-{os.getpid()}-")
    assert _empty(tmp_path / "w")


# ------------------------------------------------------------------------------------ 4. token


def test_token_guards_the_api_and_the_page(thr2d, tmp_path):
    work = tmp_path / "work"
    client = TestClient(create_app(thr2d, tmp_dir=work, token=TOKEN))
    good = {"Authorization": f"Bearer {TOKEN}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        r = client.get("/api/model", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in _detail(r)
        r = client.post("/api/segment", files={"file": ("a.png", _png())}, headers=headers)
        assert r.status_code == 401
    assert _empty(work)  # refused before a slot or a folder was taken
    assert client.get("/health").json()["queue"]["in_progress"] == 0

    assert client.get("/api/model", headers=good).status_code == 200
    r = client.post("/api/segment", files={"file": ("a.png", _png())}, headers=good)
    assert r.status_code == 200, r.text

    assert client.get("/").status_code == 401 and "?token=" in client.get("/").text
    assert client.get("/?token=nope").status_code == 401
    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and 'id="overlay"' in page.text
    assert page.headers["referrer-policy"] == "no-referrer"
    assert client.get("/", headers=good).status_code == 200
    assert client.get(f"/api/model?token={TOKEN}").status_code == 401  # the query is for the page only

    health = client.get("/health").json()  # open for probes, without the model's name
    assert health["status"] == "ok" and "model" not in health
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())

    with pytest.raises(InputError, match="printable ASCII"):
        create_app(thr2d, token="has space")
    with pytest.raises(InputError, match="printable ASCII"):
        create_app(thr2d, token="")


def test_without_token_everything_stays_open(thr2d, tmp_path):
    client = TestClient(create_app(thr2d, tmp_dir=tmp_path / "w"))
    assert client.get("/").status_code == 200 and client.get("/api/model").status_code == 200
    assert client.get("/health").json()["model"] == thr2d.plan.dataset_name


def test_exposure_warning_and_access_log_redaction():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", TOKEN) is None
    message = exposure_warning("0.0.0.0", None)
    assert message and "without an access token" in message and "--token" in message

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("1.2.3.4:5", "GET", f"/?token={TOKEN}&x=1", "1.1", 200), None)
    assert RedactTokenFilter().filter(record)
    line = record.getMessage()
    assert TOKEN not in line and "token=***&x=1" in line


@needs_browser
def test_page_sends_the_token_in_chromium(thr2d, tmp_path):
    from playwright.sync_api import sync_playwright

    png = tmp_path / "a.png"
    png.write_bytes(_png((64, 56)))
    with live_server(create_app(thr2d, tmp_dir=tmp_path / "work", token=TOKEN)) as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            assert page.goto(url).status == 401
            page.goto(f"{url}/?token={TOKEN}")
            page.wait_for_selector("body[data-state=ready]", timeout=20_000)
            page.set_input_files("#file", str(png))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            assert page.locator("#stats tbody tr").count() == 2
        finally:
            browser.close()


# ------------------------------------------------------------------ 5./6. run() and the CLI options


def test_run_warns_sets_the_voxel_limit_and_passes_options(monkeypatch, tmp_path, thr2d, capsys):
    import uvicorn

    import medunet.inference
    import medunet.io.image as image_io

    monkeypatch.setattr(image_io, "MAX_VOXELS", image_io.MAX_VOXELS)  # restored after the test
    monkeypatch.setattr(medunet.inference.Predictor, "load", classmethod(lambda cls, *a, **k: thr2d))
    served: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    from medunet.serve import run

    run(tmp_path, host="0.0.0.0", tmp_dir=tmp_path / "w", max_voxels=1000, upload_timeout=7, job_timeout=9)
    assert "warning: listening on 0.0.0.0 without an access token" in capsys.readouterr().err
    assert served["host"] == "0.0.0.0"
    assert any(isinstance(f, RedactTokenFilter) for f in logging.getLogger("uvicorn.access").filters)
    client = TestClient(served["app"])
    info = client.get("/api/model").json()
    assert info["max_voxels"] == 1000 and info["upload_timeout_s"] == 7 and info["job_timeout_s"] == 9
    r = client.post("/api/segment", files={"file": ("big.png", _png((48, 40)))})  # 1,920 > 1,000 values
    assert r.status_code == 422 and "limit of 1,000" in _detail(r)

    run(tmp_path, host="0.0.0.0", token=TOKEN, tmp_dir=tmp_path / "w")
    run(tmp_path, host="127.0.0.1", tmp_dir=tmp_path / "w")
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(InputError, match="positive whole number"):
        run(tmp_path, max_voxels=0, tmp_dir=tmp_path / "w")


def test_cli_serve_passes_the_hardening_options(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import medunet.serve
    from medunet.cli import app

    seen: dict = {}
    monkeypatch.setattr(medunet.serve, "run", lambda model, **kw: seen.update(model=model, **kw))
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--upload-timeout", "30", "--job-timeout", "90",
                                 "--tmp-dir", str(tmp_path / "t"), "--token-file", str(token_file),
                                 "--max-voxels", "5000000"])
    assert r.exit_code == 0, r.output
    assert seen["upload_timeout"] == 30 and seen["job_timeout"] == 90 and seen["tmp_dir"] == tmp_path / "t"
    assert seen["token"] == TOKEN and seen["max_voxels"] == 5_000_000
    assert TOKEN not in r.output

    r = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert r.exit_code == 0 and seen["token"] is None and seen["upload_timeout"] == 120
    assert seen["job_timeout"] == 600 and seen["max_voxels"] is None and seen["tmp_dir"] is None
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--token", TOKEN, "--token-file", str(token_file)])
    assert isinstance(r.exception, InputError) and "not both" in str(r.exception)
    (tmp_path / "empty").write_text("\n")
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--token-file", str(tmp_path / "empty")])
    assert isinstance(r.exception, InputError) and "empty" in str(r.exception)


# ------------------------------------------------------------- 7. 1,000 hostile requests, flat memory


def _tampered_nifti(rng: np.random.Generator) -> bytes:
    """A small valid .nii.gz whose header then claims a huge grid or a broken spacing."""
    import nibabel as nib

    raw = bytearray(nib.Nifti1Image(rng.normal(size=(6, 6, 4)).astype(np.float32), np.eye(4)).to_bytes())
    dims = np.frombuffer(raw, np.int16, 8, 40).copy()
    if rng.random() < 0.7:
        dims[1:4] = rng.integers(300, 30000, 3)
    else:
        raw[80:84] = np.float32(rng.choice([0.0, -1.0, np.nan])).tobytes()  # pixdim[1]
    raw[40:56] = dims.tobytes()
    return gzip.compress(bytes(raw))


def test_1000_hostile_requests_leave_memory_flat(thr2d, tmp_path, monkeypatch):
    """Each kind of bad request gets its own clear status every time, nothing is left on disk,
    /health answers, and resident memory grows by less than MARGIN over 1,000 requests (a leak
    of 16 kB per request would cross it)."""
    import medunet.io.image as image_io

    margin = 16 * 2**20
    monkeypatch.setattr(image_io, "MAX_VOXELS", 1_000_000)  # tampered headers claim more than this
    work = tmp_path / "work"
    app = create_app(thr2d, tmp_dir=work, max_upload_mb=0.05, token=TOKEN, upload_timeout=10, job_timeout=20)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rng = np.random.default_rng(17)
    limit = int(0.05 * 2**20) + MULTIPART_SLACK
    png = _png()

    def wrong_type(c):
        return c.post("/api/segment", content=b"raw image", headers={**auth, "content-type": "image/png"})

    def truncated(c):
        body = _body(_part("file", png, "a.png"))
        return _post_raw(c, body[: int(rng.integers(10, len(body) - 30))], auth)

    def oversized_declared(c):
        return c.post("/api/segment", files={"file": ("a.png", rng.bytes(limit + 10))}, headers=auth)

    def oversized_chunked(c):
        return _post_raw(c, _chunked(_body(_part("file", rng.bytes(limit + 10), "a.png"))), auth)

    def extra_parts(c):
        return _post_raw(c, _chunked(_body(_part("file", png, "a.png"), _part("x", b"\0" * limit, "x.bin"))),
                         auth)

    def too_many_parts(c):
        return _post_raw(c, _body(*[_part(f"f{i}", b"1") for i in range(40)]), auth)

    def after_end(c):
        return _post_raw(c, _chunked(_body(_part("file", png, "a.png"), epilogue=b"\0" * limit)), auth)

    def bad_token(c):
        return c.post("/api/segment", files={"file": ("a.png", png)},
                      headers={"Authorization": f"Bearer {rng.bytes(8).hex()}"})

    def garbage(c):
        name = str(rng.choice(["a.png", "a.jpg", "a.tif", "a.nii.gz", "a.nrrd", "a.mha", "a.zip", "blob"]))
        return c.post("/api/segment", files={"file": (name, rng.bytes(int(rng.integers(1, 4000))))},
                      headers=auth)

    def tampered(c):
        return c.post("/api/segment", files={"file": ("scan.nii.gz", _tampered_nifti(rng))}, headers=auth)

    kinds = {wrong_type: {415}, truncated: {422}, oversized_declared: {413}, oversized_chunked: {413},
             extra_parts: {413}, too_many_parts: {422}, after_end: {413}, bad_token: {401},
             garbage: {415, 422}, tampered: {422}}
    order = list(kinds)
    seen: collections.Counter = collections.Counter()

    def one(c, i: int) -> None:
        if i % 97 == 0:  # the server keeps answering in between
            assert c.get("/health").status_code == 200
        kind = order[i % len(order)]
        r = kind(c)
        assert r.status_code in kinds[kind], (kind.__name__, r.status_code, r.text[:300])
        _detail(r)
        seen[(kind.__name__, r.status_code)] += 1

    with TestClient(app) as client:
        for i in range(100):  # warm-up: imports, allocator pools, first-use caches
            one(client, i)
        gc.collect()
        base = _rss_bytes()
        probe = np.ones(64 * 2**20, np.uint8)  # the measurement itself sees 64 MB (it is not blind)
        assert _rss_bytes() - base > 48 * 2**20
        del probe
        gc.collect()
        seen.clear()
        before = _rss_bytes()
        t0 = time.monotonic()
        for i in range(1000):
            one(client, i)
        seconds = time.monotonic() - t0
        gc.collect()
        after = _rss_bytes()
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["queue"]["in_progress"] == 0
        assert client.get("/api/model", headers=auth).status_code == 200
        assert client.post("/api/segment", files={"file": ("ok.png", png)}, headers=auth).status_code == 200
    assert _empty(work)
    assert sum(seen.values()) == 1000 and len({k for k, _ in seen}) == len(kinds)
    growth = after - before
    print(f"1000 hostile requests in {seconds:.1f} s; RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MB "
          f"({growth / 2**20:+.1f} MB, margin {margin / 2**20:.0f} MB); {dict(seen)}")
    assert growth < margin, f"memory grew by {growth / 2**20:.1f} MB over 1,000 bad requests"
