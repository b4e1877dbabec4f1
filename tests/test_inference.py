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


# --- memory-lean sliding window, lazy normalisation, TTA, ensembles, CLI options ---------------


def _reference_sliding_window(net, image, patch, k, overlap):
    """The textbook algorithm: full-size float32 sums, then one division."""
    from medunet.inference.sliding_window import gaussian_weights as gw

    size = image.shape[1:]
    w = gw(tuple(patch))
    probs, norm = torch.zeros((k, *size)), torch.zeros(size)
    import itertools

    for st in itertools.product(*[window_starts(s, p, overlap) for s, p in zip(size, patch, strict=True)]):
        sl = tuple(slice(a, a + p) for a, p in zip(st, patch, strict=True))
        with torch.no_grad():
            p = torch.softmax(net(image[(slice(None), *sl)][None]), 1)[0]
        probs[(slice(None), *sl)] += p * w
        norm[sl] += w
    return probs / norm


@pytest.mark.parametrize("shape,patch", [((50, 37), (16, 16)), ((30, 70), (16, 16)),
                                         ((20, 18, 23), (8, 16, 8))])
def test_slab_accumulation_equals_full_accumulation(shape, patch):
    from medunet.inference import sliding_window
    from medunet.inference.backends import TorchBackend
    from medunet.inference.tta import window_predictor

    net = _net(len(shape))
    image = torch.randn(1, *shape)
    ref = _reference_sliding_window(net, image, patch, 3, 0.5)
    predict = window_predictor([TorchBackend(net, torch.device("cpu"), "fp32")])
    probs, labels = sliding_window(predict, image, patch, 3, overlap=0.5, batch_size=3, labels=True)
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(labels.long(), probs.argmax(0))
    # labels alone: the same map, without a K-channel output
    none, only = sliding_window(predict, image.numpy(), patch, 3, overlap=0.5, probabilities=False,
                                labels=True)
    assert none is None and torch.equal(only, labels)


@pytest.mark.parametrize("scheme", [
    {"scheme": "zscore"}, {"scheme": "none"}, {"scheme": "rgb", "mean": 0.4, "std": 0.2},
    {"scheme": "ct", "lower": -200.0, "upper": 900.0, "mean": 80.0, "std": 150.0}])
def test_window_normalizer_equals_normalize(scheme):
    from medunet.inference.normalization import WindowNormalizer
    from medunet.preprocessing import normalize

    rng = np.random.default_rng(0)
    image = (rng.normal(300, 400, size=(1, 20, 30, 7))).astype(np.int16)
    expected = normalize(image, [scheme])
    got = WindowNormalizer(image, [scheme])(torch.from_numpy(image[None].astype(np.float32)))[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


class _Pointwise(torch.nn.Module):
    """Logits (x, -x): equivariant to any spatial transform, so TTA must give back no-TTA."""

    def forward(self, x):
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)


def _pointwise_predictor(tmp_path, dims=2):
    model = _model_dir(tmp_path, dims)
    pred = Predictor.load(model, precision="fp32")
    pred.members[0].backend.net = _Pointwise()
    return pred


@pytest.mark.parametrize("dims", [2, 3])
def test_full_tta_of_an_equivariant_model_equals_no_tta(tmp_path, dims):
    pred = _pointwise_predictor(tmp_path, dims)
    # a smooth, asymmetric image: a wrongly inverted rotation would move it visibly
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in (30, 26, 20)[:dims]], indexing="ij")
    img = (2 * grids[0] + np.sin(2 * grids[1]))[None].astype(np.float32)
    plain = pred.predict_probabilities(img, tta="none")
    full = pred.predict_probabilities(img, tta="full")
    # interpolation error only; at the image border the rotated windows see reflected context
    inner = (slice(None), *[slice(2, -2)] * dims)
    torch.testing.assert_close(full[inner], plain[inner], atol=2e-3, rtol=0)
    torch.testing.assert_close(full, plain, atol=1e-2, rtol=0)


