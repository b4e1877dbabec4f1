"""medunet serve: the REST API (every endpoint and error status), DICOM series input, the page in
a real browser against a real server, and the thin CLI command.

Two kinds of model are used. A tiny trained one (module fixture, a few seconds) checks that the
API returns exactly what the Predictor computes. A "threshold" network (foreground wherever the
normalised image is above 0.5) inside a real Predictor gives masks the tests can predict
independently, in 2D and 3D, and a guaranteed foreground for the browser test.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import importlib.util
import io
import json
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError
from medunet.inference import Predictor
from medunet.inference.predictor import TTA_MODES
from medunet.io import read_dicom_series
from medunet.preprocessing import normalize
from medunet.serve import create_app
from medunet.serve.segment import class_colour

fastapi_testclient = pytest.importorskip("fastapi.testclient")
TestClient = fastapi_testclient.TestClient

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from medunet.training import train

    root = tmp_path_factory.mktemp("serve_model")
    data = make_synthetic_dataset(root / "data", n_train=4, n_test=1, shape=(32, 32))
    train(data, root / "model", epochs=2, overrides={"training.iterations_per_epoch": 5}, progress=False)
    return root / "model"


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def test_png(model_dir) -> Path:
    return model_dir.parent / "data" / "imagesTs" / "synth_ts000_0000.png"


class ThresholdNet(torch.nn.Module):
    """Two-class logits: foreground where the (normalised) first channel is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = 8.0 * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def _threshold_predictor(plan) -> Predictor:
    return Predictor(plan, [ThresholdNet()], torch.device("cpu"), "fp32")


@pytest.fixture(scope="module")
def thr2d(predictor) -> Predictor:
    return _threshold_predictor(dataclasses.replace(predictor.plan, patch_size=[32, 32]))


@pytest.fixture(scope="module")
def thr3d(predictor) -> Predictor:
    plan = dataclasses.replace(predictor.plan, dim=3, patch_size=[8, 8, 8], spacing=[1.5, 1.0, 2.0],
                               normalization=[{"scheme": "zscore"}])
    return _threshold_predictor(plan)


def _expected_labels(pred: Predictor, image: np.ndarray) -> np.ndarray:
    """The threshold model's answer, computed without the Predictor."""
    return (normalize(image, pred.plan.normalization)[0] > 0.5).astype(np.uint8)


@pytest.fixture
def serve(tmp_path):
    """Factory: ``(client, work_dir)`` for an app around a predictor; checks the work dir is left empty."""
    made: list[Path] = []

    def make(pred: Predictor, **kwargs) -> tuple[TestClient, Path]:
        work = tmp_path / f"work{len(made)}"
        made.append(work)
        return TestClient(create_app(pred, tmp_dir=work, **kwargs)), work

    yield make
    for work in made:
        assert list(work.iterdir()) == [], "a request left files behind"


