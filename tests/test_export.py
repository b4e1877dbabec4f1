"""Export: ONNX (dynamic sizes, int8) and TorchScript against PyTorch; the ONNX backend of predict;
post-processing chosen at the end of training."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medunet.cli import app
from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError
from medunet.export import default_export_path, ensure_onnx, export_model
from medunet.inference import OnnxBackend, Predictor, load_network
from medunet.io import Geometry, read_image, write_image

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2D model trained for 2 x 3 iterations, with its validation report (and data)."""
    from medunet.training import train

    root = tmp_path_factory.mktemp("export")
    data = make_synthetic_dataset(root / "data", n_train=4, n_test=1, shape=(32, 32), seed=2)
    model = root / "model"
    train(data, model, epochs=2, overrides={"training.iterations_per_epoch": 3}, progress=False,
          precision="fp32")
    return data, model


def test_training_stores_the_postprocessing_choice(trained):
    _, model = trained
    plan = json.loads((model / "plan.json").read_text())
    choice = plan["inference"]["postprocessing"]
    assert choice["source"] == "validation" and choice["cases"] == 1
    assert set(choice["validation_dice"]) == {"1"}
    d = choice["validation_dice"]["1"]
    assert d["chosen"] >= d["none"]
    assert (set(choice["classes"]) == {"1"}) == (d["chosen"] > d["none"])


def test_onnx_export_matches_pytorch_on_an_untraced_size(trained):
    _, model = trained
    res = export_model(model, "onnx")
    assert res.path == default_export_path(model) and res.path.is_file()
    check = res.check["random"]
    assert check["input_shape"][0] == 2 and check["input_shape"][2:] != [32, 32]
    assert check["max_abs_diff"] < 1e-4 and check["mask_agreement"] > 0.999
    stored = json.loads((model / "export" / "export_check.json").read_text())
    assert stored["model.onnx"]["random"]["max_abs_diff"] == check["max_abs_diff"]
    # any other batch and size runs too (the graph pads to the divisor itself)
    plan, net, _ = load_network(model)
    backend = OnnxBackend(res.path)
    x = torch.randn(3, 1, 19, 45)
    with torch.no_grad():
        torch.testing.assert_close(backend(x), net(x), atol=1e-4, rtol=1e-4)
    assert ensure_onnx(model) == res.path  # up to date: not exported again
    mtime = res.path.stat().st_mtime_ns
    assert ensure_onnx(model).stat().st_mtime_ns == mtime


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_export(trained):
    _, model = trained
    out = model.parent / "elsewhere" / "net.pt"
    res = export_model(model, "torchscript", output=out)
    assert res.path == out and out.is_file()
    assert res.check["random"]["max_abs_diff"] < 1e-5
    x = torch.randn(1, 1, 27, 30)
    assert torch.jit.load(str(out))(x).shape == (1, 2, 27, 30)
    assert "net.pt" in json.loads((model / "export" / "export_check.json").read_text())


def test_int8_export_runs_and_masks_mostly_agree(trained):
    data, model = trained
    res = export_model(model, "onnx", int8=True)  # calibrates on the validation inputs
    assert res.path.name == "model_int8.onnx"
    cal = res.check["calibration"]
    assert cal["patches"] >= 1 and cal["mask_agreement"] > 0.9
    import onnx

    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    res2 = export_model(model, "onnx", int8=True, calibration=data / "imagesTs",
                        output=model / "export" / "cal.onnx")
    assert res2.check["calibration"]["mask_agreement"] > 0.9
    with pytest.raises(InputError, match="calibration images not found"):
        export_model(model, "onnx", int8=True, calibration=model / "nowhere")
    with pytest.raises(InputError, match="int8 quantisation is for ONNX"):
        export_model(model, "torchscript", int8=True)