def test_rotation_is_inverted_on_the_probabilities():
    from medunet.inference.tta import Transform, rotate, rotation_plane, tta_transforms

    x = torch.linspace(0, 1, 32)[None, None, :, None].expand(1, 1, 32, 32).contiguous()
    t = Transform(angle=10.0, plane=(0, 1))
    moved = t.forward(x)
    assert (moved - x).abs().max() > 0.05  # it really rotates
    back, weight = t.inverse(moved)
    inside = weight[0, 0] > 0.999
    torch.testing.assert_close(back[0, 0][inside], x[0, 0][inside], atol=2e-2, rtol=0)
    assert weight.min() == 0  # corners the rotated window did not cover are left out
    assert rotate(x, 0.0, (0, 1)).sub(x).abs().max() < 1e-6
    assert len(tta_transforms("full", 3, (0, 1))) == 10 and len(tta_transforms("flip", 2)) == 4
    assert rotation_plane([1.0, 1.0, 3.0], 3) == (0, 1) and rotation_plane([3.0, 0.7, 0.7], 3) == (1, 2)


def test_ensemble_of_identical_models_equals_one(tmp_path):
    import shutil

    model = _model_dir(tmp_path, 2)
    twin = tmp_path / "twin"
    shutil.copytree(model, twin)
    folds = tmp_path / "cv"
    for f in ("fold_0", "fold_1"):
        shutil.copytree(model, folds / f)
    img = np.random.default_rng(3).normal(size=(1, 40, 23)).astype(np.float32)
    one = Predictor.load(model, precision="fp32")
    both = Predictor.load([model, twin], precision="fp32")
    cv = Predictor.load(folds, precision="fp32")
    assert len(both.members) == 2 and len(cv.members) == 2
    expected = one.predict_probabilities(img, tta="flip")
    torch.testing.assert_close(both.predict_probabilities(img, tta="flip"), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cv.predict_probabilities(img), one.predict_probabilities(img),
                               atol=1e-6, rtol=1e-5)
    # models trained on other labels cannot be averaged
    other = _model_dir(tmp_path / "o", 2, label_values=(0, 1, 2))
    with pytest.raises(InputError, match="disagree on label_values"):
        Predictor.load([model, other])


def test_ensemble_with_different_patch_sizes_averages_probabilities(tmp_path):
    import json
    import shutil

    model = _model_dir(tmp_path, 2)
    other = tmp_path / "other"
    shutil.copytree(model, other)
    plan = json.loads((other / "plan.json").read_text())
    plan["patch_size"] = [8, 8]
    (other / "plan.json").write_text(json.dumps(plan))
    img = np.random.default_rng(4).normal(size=(1, 20, 21)).astype(np.float32)
    a = Predictor.load(model, precision="fp32").predict_probabilities(img)
    b = Predictor.load(other, precision="fp32").predict_probabilities(img)
    both = Predictor.load([model, other], precision="fp32")
    torch.testing.assert_close(both.predict_probabilities(img), (a + b) / 2, atol=1e-6, rtol=1e-5)
    labels, probs = both.predict_array(img)
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_overlap_option_and_bad_values(tmp_path):
    model = _model_dir(tmp_path, 2)
    img = np.random.default_rng(5).normal(size=(1, 40, 40)).astype(np.float32)
    dense = Predictor.load(model, precision="fp32", overlap=0.75)
    assert dense.overlap == 0.75 and Predictor.load(model).overlap == 0.5
    probs = dense.predict_probabilities(img)
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 40), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="overlap"):
        Predictor.load(model, overlap=1.0)
    with pytest.raises(InputError, match="backend"):
        Predictor.load(model, backend="tensorrt")
    with pytest.raises(InputError, match="int8 needs an ONNX export"):
        Predictor.load(model, int8=True)