def _post(client: TestClient, name: str, data: bytes, **fields: str):
    return client.post("/api/segment", files={"file": (name, data, "application/octet-stream")}, data=fields)


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _blob_image(shape=(48, 40), seed=0) -> np.ndarray:
    """A noisy dark image with a bright rectangle: the threshold model finds the rectangle."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 60, shape).astype(np.uint8)
    img[10:30, 8:20] = 220
    return img


def _nib_gz(img) -> bytes:
    """A NIfTI image as the bytes of a .nii.gz file."""
    return gzip.compress(img.to_bytes())


def _volume(shape=(12, 10, 6), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, 1, shape).astype(np.float32)
    vol[3:8, 2:6, 1:4] += 6
    return vol


def _decode(b64: str) -> bytes:
    return base64.b64decode(b64)


# ------------------------------------------------------------------------------- info endpoints


def test_health_model_page_and_docs(serve, predictor):
    client, _ = serve(predictor, max_upload_mb=3)
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["queue"]["capacity"] == 1 + 8

    m = client.get("/api/model").json()
    plan = predictor.plan
    assert m["dimension"] == 2 and m["input_channels"] == 1
    assert [lab["value"] for lab in m["labels"]] == plan.label_values
    assert m["labels"][0]["color"] is None and m["labels"][1]["color"].startswith("#")
    assert m["plan"]["patch_size"] == plan.patch_size and m["plan"]["spacing"] == plan.spacing
    assert m["plan"]["normalization"] == [n["scheme"] for n in plan.normalization]
    assert m["max_upload_mb"] == 3 and ".zip" in m["accepted_suffixes"]

    page = client.get("/")
    assert page.status_code == 200 and 'id="overlay"' in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    seg = spec["paths"]["/api/segment"]["post"]
    assert "multipart/form-data" in seg["requestBody"]["content"]
    assert {"200", "413", "415", "422", "503"} <= set(seg["responses"])
    assert "X-Medunet-Stats" in spec["info"]["description"]


# ------------------------------------------------------------------------------- segmentation


def test_segment_png_json_matches_predictor(serve, predictor, test_png):
    from medunet.io import read_image

    client, _ = serve(predictor)
    r = _post(client, test_png.name, test_png.read_bytes(), view="true")
    assert r.status_code == 200, r.text
    body = r.json()
    image, _ = read_image(test_png)
    labels, _ = predictor.predict_array(image)
    from PIL import Image

    mask = np.asarray(Image.open(io.BytesIO(_decode(body["mask"]["data"]))))
    np.testing.assert_array_equal(mask, labels)
    assert body["mask"]["filename"] == "synth_ts000_0000_mask.png"
    assert body["mask"]["media_type"] == "image/png"
    stats = body["stats"]
    assert stats["measure"] == "area" and stats["unit"] == "px^2" and stats["dimension"] == 2
    assert sum(c["voxels"] for c in stats["classes"]) == labels.size
    for c in stats["classes"]:
        assert c["voxels"] == int((labels == c["value"]).sum()) == c["area"]
    assert stats["inference_seconds"] > 0 and stats["total_seconds"] >= stats["inference_seconds"]
    view = body["view"]
    assert view["slices"] == 1 and (view["height"], view["width"]) == labels.shape
    assert view["images"][0].startswith("data:image/png;base64,")


def test_segment_file_response_stats_header_and_safe_name(serve, thr2d):
    client, _ = serve(thr2d)
    img = _blob_image()
    r = _post(client, "../../etc/My scan (1).PNG", _png_bytes(img), format="png", tta="flip")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'attachment; filename="My_scan_1_mask.png"'
    from PIL import Image

    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    expected = _expected_labels(thr2d, img[None])
    np.testing.assert_array_equal(mask, expected)
    stats = json.loads(r.headers["x-medunet-stats"])
    assert stats["tta"] == "flip" and stats["case"] == "My_scan_1"
    assert stats["classes"][1]["voxels"] == int(expected.sum()) > 0
    assert stats["classes"][1]["fraction"] == pytest.approx(expected.mean(), abs=1e-6)


def test_segment_grey_image_saved_as_rgb_is_accepted(serve, thr2d):
    client, _ = serve(thr2d)
    img = _blob_image()
    r = _post(client, "grey.png", _png_bytes(np.stack([img] * 3, -1)), format="png")
    assert r.status_code == 200, r.text


def test_segment_without_suffix_is_sniffed(serve, thr2d):
    client, _ = serve(thr2d)
    r = _post(client, "blob", _png_bytes(_blob_image()))
    assert r.status_code == 200, r.text
    assert r.json()["mask"]["filename"] == "blob_mask.png"


def test_segment_nifti_volume_keeps_geometry(serve, thr3d):
    import nibabel as nib

    client, _ = serve(thr3d)
    vol = _volume()
    affine = np.array([[0, -1.5, 0, 10], [1.0, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    r = _post(client, "ct.nii.gz", _nib_gz(nib.Nifti1Image(vol, affine)), format="nifti", view="1")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert r.headers["content-disposition"].endswith('filename="ct_mask.nii.gz"')
    out = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    np.testing.assert_allclose(out.affine, affine)
    mask = np.asarray(out.dataobj)
    expected = _expected_labels(thr3d, vol[None])
    np.testing.assert_array_equal(mask, expected)
    stats = json.loads(r.headers["x-medunet-stats"])
    assert stats["measure"] == "volume" and stats["unit"] == "mm^3"
    assert stats["spacing"] == [1.0, 1.5, 2.0] and stats["voxel_size"] == pytest.approx(3.0)
    assert stats["classes"][1]["volume"] == pytest.approx(3.0 * expected.sum())

    # the page's view: slices along the third axis, rows = second axis reversed
    body = _post(client, "ct.nii.gz", _nib_gz(nib.Nifti1Image(vol, affine)), view="true").json()
    view = body["view"]
    assert (view["slices"], view["height"], view["width"]) == (6, 10, 12)
    assert len(view["images"]) == len(view["masks"]) == 6
    assert body["mask"]["media_type"] == "application/gzip"
    from PIL import Image

    z = view["best_slice"]
    rgba = np.asarray(Image.open(io.BytesIO(_decode(view["masks"][z].split(",", 1)[1]))))
    np.testing.assert_array_equal(rgba[..., 3] > 0, expected[:, :, z].T[::-1])


def test_segment_2d_nifti_with_a_2d_model_keeps_its_header(serve, thr2d):
    import nibabel as nib

    client, _ = serve(thr2d)
    img = _blob_image((20, 16)).astype(np.float32)
    affine = np.diag([0.5, 0.25, 1.0, 1.0])
    affine[:3, 3] = [4, -2, 7]
    r = _post(client, "slice.nii.gz", _nib_gz(nib.Nifti1Image(img, affine)))  # 2D: read as (1, 20, 16, 1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mask"]["filename"] == "slice_mask.nii.gz"  # NIfTI in, NIfTI out: the header is kept
    out = nib.Nifti1Image.from_bytes(gzip.decompress(_decode(body["mask"]["data"])))
    assert out.shape == img.shape
    np.testing.assert_allclose(out.affine, affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj), _expected_labels(thr2d, img[None]))
    assert body["stats"]["unit"] == "mm^2" and body["stats"]["voxel_size"] == pytest.approx(0.125)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_segment_itk_formats(serve, thr3d, tmp_path, suffix):
    import SimpleITK as sitk

    client, _ = serve(thr3d)
    vol = _volume(seed=1)
    img = sitk.GetImageFromArray(np.transpose(vol, (2, 1, 0)))
    img.SetSpacing((0.5, 0.5, 3.0))
    path = tmp_path / f"src{suffix}"
    sitk.WriteImage(img, str(path))
    body = _post(client, f"scan{suffix}", path.read_bytes()).json()
    assert body["stats"]["shape"] == list(vol.shape)
    assert body["stats"]["voxel_size"] == pytest.approx(0.75)
    assert body["mask"]["filename"] == "scan_mask.nii.gz"
    expected = _expected_labels(thr3d, vol[None])
    assert body["stats"]["classes"][1]["voxels"] == int(expected.sum())


# ---------------------------------------------------------------------------------------- DICOM


def _write_dicom_series(folder: Path, vol_zyx: np.ndarray, spacing=(0.8, 0.7, 2.5),
                        origin=(-10.0, 5.0, 30.0), series_uid="1.2.826.0.1.3680043.2.1125.1",
                        shuffle_names: bool = True) -> None:
    """One file per slice with SimpleITK/GDCM, file names in reverse order of position."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(vol_zyx.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = img.GetDepth()
    for i in range(n):
        s = img[:, :, i]
        pos = img.TransformIndexToPhysicalPoint((0, 0, i))
        for tag, value in [("0008|0060", "MR"), ("0020|000d", series_uid + ".0"), ("0020|000e", series_uid),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", "\\".join(map(str, pos))),
                           ("0020|0013", str(i + 1)), ("0018|0050", str(spacing[2])),
                           ("0008|0018", f"{series_uid}.{i + 1}")]:
            s.SetMetaData(tag, value)
        name = f"slice{(n - 1 - i) if shuffle_names else i:03d}.dcm"
        writer.SetFileName(str(folder / name))
        writer.Execute(s)