def test_onnx_backend_predict_writes_the_same_labels_as_torch(trained, tmp_path):
    data, model = trained
    outs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        r = runner.invoke(app, ["predict", str(model), str(data / "imagesTs"), "-o", str(out),
                                "--backend", backend, "--precision", "fp32", "--tta", "flip", "--quiet"])
        assert r.exit_code == 0, r.output
        outs[backend] = read_image(out / "synth_ts000.png")[0]
    assert (outs["torch"] != outs["onnx"]).sum() <= 3
    r = runner.invoke(app, ["predict", str(model), str(data / "imagesTs"), "-o", str(tmp_path / "q"),
                            "--backend", "onnx", "--int8", "--quiet"])
    assert r.exit_code == 0, r.output
    q = read_image(tmp_path / "q" / "synth_ts000.png")[0]
    assert (q == outs["torch"]).mean() > 0.9


def test_a_precision_the_backend_cannot_run_is_refused_before_exporting(trained, tmp_path):
    """ONNX Runtime runs fp32 only: ``--precision bf16`` with it is an input error (exit 2)
    naming the backend that runs bf16, raised before the export or any output is written."""
    data, _ = trained
    model = _random_model_dir(tmp_path, 2)
    for backend, precision in (("onnx", "bf16"), ("onnx", "fp16"), ("openvino", "fp16")):
        out = tmp_path / f"out_{backend}_{precision}"
        r = runner.invoke(app, ["predict", str(model), str(data / "imagesTs"), "-o", str(out),
                                "--backend", backend, "--precision", precision, "--quiet"])
        err = r.exception
        assert isinstance(err, InputError) and err.exit_code == 2, r.output
        assert f"the {backend} backend runs" in str(err) and f"not {precision}" in str(err)
        assert ("--backend openvino runs bf16" in str(err)) == (backend == "onnx")
        assert not out.exists() and not (model / "export").exists()
    with pytest.raises(InputError, match="the onnx backend runs fp32, not bf16"):
        Predictor.load(model, backend="onnx", precision="bf16")


