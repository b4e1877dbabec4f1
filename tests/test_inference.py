"""Inference: sliding window against whole-image prediction, input grouping, file outputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.errors import InputError
from medunet.inference import Predictor, find_inputs, gaussian_weights, sliding_window_inference
from medunet.inference.sliding_window import probabilities_to_labels, window_starts
from medunet.io import Geometry, read_image, write_image
from medunet.nets import build_network
from medunet.planning import Plan


def _net(dims: int, cin: int = 1, k: int = 3):
    torch.manual_seed(0)
    net = build_network(dims, cin, k, "default", features=[4, 8, 16])
    # put the batch-norm statistics somewhere non-trivial, then freeze them
    net.train()
    with torch.no_grad():
        net(torch.randn(4, cin, *([16] * dims)))
    return net.eval()


@pytest.mark.parametrize("shape", [(24, 36), (12, 16, 20)])
def test_one_window_equals_whole_image(shape):
    net = _net(len(shape))
    image = torch.randn(1, *shape)
    probs = sliding_window_inference(net, image, shape, 3)
    with torch.no_grad():
        direct = torch.softmax(net(image[None]), 1)[0]
    torch.testing.assert_close(probs, direct, atol=1e-5, rtol=1e-5)


def test_many_windows_cover_and_normalise():
    net = _net(2)
    image = torch.randn(1, 50, 70)
    probs = sliding_window_inference(net, image, (16, 16), 3, overlap=0.5)
    assert probs.shape == (3, 50, 70)
    torch.testing.assert_close(probs.sum(0), torch.ones(50, 70), atol=1e-5, rtol=0)


def test_image_smaller_than_patch_is_padded_and_cropped():
    probs = sliding_window_inference(_net(2), torch.randn(1, 10, 9), (32, 32), 3)
    assert probs.shape == (3, 10, 9)


def test_window_starts_and_gaussian():
    assert window_starts(10, 16, 0.5) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 68
    assert all(b - a <= 16 for a, b in zip(starts, starts[1:], strict=False))
    w = gaussian_weights((9, 9))
    assert w.shape == (9, 9) and w[4, 4] == 1.0 and w.min() > 0
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.T)


def test_probabilities_to_labels_maps_raw_values():
    probs = np.zeros((3, 2, 2))
    probs[2, 0, 0] = probs[1, 0, 1] = probs[0, 1] = 1
    np.testing.assert_array_equal(probabilities_to_labels(probs, [0, 128, 255]),
                                  [[255, 128], [0, 0]])


def test_find_inputs_grouping(tmp_path):
    for name in ["a_0000.png", "a_0001.png", "b_0000.png", "b_0001.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    cases = find_inputs(tmp_path, 2)
    assert [(c.case_id, [p.name for p in c.paths]) for c in cases] == [
        ("a", ["a_0000.png", "a_0001.png"]), ("b", ["b_0000.png", "b_0001.png"])]
    # naming one channel file brings its siblings
    assert [p.name for p in find_inputs(tmp_path / "b_0000.png", 2)[0].paths] == [
        "b_0000.png", "b_0001.png"]
    single = find_inputs(tmp_path, 1)
    assert [c.case_id for c in single] == ["a", "a_0001", "b", "b_0001"]
    with pytest.raises(InputError, match="not found"):
        find_inputs(tmp_path / "missing", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        find_inputs(empty, 1)


def _model_dir(tmp_path, dims, label_values=(0, 1)):
    """A model directory with a randomly initialised net: enough to test the file plumbing."""
    k = len(label_values)
    plan = Plan(dataset_name="t", dim=dims, in_channels=1, channel_names=["MRI"],
                label_names=[f"c{v}" for v in label_values], label_values=list(label_values),
                spacing=[1.0] * dims, median_shape=[16] * dims, normalization=[{"scheme": "zscore"}],
                patch_size=[16] * dims, batch_size=2,
                network={"preset": "default", "features": [4, 8, 16], "strides": [2, 2]},
                inference={"overlap": 0.5})
    model = tmp_path / "model"
    plan.save(model / "plan.json")
    net = build_network(dims, 1, k, "default", features=[4, 8, 16], strides=[2, 2])
    torch.save({"model": net.state_dict(), "ema_model": None}, model / "checkpoint_last.pt")
    return model


def test_predictor_nifti_keeps_affine_and_writes_probabilities(tmp_path):
    model = _model_dir(tmp_path, 3)
    affine = np.array([[0.0, -1.2, 0.0, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 2.5],
                       [0, 0, 0, 1]])
    vol = np.random.default_rng(0).normal(size=(19, 23, 11)).astype(np.float32)
    src = tmp_path / "in" / "case7_0000.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(vol, affine), str(src))
    pred = Predictor.load(model, precision="fp32")
    written = pred.predict(src.parent, tmp_path / "out", save_probabilities=True, progress=False)
    assert [p.name for p in written] == ["case7.nii.gz"]
    out = nib.load(str(written[0]))
    assert out.shape == vol.shape
    np.testing.assert_array_equal(out.affine, nib.load(str(src)).affine)
    probs = np.load(tmp_path / "out" / "case7.npz")["probabilities"]
    assert probs.shape == (2, *vol.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.dataobj), probs.argmax(0))


def test_predictor_png_and_channel_errors(tmp_path):
    model = _model_dir(tmp_path, 2, label_values=(0, 255))
    img = (np.random.default_rng(1).random((1, 30, 41)) * 255).astype(np.uint8)
    write_image(tmp_path / "x.png", img)
    pred = Predictor.load(model, precision="fp32")
    out = pred.predict(tmp_path / "x.png", tmp_path / "o", progress=False)[0]
    lab, geom = read_image(out)
    assert out.name == "x.png" and lab.shape == (1, 30, 41)
    assert set(np.unique(lab)) <= {0, 255}
    write_image(tmp_path / "rgb.png", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(InputError, match="3 channel"):
        pred.predict(tmp_path / "rgb.png", tmp_path / "o", progress=False)
    vol = tmp_path / "v.nii.gz"
    write_image(vol, np.zeros((1, 8, 8, 8), np.float32), Geometry.identity(3))
    with pytest.raises(InputError, match="3D but the model is 2D"):
        pred.predict(vol, tmp_path / "o", progress=False)


def test_predictor_load_errors(tmp_path):
    with pytest.raises(InputError, match="plan.json not found"):
        Predictor.load(tmp_path)
    model = _model_dir(tmp_path, 2)
    (model / "checkpoint_last.pt").unlink()
    with pytest.raises(InputError, match="no checkpoint"):
        Predictor.load(model)


def test_flip_tta_of_a_symmetric_model_equals_no_tta(tmp_path):
    """A net made mirror-symmetric (its weights averaged with their flips) gives the same
    probabilities with and without flip TTA."""
    model = _model_dir(tmp_path, 2)
    pred = Predictor.load(model, precision="fp32")
    net = pred.nets[0]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                w = m.weight
                m.weight.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
    img = np.random.default_rng(2).normal(size=(1, 16, 16)).astype(np.float32)
    plain = pred.predict_probabilities(img, tta="none")
    flipped = pred.predict_probabilities(img, tta="flip")
    torch.testing.assert_close(plain, flipped, atol=1e-5, rtol=1e-4)
    with pytest.raises(InputError, match="test-time augmentation"):
        pred.predict_probabilities(img, tta="sideways")