def test_cli_predict_ensemble_tta_overlay_postprocess(tmp_path):
    from typer.testing import CliRunner

    from medunet.cli import app

    model = _model_dir(tmp_path, 3)
    vol = np.random.default_rng(6).normal(size=(1, 20, 18, 9)).astype(np.float32)
    write_image(tmp_path / "in" / "c1_0000.nii.gz", vol, Geometry(spacing=(1.0, 1.0, 2.5)))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["predict", str(model), str(tmp_path / "in"), "-o", str(out), "-m",
                                 str(model), "--tta", "full", "--overlap", "0.25", "--overlay",
                                 "--postprocess", "largest_component", "--precision", "fp32", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "2 models" in r.output and "tta full" in r.output
    assert (out / "c1.nii.gz").is_file() and (out / "overlays" / "c1.png").stat().st_size > 1000
    lab, _ = read_image(out / "c1.nii.gz")
    from scipy import ndimage

    assert ndimage.label(lab[0] == 1, structure=np.ones((3, 3, 3)))[1] <= 1
    r = CliRunner().invoke(app, ["predict", str(model), str(tmp_path / "in"), "-o", str(out),
                                 "--postprocess", "3:fill_holes", "--quiet"])
    assert r.exit_code != 0 and "label 3" in str(r.exception)


def test_overlay_2d_rgb(tmp_path):
    from medunet.inference.overlay import write_overlay

    img = np.random.default_rng(0).integers(0, 255, (3, 40, 50), dtype=np.uint8)
    lab = np.zeros((40, 50), np.uint8)
    lab[10:20, 10:30] = 255
    path = write_overlay(img, lab, tmp_path / "o.png", [0, 255])
    arr, _ = read_image(path)
    assert arr.shape[0] in (3, 4) and arr.shape[1] > 100


# ---------------------------------------------------------------- crop + resample at inference


class _SignNet(torch.nn.Module):
    """Logits ``[-x, x]``: class 1 exactly where the (unnormalised) image is positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)


def _geometry_plan(**preprocessing) -> Plan:
    prep = {"crop_nonzero": True, "resample": True, "image_order": 3, "label_mode": "nearest",
            "separate_z": 2, **preprocessing}
    return Plan(dataset_name="t", dim=3, in_channels=1, channel_names=["MRI"], label_names=["bg", "box"],
                label_values=[0, 1], spacing=[1.0, 1.0, 1.5], median_shape=[24, 24, 16],
                normalization=[{"scheme": "none"}], patch_size=[24, 24, 16], batch_size=2,
                network={"preset": "default"}, inference={"overlap": 0.5}, preprocessing=prep)


def _box_volume() -> tuple[np.ndarray, np.ndarray]:
    """A body of -1 inside a zero margin (cropped away) holding a box of +1 (the object)."""
    vol = np.zeros((40, 36, 12), np.float32)
    vol[4:36, 3:33, 1:11] = -1.0
    box = np.zeros(vol.shape, np.uint8)
    box[12:28, 10:26, 3:9] = 1
    vol[box == 1] = 1.0
    return vol, box


def _check_box(pred: np.ndarray, box: np.ndarray) -> None:
    from scipy import ndimage

    inside = ndimage.binary_erosion(box == 1)
    outside = ~ndimage.binary_dilation(box == 1)
    assert pred[inside].min() == 1 and pred[outside].max() == 0  # exact away from the boundary
    dice = 2 * np.sum((pred == 1) & (box == 1)) / (np.sum(pred == 1) + np.sum(box == 1))
    assert dice >= 0.97, dice


def test_predictor_crops_resamples_and_reverts_nifti(tmp_path):
    vol, box = _box_volume()
    spacing = np.array([0.7, 0.9, 3.0])
    c, s = np.cos(0.5), np.sin(0.5)
    tilt = np.array([[1, 0, 0], [0, 0.6, -0.8], [0, 0.8, 0.6]])
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ tilt
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing
    affine[:3, 3] = [12.0, -30.0, 7.5]
    src = tmp_path / "in" / "rot_0000.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(vol, affine), str(src))
    pred = Predictor(_geometry_plan(), [_SignNet()])
    image, geom = read_image(src)
    work, info, _ = pred._prepare(image, geom.spacing)
    assert info is not None and info.bbox == [[4, 36], [3, 33], [1, 11]]
    assert work.shape == (1, 22, 27, 20)  # the crop at the plan's spacing (1, 1, 1.5)

    written = pred.predict(src.parent, tmp_path / "out", save_probabilities=True, progress=False)
    out = nib.load(str(written[0]))
    assert out.shape == vol.shape
    assert np.allclose(out.affine, nib.load(str(src)).affine)
    labels = np.asarray(out.dataobj)
    _check_box(labels, box)
    probs = np.load(tmp_path / "out" / "rot.npz")["probabilities"]
    assert probs.shape == (2, *vol.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert probs[0, 0, 0, 0] == 1.0  # outside the crop box: background
    np.testing.assert_array_equal(labels, probs.argmax(0))
    # labels only (classes reverted one at a time) gives the same map
    only, none = pred.predict_array(image, probabilities=False, spacing=geom.spacing)
    assert none is None
    np.testing.assert_array_equal(only, labels)


def test_predictor_reverts_nrrd_geometry(tmp_path):
    import SimpleITK as sitk

    vol, box = _box_volume()
    img = sitk.GetImageFromArray(np.transpose(vol, (2, 1, 0)))  # (x, y, z) -> ITK's (z, y, x)
    img.SetSpacing((0.7, 0.9, 3.0))
    img.SetOrigin((-40.0, 25.0, 110.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection(tuple(np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]).ravel()))
    src = tmp_path / "vol.nrrd"
    sitk.WriteImage(img, str(src))
    pred = Predictor(_geometry_plan(), [_SignNet()])
    out = pred.predict(src, tmp_path / "out", progress=False)[0]
    assert out.name == "vol.nrrd"
    res = sitk.ReadImage(str(out))
    assert res.GetSize() == img.GetSize()
    np.testing.assert_allclose(res.GetSpacing(), img.GetSpacing())
    np.testing.assert_allclose(res.GetOrigin(), img.GetOrigin())
    np.testing.assert_allclose(res.GetDirection(), img.GetDirection())
    _check_box(np.transpose(sitk.GetArrayFromImage(res), (2, 1, 0)), box)


def test_predictor_plain_path_when_nothing_changes():
    vol, box = _box_volume()
    image = vol[None]
    pred = Predictor(_geometry_plan(crop_nonzero=False), [_SignNet()])
    work, info, _ = pred._prepare(image, (1.0, 1.005, 1.5))  # within 1 % of the plan's spacing
    assert info is None and work is image
    assert pred._prepare(image, None)[1] is None  # no spacing given: already at the plan's
    labels, _ = pred.predict_array(image, probabilities=False)
    np.testing.assert_array_equal(labels, box)
    # an old plan (no preprocessing field) never crops or resamples
    old = _geometry_plan()
    old.preprocessing = {}
    assert Predictor(old, [_SignNet()])._prepare(image, (0.7, 0.9, 3.0))[1] is None


def test_tta_auto_is_the_plans_default(tmp_path):
    model = _model_dir(tmp_path, 3)
    pred = Predictor.load(model, precision="fp32")
    assert pred.resolve_tta("auto") == "none"  # an older plan without inference.tta
    pred.plan.inference["tta"] = "flip"
    assert pred.resolve_tta("auto") == "flip" and pred.resolve_tta("none") == "none"
    vol = np.random.default_rng(3).normal(size=(1, 20, 18, 12)).astype(np.float32)
    auto, _ = pred.predict_array(vol, tta="auto")
    flip, _ = pred.predict_array(vol, tta="flip")
    np.testing.assert_array_equal(auto, flip)
    with pytest.raises(InputError, match="unknown test-time augmentation"):
        pred.predict(tmp_path, tmp_path / "o", tta="spin", progress=False)


def test_images_scaled_to_one_size_predict_at_their_own_size(tmp_path):
    from conftest import sized_dataset
    from medunet.training import train

    data = sized_dataset(tmp_path / "d", relative=True)
    model = tmp_path / "m"
    train(data, model, epochs=1, overrides={"training.iterations_per_epoch": 2}, progress=False,
          report=False)
    predictor = Predictor.load(model)
    assert predictor.plan.preprocessing["image_size"]
    for n in (150, 517):
        image = np.random.default_rng(n).integers(0, 255, (1, n, n + 7)).astype(np.float32)
        labels, probs = predictor.predict_array(image, spacing=(1.0, 1.0))
        assert labels.shape == (n, n + 7) and probs.shape == (2, n, n + 7)


def test_predict_never_overwrites_inputs_or_foreign_files(tmp_path):
    from medunet.inference.predictor import PREDICTIONS_MANIFEST

    pred = Predictor.load(_model_dir(tmp_path, 2), precision="fp32")
    imgs, gt = tmp_path / "imgs", tmp_path / "labelsTs"
    image = (np.random.default_rng(2).random((1, 20, 24)) * 255).astype(np.uint8)
    write_image(imgs / "a.png", image)  # one channel, no _0000: the label would be imgs/a.png
    original = (imgs / "a.png").read_bytes()
    with pytest.raises(InputError, match="output folder is an input folder"):
        pred.predict(imgs, imgs, progress=False)
    (tmp_path / "link").symlink_to(imgs)
    with pytest.raises(InputError, match="output folder is an input folder"):
        pred.predict(imgs / "a.png", tmp_path / "link", progress=False)
    write_image(gt / "a.png", np.ones((1, 20, 24), np.uint8))
    truth = (gt / "a.png").read_bytes()
    with pytest.raises(InputError, match="not written by medunet predict"):
        pred.predict(imgs, gt, progress=False)
    assert (imgs / "a.png").read_bytes() == original and (gt / "a.png").read_bytes() == truth
    assert not (gt / PREDICTIONS_MANIFEST).exists()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    first = pred.predict(imgs, out, save_probabilities=True, progress=False)
    again = pred.predict(imgs, out, save_probabilities=True, progress=False)  # its own files: rewritten
    assert first == again == [out / "a.png"] and (out / "a.npz").is_file()
    assert (out / "notes.txt").read_text() == "kept"
    write_image(imgs / "a_0000.png", image)  # a second input with the same case id
    with pytest.raises(InputError, match="two inputs would both write a.png"):
        pred.predict(imgs, tmp_path / "out2", progress=False)


def test_nonfinite_images_are_refused_unless_filled(tmp_path):
    from medunet.inference import fill_nonfinite

    pred = _pointwise_predictor(tmp_path, dims=3)
    vol = np.random.default_rng(3).normal(size=(1, 12, 10, 8)).astype(np.float32)
    bad = vol.copy()
    bad[0, 1, 2, 3], bad[0, 4, 4, 4] = np.nan, np.inf
    with pytest.raises(InputError, match="2 non-finite voxel"):
        pred.predict_array(bad)
    src = tmp_path / "in" / "c_0000.nii.gz"
    write_image(src, bad, Geometry.identity(3))
    with pytest.raises(InputError, match=r"c_0000.nii.gz: image has 2 non-finite"):
        pred.predict(src.parent, tmp_path / "out", progress=False)
    filled = fill_nonfinite(bad)
    assert np.isnan(bad).sum() == 1  # the caller's array is left alone
    expected = bad.copy()
    expected[~np.isfinite(bad)] = np.nanmin(np.where(np.isinf(bad), np.nan, bad))
    np.testing.assert_array_equal(filled, expected)
    (out,) = pred.predict(src.parent, tmp_path / "out", progress=False, fill_nonfinite_values=True)
    labels, _ = pred.predict_array(expected)
    np.testing.assert_array_equal(read_image(out)[0][0], labels)
    two = np.stack([vol[0], np.full(vol.shape[1:], np.nan, np.float32)])
    with pytest.raises(InputError, match="channel 1 has no finite value"):
        fill_nonfinite(two)


def test_cli_predict_fill_nonfinite(tmp_path):
    from typer.testing import CliRunner

    from medunet.cli import app

    model = _model_dir(tmp_path, 2)
    img = np.random.default_rng(4).normal(size=(1, 20, 16)).astype(np.float32)
    img[0, 3, 3] = np.nan
    import tifffile

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "c_0000.tif", img[0])  # a float 2D image
    args = ["predict", str(model), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quiet"]
    r = CliRunner().invoke(app, args)
    assert isinstance(r.exception, InputError) and "1 non-finite voxel" in str(r.exception)
    r = CliRunner().invoke(app, [*args, "--fill-nonfinite"])
    assert r.exit_code == 0, r.output
    assert read_image(tmp_path / "out" / "c.tif")[0].shape == (1, 20, 16)


def test_a_rerun_skips_finished_cases_unless_settings_change_or_overwrite(tmp_path):
    model = _model_dir(tmp_path, 2)
    pred = Predictor.load(model, precision="fp32")
    imgs, out = tmp_path / "imgs", tmp_path / "out"
    rng = np.random.default_rng(5)
    for i in range(3):
        write_image(imgs / f"c{i}.png", (rng.random((1, 20, 24)) * 255).astype(np.uint8))
    written = pred.predict(imgs, out, progress=False, tta="none")
    assert written == [out / f"c{i}.png" for i in range(3)] and pred.last_run["predicted"] == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in written}
    (out / "c1.png").unlink()  # a run stopped before this case
    assert pred.predict(imgs, out, progress=False, tta="none") == written
    assert pred.last_run == {"cases": 3, "predicted": 1, "skipped": 2, "workers": 1}
    assert all((out / n).stat().st_mtime_ns == stamps[n] for n in ("c0.png", "c2.png"))
    pred.predict(imgs, out, progress=False, tta="flip")  # other settings: nothing is reused
    assert pred.last_run["predicted"] == 3
    pred.predict(imgs, out, progress=False, tta="flip", overwrite=True)
    assert pred.last_run["predicted"] == 3
    # a Predictor built by hand has no settings to compare: it always predicts
    manual = Predictor(pred.plan, pred.members, pred.device, pred.precision, model)
    manual.predict(imgs, out, progress=False, tta="flip")
    assert manual.last_run["skipped"] == 0
    with pytest.raises(InputError, match="Predictor.load"):
        manual.predict(imgs, tmp_path / "o2", progress=False, workers=2)
    assert not (tmp_path / "o2").exists()  # refused before anything is written


def test_worker_processes_write_the_same_labels(tmp_path):
    model = _model_dir(tmp_path, 2)
    pred = Predictor.load(model, precision="fp32")
    imgs = tmp_path / "imgs"
    rng = np.random.default_rng(6)
    for i in range(3):
        write_image(imgs / f"c{i}.png", (rng.random((1, 20, 24)) * 255).astype(np.uint8))
    one = pred.predict(imgs, tmp_path / "one", progress=False)
    two = pred.predict(imgs, tmp_path / "two", progress=False, workers=2)
    assert pred.last_run["workers"] == 2
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(read_image(a)[0], read_image(b)[0])


def test_mean_dice_for_the_tta_choice():
    """Per class, the mean over cases (both empty scores 1); then the mean over classes."""
    from medunet.inference.tta import mean_dice

    ref = np.array([[0, 1, 1, 2]])
    pred = np.array([[0, 1, 0, 2]])
    # class 1: 2*1/(1+2) = 2/3 in case 1, case 2 has no 1 anywhere -> 1; class 2: 1 and 0
    empty = np.zeros((1, 4), int)
    twos = np.array([[2, 0, 0, 0]])
    got = mean_dice([pred, twos], [ref, empty], [0, 1, 2])
    assert got == pytest.approx(((2 / 3 + 1) / 2 + (1 + 0) / 2) / 2)