def test_openvino_backend_predicts_the_labels_of_torch(trained, tmp_path):
    """``--backend openvino`` exports first, then matches PyTorch: fp32 to a few pixels (float
    summation order), bf16 to most pixels; int8 runs the QDQ export."""
    pytest.importorskip("openvino")
    data, model = trained
    outs = {}
    for backend, precision in (("torch", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")):
        out = tmp_path / f"{backend}_{precision}"
        r = runner.invoke(app, ["predict", str(model), str(data / "imagesTs"), "-o", str(out), "--backend",
                                backend, "--precision", precision, "--tta", "flip", "--quiet"])
        assert r.exit_code == 0, r.output
        outs[backend, precision] = read_image(out / "synth_ts000.png")[0]
    assert (outs["torch", "fp32"] != outs["openvino", "fp32"]).sum() <= 3
    assert (outs["torch", "fp32"] == outs["openvino", "bf16"]).mean() > 0.98
    r = runner.invoke(app, ["predict", str(model), str(data / "imagesTs"), "-o", str(tmp_path / "q"),
                            "--backend", "openvino", "--int8", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (read_image(tmp_path / "q" / "synth_ts000.png")[0] == outs["torch", "fp32"]).mean() > 0.9


def test_openvino_backend_logits_threads_and_errors(tmp_path, monkeypatch):
    """Logits equal ONNX Runtime's on the same export, for any batch and window size (the graph
    keeps the export's dynamic axes); worker threads get their own requests; bad precision, an
    unreadable file and a missing package are one-line errors."""
    pytest.importorskip("openvino")
    import threading

    from medunet.inference import OpenVinoBackend

    path = export_model(_random_model_dir(tmp_path, 3), "onnx").path
    ov_backend, ort_backend = OpenVinoBackend(path, "fp32"), OnnxBackend(path)
    x = torch.randn(2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    got, want = ov_backend(x), ort_backend(x)
    assert got.dtype == torch.float32 and got.shape == (2, 2, 16, 16, 8)
    assert float((got - want).abs().max()) < 1e-4
    assert float((ov_backend(x[:1]) - want[:1]).abs().max()) < 1e-4  # another batch size
    small = x[:, :, :8]
    assert float((ov_backend(small) - ort_backend(small)).abs().max()) < 1e-4  # another window size
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(ov_backend(x))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(float((r - want).abs().max()) < 1e-4 for r in results)
    import openvino as ov

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert OpenVinoBackend(path, "bf16").precision == ("bf16" if has_bf16 else "fp32")
    with pytest.raises(InputError, match="fp32 or bf16, not fp16"):
        OpenVinoBackend(path, "fp16")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="OpenVINO cannot load") as err:
        OpenVinoBackend(bad)
    assert "bad.onnx" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(InputError, match="OpenVINO is not installed"):
        OpenVinoBackend(path)


def test_cli_export_and_errors(trained, tmp_path):
    _, model = trained
    r = runner.invoke(app, ["export", str(model), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert "mask agreement" in r.output and (tmp_path / "m.onnx").is_file()
    r = runner.invoke(app, ["export", str(model), "--format", "tflite"])
    assert isinstance(r.exception, InputError) and "unknown export format" in str(r.exception)


def _random_model_dir(tmp_path, dims):
    """An untrained model directory (no validation/): enough for exports of another dimension."""
    from medunet.nets import build_network
    from medunet.planning import Plan

    plan = Plan(dataset_name="t", dim=dims, in_channels=1, channel_names=["MRI"], label_names=["bg", "fg"],
                label_values=[0, 1], spacing=[1.0] * dims, median_shape=[16] * dims,
                normalization=[{"scheme": "zscore"}], patch_size=[16, 16, 8][:dims], batch_size=2,
                network={"preset": "default", "features": [4, 8, 16], "strides": [2, 2]},
                inference={"overlap": 0.5})
    model = tmp_path / "model"
    plan.save(model / "plan.json")
    net = build_network(dims, 1, 2, "default", features=[4, 8, 16], strides=[2, 2])
    torch.save({"model": net.state_dict(), "ema_model": None}, model / "checkpoint_last.pt")
    return model


def test_3d_onnx_export_and_int8_needs_a_calibration_source(tmp_path):
    model = _random_model_dir(tmp_path, 3)
    res = export_model(model, "onnx")
    assert res.check["random"]["input_shape"] == [2, 1, 13, 13, 5]
    assert res.check["random"]["max_abs_diff"] < 1e-4
    with pytest.raises(InputError, match="needs calibration images"):
        export_model(model, "onnx", int8=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        vol = rng.normal(size=(1, 20, 18, 9)).astype(np.float32)
        write_image(tmp_path / "cal" / f"c{i}_0000.nii.gz", vol, Geometry.identity(3))
    res = export_model(model, "onnx", int8=True, calibration=tmp_path / "cal")
    assert res.check["calibration"]["patches"] >= 2
    pred = Predictor.load(model, backend="onnx", int8=True)
    labels, _ = pred.predict_array(rng.normal(size=(1, 21, 17, 10)).astype(np.float32), probabilities=False)
    assert labels.shape == (21, 17, 10)


def test_onnx_prediction_reads_a_current_export_and_ensure_covers_every_fold(tmp_path):
    """Inference sits below export: Predictor.load(backend="onnx") never exports itself; it
    names the command when the export is missing or older than the checkpoint, and
    ensure_onnx_all exports every fold of a cross-validation directory."""
    import os
    import shutil

    from medunet.export import ensure_onnx_all

    model = _random_model_dir(tmp_path, 2)
    with pytest.raises(InputError, match="no current ONNX export") as err:
        Predictor.load(model, backend="onnx")
    assert "medunet export" in str(err.value)
    (path,) = ensure_onnx_all(model)
    assert path == default_export_path(model) and Predictor.load(model, backend="onnx").members
    ckpt = model / "checkpoint_last.pt"
    os.utime(ckpt, (path.stat().st_mtime + 10, path.stat().st_mtime + 10))  # retrained since
    with pytest.raises(InputError, match="no current ONNX export"):
        Predictor.load(model, backend="onnx")

    folds = tmp_path / "cv"
    for k in range(2):
        shutil.copytree(model, folds / f"fold_{k}", ignore=shutil.ignore_patterns("export"),
                        copy_function=shutil.copy)  # fresh times: not the future one set above
    paths = ensure_onnx_all(folds)
    assert [p.parent.parent.name for p in paths] == ["fold_0", "fold_1"]
    assert len(Predictor.load(folds, backend="onnx").members) == 2