def test_read_dicom_series_sorts_by_position(tmp_path):
    vol = np.arange(5 * 6 * 4, dtype=np.int16).reshape(4, 6, 5)  # (z, y, x)
    _write_dicom_series(tmp_path / "series", vol)
    arr, geom = read_dicom_series(tmp_path / "series")
    assert arr.shape == (1, 5, 6, 4)  # (C, x, y, z), as _read_itk gives
    np.testing.assert_array_equal(arr[0], np.transpose(vol, (2, 1, 0)))
    np.testing.assert_allclose(geom.spacing, (0.8, 0.7, 2.5), atol=1e-4)
    np.testing.assert_allclose(geom.origin, (-10.0, 5.0, 30.0), atol=1e-4)
    assert geom.fmt == "itk" and geom.extra["source"] == "dicom"


def test_read_dicom_series_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_dicom_series(tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        read_dicom_series(tmp_path / "missing")
    vol = np.zeros((2, 4, 4), np.int16)
    _write_dicom_series(tmp_path / "two" / "a", vol, series_uid="1.2.3.4")
    _write_dicom_series(tmp_path / "two" / "b", vol, series_uid="1.2.3.5")
    with pytest.raises(InputError, match="2 DICOM series"):
        read_dicom_series(tmp_path / "two")
    arr, _ = read_dicom_series(tmp_path / "two", series_uid="1.2.3.5")
    assert arr.shape == (1, 4, 4, 2)


def _zip_folder(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"patient/study/{f.name}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_segment_dicom_zip(serve, thr3d, tmp_path):
    vol = np.zeros((5, 9, 7), np.int16)  # (z, y, x)
    vol[1:4, 2:6, 1:5] = 400
    vol += np.random.default_rng(0).integers(0, 30, vol.shape, dtype=np.int16)
    _write_dicom_series(tmp_path / "series", vol)
    # hostile member names and macOS junk are ignored: members are extracted under server names
    data = _zip_folder(tmp_path / "series", {"__MACOSX/._x": b"junk", "../../evil.txt": b"x" * 10})
    client, work = serve(thr3d)
    r = _post(client, "series.zip", data)
    assert r.status_code == 200, r.text  # evil.txt (not DICOM) is skipped by GDCM
    stats = r.json()["stats"]
    assert stats["shape"] == [7, 9, 5]
    assert stats["voxel_size"] == pytest.approx(0.8 * 0.7 * 2.5, rel=1e-4)
    expected = _expected_labels(thr3d, np.transpose(vol, (2, 1, 0))[None])
    assert stats["classes"][1]["voxels"] == int(expected.sum()) > 0
    assert not (tmp_path.parent / "evil.txt").exists() and not (work.parent / "evil.txt").exists()


def test_segment_dicom_zip_errors(serve, thr3d):
    client, _ = serve(thr3d)
    r = _post(client, "x.zip", b"PK\x03\x04 this is not a zip")
    assert r.status_code == 422 and "zip" in r.json()["detail"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes.txt", "hello")
    r = _post(client, "x.zip", buf.getvalue())
    assert r.status_code == 422 and "no DICOM series" in r.json()["detail"]
    assert "medunet-serve-" not in r.json()["detail"]  # no server paths in messages


def test_zip_bomb_is_refused(serve, thr3d):
    client, _ = serve(thr3d, max_upload_mb=0.01)  # a zip may unpack to 4 x 10 kB
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * 200_000)
    assert len(buf.getvalue()) < 10_000
    r = _post(client, "bomb.zip", buf.getvalue())
    assert r.status_code == 413 and "expands" in r.json()["detail"]


# ---------------------------------------------------------------------------------------- errors


def test_413_too_large(serve, thr2d):
    client, work = serve(thr2d, max_upload_mb=0.05)  # 50 kB
    big = _png_bytes(np.random.default_rng(0).integers(0, 255, (500, 500), dtype=np.uint8))
    assert len(big) > 200_000  # over the limit plus the allowance for multipart overhead
    r = _post(client, "big.png", big)  # refused from Content-Length, before reading
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]

    # without Content-Length (chunked): refused while streaming, and nothing is kept
    boundary = "medunetboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        yield head
        for i in range(0, len(big), 16384):
            yield big[i:i + 16384]
        yield tail

    r = client.post("/api/segment", content=chunks(),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert list(work.iterdir()) == []


def test_415_unsupported_type(serve, thr2d):
    client, _ = serve(thr2d)
    r = _post(client, "report.pdf", b"%PDF-1.4 ...")
    assert r.status_code == 415 and "report.pdf" in r.json()["detail"] and ".nii.gz" in r.json()["detail"]
    r = _post(client, "noext", b"just some bytes")
    assert r.status_code == 415
    r = client.post("/api/segment", content=b"raw", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


@pytest.mark.parametrize("case", ["corrupt", "empty", "rgb", "volume", "no_file", "bad_tta", "bad_format",
                                  "png_for_3d"])
def test_422_bad_images_and_options(serve, thr2d, thr3d, case):
    import nibabel as nib

    client, _ = serve(thr3d if case == "png_for_3d" else thr2d)
    png = _png_bytes(_blob_image())
    if case == "corrupt":
        r = _post(client, "scan.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        detail = r.json()["detail"]
        assert "scan.png" in detail and "cannot read image" in detail and "medunet-serve-" not in detail
    elif case == "empty":
        r = _post(client, "scan.png", b"")
        assert "empty" in r.json()["detail"]
    elif case == "rgb":
        rgb = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
        r = _post(client, "colour.png", _png_bytes(rgb))
        assert "3 channel(s)" in r.json()["detail"] and "expects 1" in r.json()["detail"]
    elif case == "volume":
        r = _post(client, "vol.nii.gz", _nib_gz(nib.Nifti1Image(_volume(), np.eye(4))))
        assert "3D but the model is 2D" in r.json()["detail"]
    elif case == "no_file":
        r = client.post("/api/segment", data={"tta": "none"}, files={"other": ("a.png", png)})
        assert "no file" in r.json()["detail"]
    elif case == "bad_tta":
        r = _post(client, "a.png", png, tta="rotate")
        assert "unknown tta" in r.json()["detail"]
    elif case == "bad_format":
        r = _post(client, "a.png", png, format="jpeg")
        assert "unknown format" in r.json()["detail"]
    else:
        r = _post(client, "v.nii.gz", _nib_gz(nib.Nifti1Image(_volume(), np.eye(4))), format="png")
        assert "2D masks only" in r.json()["detail"]
    assert r.status_code == 422, r.text


class _BlockingPredictor:
    """Wraps a predictor; each prediction waits until the test releases it."""

    def __init__(self, inner: Predictor) -> None:
        self.plan = inner.plan
        self.inner = inner
        self.started = threading.Event()
        self.release = threading.Event()

    def predict_array(self, image, tta="none", **kwargs):
        self.started.set()
        assert self.release.wait(30)
        return self.inner.predict_array(image, tta=tta, **kwargs)


def test_503_when_queue_is_full(serve, thr2d):
    blocking = _BlockingPredictor(thr2d)
    client, _ = serve(blocking, workers=1, queue_size=0)
    png = _png_bytes(_blob_image())
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=_post(client, "a.png", png)))
    t.start()
    try:
        assert blocking.started.wait(30)  # the only slot is taken by a running job
        r = _post(client, "b.png", png)
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"]
        assert client.get("/health").json()["queue"]["in_progress"] == 1
    finally:
        blocking.release.set()
        t.join(30)
    assert first["r"].status_code == 200
    assert _post(client, "c.png", png).status_code == 200  # the slot is free again


class _FailingPredictor:
    def __init__(self, plan) -> None:
        self.plan = plan

    def predict_array(self, image, tta="none", **kwargs):
        raise RuntimeError("boom")


def test_500_on_a_bug_cleans_up(serve, thr2d):
    client, _ = serve(_FailingPredictor(thr2d.plan))
    r = _post(client, "a.png", _png_bytes(_blob_image()))
    assert r.status_code == 500 and "RuntimeError" in r.json()["detail"]
    assert client.get("/health").json()["queue"]["in_progress"] == 0


def test_create_app_checks_its_arguments(thr2d):
    with pytest.raises(InputError):
        create_app(thr2d, workers=0)
    with pytest.raises(InputError):
        create_app(thr2d, queue_size=-1)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_serve_calls_run(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import medunet.serve
    from medunet.cli import app

    seen: dict = {}
    monkeypatch.setattr(medunet.serve, "run", lambda model, **kw: seen.update(model=model, **kw))
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", "8123", "--workers", "2",
                                 "--max-upload-mb", "64", "--queue-size", "3", "--backend", "openvino"])
    assert r.exit_code == 0, r.output
    assert seen["model"] == tmp_path and seen["port"] == 8123 and seen["workers"] == 2
    assert seen["backend"] == "openvino"
    assert seen["max_upload_mb"] == 64 and seen["queue_size"] == 3 and seen["host"] == "127.0.0.1"


def test_run_refuses_bad_port_and_missing_model(tmp_path):
    from medunet.serve import run

    with pytest.raises(InputError, match="port"):
        run(tmp_path, port=70000)
    with pytest.raises(InputError):
        run(tmp_path / "nope", port=8000)
    with pytest.raises(InputError, match="the onnx backend runs fp32, not bf16"):  # before exporting
        run(tmp_path / "nope", port=8000, backend="onnx", precision="bf16")


# ------------------------------------------------------------------------------ real server + page


@contextlib.contextmanager
def live_server(app):
    """uvicorn on a free loopback port in a background thread."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


needs_browser = pytest.mark.skipif(
    not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None,
    reason="needs /usr/bin/chromium and the playwright package")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


_READ_OVERLAY = """() => {
  const c = document.getElementById('overlay');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
  return {w: c.width, h: c.height, data: Array.from(d.data)};
}"""


def _overlay(page) -> np.ndarray:
    px = page.evaluate(_READ_OVERLAY)
    return np.array(px["data"], np.uint8).reshape(px["h"], px["w"], 4)


def _set_range(page, selector: str, value: int) -> None:
    """Move a slider as a user would: set its value and fire ``input``."""
    page.eval_on_selector(
        selector, "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input')); }", value)


def _rgb(hex_colour: str) -> list[int]:
    return [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]


@needs_browser
def test_page_segments_a_png_in_chromium(browser, thr2d, tmp_path):
    img = _blob_image((64, 56))
    png = tmp_path / "upload me.png"
    png.write_bytes(_png_bytes(img))
    expected = _expected_labels(thr2d, img[None]) > 0
    assert expected.any()
    work = tmp_path / "work"
    with live_server(create_app(thr2d, tmp_dir=work)) as url:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("body[data-state=ready]", timeout=20_000)
        assert "1 channel(s)" in page.inner_text("#model-info")
        assert page.eval_on_selector_all("#tta option", "os => os.map(o => o.value)") == list(TTA_MODES)
        page.set_input_files("#file", str(png))
        page.wait_for_selector("body[data-state=done]", timeout=60_000)

        rgba = _overlay(page)
        assert rgba.shape[:2] == expected.shape
        colour = _rgb(class_colour(1))
        assert (rgba[expected][:, :3] == colour).all() and (rgba[expected][:, 3] == 255).all()
        assert (rgba[~expected][:, 3] == 0).all()

        rows = page.locator("#stats tbody tr")
        assert rows.count() == 2
        assert f"{int(expected.sum()):,}" in rows.nth(1).inner_text()
        assert "Inference" in page.inner_text("#timing")
        assert page.is_hidden("#slice-row")

        _set_range(page, "#opacity", 80)
        assert page.eval_on_selector("#overlay", "c => c.style.opacity") == "0.8"

        with page.expect_download() as dl:
            page.click("#download")
        saved = tmp_path / "downloaded.png"
        dl.value.save_as(saved)
        from PIL import Image

        np.testing.assert_array_equal(np.asarray(Image.open(saved)) > 0, expected)
        page.screenshot(path=str(tmp_path / "serve_page_2d.png"), full_page=True)
        assert (tmp_path / "serve_page_2d.png").stat().st_size > 0
        assert errors == []
        page.close()
    assert list(work.iterdir()) == []


@needs_browser
def test_page_slice_slider_for_a_volume(browser, thr3d, tmp_path):
    import nibabel as nib

    vol = _volume((16, 12, 7), seed=3)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    expected = _expected_labels(thr3d, vol[None]) > 0
    with live_server(create_app(thr3d, tmp_dir=tmp_path / "work")) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-state=ready]", timeout=20_000)
        page.set_input_files("#file", str(path))
        page.wait_for_selector("body[data-state=done]", timeout=60_000)
        assert page.is_visible("#slice-row")
        assert page.get_attribute("#slice", "max") == "6"
        for z in (0, 2, 5):
            _set_range(page, "#slice", z)
            page.wait_for_selector(f"#stage[data-drawn='{z}']")  # PNGs decode asynchronously
            rgba = _overlay(page)
            np.testing.assert_array_equal(rgba[..., 3] > 0, expected[:, :, z].T[::-1])
        page.screenshot(path=str(tmp_path / "serve_page_3d.png"), full_page=True)
        page.close()
