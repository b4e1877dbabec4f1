"""Importing nnU-Net v2 models (medunet.nnunet), on small nnU-Net-style folders the tests write.

No nnU-Net is installed: the tests spell nnU-Net's state-dict names and shapes themselves (the
layout of dynamic_network_architectures 0.4: ``encoder.stages.S.0.convs.I.conv/norm``, residual
``blocks.B.conv1/conv2/skip``, the decoder's ``transpconvs``/``stages``/``seg_layers``, and the
duplicates under ``all_modules`` and ``decoder.encoder``) and run a plain functional forward
pass over that state dict as the reference.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes
from typer.testing import CliRunner

from medunet.cli import app
from medunet.errors import InputError
from medunet.inference import Predictor
from medunet.nnunet import import_nnunet, is_nnunet_folder
from medunet.nnunet.checkpoint import medunet_name, permute_kernel
from medunet.nnunet.plans import axis_map, normalization
from medunet.preprocessing.normalize import normalize
from medunet.preprocessing.pipeline import auto_separate_z, prepare_geometry

CLS = "dynamic_network_architectures.architectures.unet."


def arch_kwargs(dims: int, encoder: str = "plain") -> dict:
    """A small nnU-Net architecture: 3 stages, anisotropic first kernel and stride in 3D."""
    if dims == 3:
        kernels, strides = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    else:
        kernels, strides = [[3, 3], [3, 3], [3, 3]], [[1, 1], [2, 2], [2, 2]]
    kw = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
          "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage_decoder": [1, 2], "conv_bias": True,
          "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
          "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
          "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    if encoder == "residual":
        kw["n_blocks_per_stage"] = [1, 2, 3]
    else:
        kw["n_conv_per_stage"] = [2, 1, 3]
    return kw


def _conv_norm(sd: dict, prefix: str, cin: int, cout: int, kernel: list[int], gen: torch.Generator,
               bias: bool = True) -> None:
    """nnU-Net's ConvDropoutNormReLU: conv + norm, each also under all_modules.0 / .1."""
    w = torch.randn(cout, cin, *kernel, generator=gen) * 0.4
    nw, nb = 1 + 0.1 * torch.randn(cout, generator=gen), 0.1 * torch.randn(cout, generator=gen)
    sd[f"{prefix}.conv.weight"] = sd[f"{prefix}.all_modules.0.weight"] = w
    if bias:
        b = 0.1 * torch.randn(cout, generator=gen)
        sd[f"{prefix}.conv.bias"] = sd[f"{prefix}.all_modules.0.bias"] = b
    sd[f"{prefix}.norm.weight"] = sd[f"{prefix}.all_modules.1.weight"] = nw
    sd[f"{prefix}.norm.bias"] = sd[f"{prefix}.all_modules.1.bias"] = nb


def nnunet_state_dict(kw: dict, in_ch: int, classes: int, encoder: str, seed: int = 0) -> dict:
    """Random weights under nnU-Net's names and shapes for the architecture ``kw``."""
    gen = torch.Generator().manual_seed(seed)
    f, k, st = kw["features_per_stage"], kw["kernel_sizes"], kw["strides"]
    sd: dict[str, torch.Tensor] = {}
    if encoder == "plain":
        cin = in_ch
        for s, n in enumerate(kw["n_conv_per_stage"]):
            for i in range(n):
                _conv_norm(sd, f"encoder.stages.{s}.0.convs.{i}", cin if i == 0 else f[s], f[s], k[s], gen)
            cin = f[s]
    else:
        _conv_norm(sd, "encoder.stem.convs.0", in_ch, f[0], k[0], gen)
        for s, n in enumerate(kw["n_blocks_per_stage"]):
            for b in range(n):
                cin = f[max(0, s - 1)] if b == 0 else f[s]
                p = f"encoder.stages.{s}.blocks.{b}"
                _conv_norm(sd, f"{p}.conv1", cin, f[s], k[s], gen)
                _conv_norm(sd, f"{p}.conv2", f[s], f[s], k[s], gen)
                if b == 0 and cin != f[s]:
                    j = 1 if max(st[s]) > 1 else 0
                    _conv_norm(sd, f"{p}.skip.{j}", cin, f[s], [1] * len(k[s]), gen, bias=False)
    for key in list(sd):  # the decoder keeps a reference to the encoder
        sd[f"decoder.{key}"] = sd[key]
    depth = len(f) - 1
    for i in range(depth):
        lo, hi = f[depth - i - 1], f[depth - i]
        sd[f"decoder.transpconvs.{i}.weight"] = torch.randn(hi, lo, *st[depth - i], generator=gen) * 0.3
        sd[f"decoder.transpconvs.{i}.bias"] = 0.1 * torch.randn(lo, generator=gen)
        for c in range(kw["n_conv_per_stage_decoder"][i]):
            cin = 2 * lo if c == 0 else lo
            _conv_norm(sd, f"decoder.stages.{i}.convs.{c}", cin, lo, k[depth - i - 1], gen)
        sd[f"decoder.seg_layers.{i}.weight"] = torch.randn(classes, lo, *[1] * len(k[0]), generator=gen) * 0.3
        sd[f"decoder.seg_layers.{i}.bias"] = 0.1 * torch.randn(classes, generator=gen)
    return sd


def reference_forward(sd: dict, kw: dict, x: torch.Tensor, encoder: str) -> torch.Tensor:
    """nnU-Net's forward pass written out with torch.nn.functional over its state dict (full
    resolution logits), in nnU-Net's own axis order."""
    dims = x.ndim - 2
    conv = {2: F.conv2d, 3: F.conv3d}[dims]
    convt = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[dims]

    def cnr(x, p, stride=1, act=True):
        w = sd[f"{p}.conv.weight"]
        x = conv(x, w, sd.get(f"{p}.conv.bias"), stride=stride, padding=[(a - 1) // 2 for a in w.shape[2:]])
        x = F.instance_norm(x, weight=sd[f"{p}.norm.weight"], bias=sd[f"{p}.norm.bias"], eps=1e-5)
        return F.leaky_relu(x, 0.01) if act else x

    skips = []
    if encoder == "plain":
        for s, n in enumerate(kw["n_conv_per_stage"]):
            for i in range(n):
                x = cnr(x, f"encoder.stages.{s}.0.convs.{i}", kw["strides"][s] if i == 0 else 1)
            skips.append(x)
    else:
        x = cnr(x, "encoder.stem.convs.0")
        for s, n in enumerate(kw["n_blocks_per_stage"]):
            for b in range(n):
                p, stride = f"encoder.stages.{s}.blocks.{b}", kw["strides"][s] if b == 0 else [1] * dims
                res = pool(x, stride, stride) if max(stride) > 1 else x
                j = 1 if max(stride) > 1 else 0
                if f"{p}.skip.{j}.conv.weight" in sd:
                    res = cnr(res, f"{p}.skip.{j}", act=False)
                x = F.leaky_relu(cnr(cnr(x, f"{p}.conv1", stride), f"{p}.conv2", act=False) + res, 0.01)
            skips.append(x)
    x = skips[-1]
    depth = len(skips) - 1
    for i in range(depth):
        w = sd[f"decoder.transpconvs.{i}.weight"]
        x = convt(x, w, sd[f"decoder.transpconvs.{i}.bias"], stride=list(w.shape[2:]))
        x = torch.cat([x, skips[depth - i - 1]], 1)
        for c in range(kw["n_conv_per_stage_decoder"][i]):
            x = cnr(x, f"decoder.stages.{i}.convs.{c}")
    return conv(x, sd[f"decoder.seg_layers.{depth - 1}.weight"], sd[f"decoder.seg_layers.{depth - 1}.bias"])


def write_result_folder(root: Path, dims: int = 3, encoder: str = "plain", folds=(0,),
                        reader: str | None = None, schemes=("ZScoreNormalization",), mask=(False,),
                        patch=None, spacing=None, mirror=(0, 1, 2),
                        configuration: str | None = None, classes: int = 3,
                        volume_spacing: list[float] | None = None) -> tuple[Path, dict, dict]:
    """An nnU-Net result folder with random weights; returns it, the state dicts by fold, the kwargs.
    ``volume_spacing`` (z, y, x) with ``dims=2``: a 2d configuration of 3D data."""
    configuration = configuration or ("3d_fullres" if dims == 3 else "2d")
    folder = root / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    kw = arch_kwargs(dims, encoder)
    n_ch = len(schemes)
    patch = patch or ([8, 16, 16] if dims == 3 else [16, 16])
    spacing = spacing or ([2.0, 1.0, 1.0] if dims == 3 else [1.0, 1.0])
    config = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
              "patch_size": patch, "median_image_size_in_voxels": [float(p) for p in patch],
              "spacing": spacing,
              "normalization_schemes": list(schemes), "use_mask_for_norm": list(mask),
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                            "force_separate_z": None},
              "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                           "force_separate_z": None},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                     "force_separate_z": None},
              "architecture": {"network_class_name": CLS + ("ResidualEncoderUNet" if encoder == "residual"
                                                            else "PlainConvUNet"),
                               "arch_kwargs": kw, "_kw_requires_import": ["conv_op", "norm_op", "nonlin"]},
              "batch_dice": True}
    volume = dims == 3 or volume_spacing is not None
    plans = {"dataset_name": "Dataset009_Test", "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": (volume_spacing or spacing) if volume
             else [999.0, *spacing],
             "original_median_shape_after_transp": patch if dims == 3 else [5 if volume else 1, *patch],
             "image_reader_writer": reader or ("SimpleITKIO" if volume else "NaturalImage2DIO"),
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {configuration: config}, "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {
                 str(c): {"max": 900.0, "mean": 100.0, "median": 90.0, "min": -50.0, "percentile_00_5": -10.0,
                          "percentile_99_5": 400.0, "std": 50.0} for c in range(n_ch)}}
    labels = {"background": 0, **{f"class{c}": c for c in range(1, classes)}}
    dataset = {"channel_names": {str(c): f"ch{c}" for c in range(n_ch)},
               "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    sds = {}
    for f in folds:
        sd = nnunet_state_dict(kw, n_ch, classes, encoder, seed=len(sds))
        (folder / f"fold_{f}").mkdir()
        ckpt = {"network_weights": sd, "optimizer_state": {"state": {}, "param_groups": []},
                "grad_scaler_state": None, "_best_ema": np.float64(0.5), "current_epoch": 3,
                "logging": {"mean_fg_dice": [np.float32(0.4), np.float64(0.5)], "lrs": [0.01]},
                "init_args": {"configuration": configuration, "fold": f}, "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": None if mirror is None else tuple(mirror)}
        torch.save(ckpt, folder / f"fold_{f}" / "checkpoint_final.pth")
        sds[f] = sd
    return folder, sds, kw


def _to_nnunet_axes(t: torch.Tensor) -> torch.Tensor:
    """medunet's (x, y, z) -> SimpleITK's (z, y, x) on a (N, C, *S) tensor (and back)."""
    return t.permute(0, 1, *range(t.ndim - 1, 1, -1))


# --------------------------------------------------------------------------- network and weights


@pytest.mark.parametrize("encoder", ["plain", "residual"])
def test_weights_map_exactly_and_logits_equal_the_reference(tmp_path, encoder):
    folder, sds, kw = write_result_folder(tmp_path, 3, encoder)
    model = import_nnunet(folder, tmp_path / "model")
    pred = Predictor.load(model, precision="fp32")
    net = pred.nets[0]
    state = net.state_dict()
    used = 0
    for key, value in sds[0].items():  # every nnU-Net weight lands, permuted, under its medunet name
        name = medunet_name(key)
        if name is None:
            continue
        used += 1
        assert torch.equal(state[name], permute_kernel(value, 3, [2, 1, 0])), key
    assert used == sum(1 for k in state if not k.endswith("num_batches_tracked"))
    # nnU-Net's patch [8, 16, 16] in (z, y, x) is medunet's (x, y, z) [16, 16, 8]
    assert pred.plan.patch_size == [16, 16, 8] and pred.plan.spacing == [1.0, 1.0, 2.0]
    x = torch.randn(1, 1, 16, 16, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = net(x)
        ref = reference_forward(sds[0], kw, _to_nnunet_axes(x), encoder)
    torch.testing.assert_close(ours, _to_nnunet_axes(ref), atol=1e-4, rtol=1e-4)


def test_2d_natural_images_keep_their_axes_and_the_mirror_axes_map(tmp_path):
    folder, sds, kw = write_result_folder(tmp_path, 2, "residual", mirror=(1,))
    pred = Predictor.load(import_nnunet(folder, tmp_path / "m"), precision="fp32")
    assert pred.plan.dim == 2 and pred.plan.inference["mirror_axes"] == [1]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pred.nets[0](x), reference_forward(sds[0], kw, x, "residual"),
                                   atol=1e-4, rtol=1e-4)
    # SimpleITK's 3D arrays are (z, y, x): the network axes are medunet's reversed
    assert axis_map("SimpleITKIO", 3, [0, 1, 2], Path("p")) == [2, 1, 0]
    assert axis_map("SimpleITKIO", 3, [2, 0, 1], Path("p")) == [0, 2, 1]
    assert axis_map("NaturalImage2DIO", 2, [0, 1, 2], Path("p")) == [0, 1]


# --------------------------------------------------------------------------- preprocessing


def test_normalisation_schemes_match_hand_computed_values():
    img = np.zeros((1, 6, 6), np.float32)
    img[0, 1:5, 1:5] = [[1, 2, 3, 4], [5, 0, 0, 8], [9, 0, 0, 12], [13, 14, 15, 16]]  # a ring with a hole
    plans = {"foreground_intensity_properties_per_channel": {"0": {
        "percentile_00_5": 2.0, "percentile_99_5": 10.0, "mean": 6.0, "std": 2.0}}}
    x = img[0]

    def scheme(name, masked=False):
        cfg = {"normalization_schemes": [name], "use_mask_for_norm": [masked]}
        return normalize(img, normalization(cfg, plans, 1, Path("plans.json")))[0]

    np.testing.assert_allclose(scheme("ZScoreNormalization"), (x - x.mean()) / x.std(), rtol=1e-5, atol=1e-6)
    # nnU-Net's mask: non-zero voxels with the holes filled; inside it every voxel (the 4 hole
    # zeros too) is normalised with the statistics of the 16 voxels, outside it stays 0
    inside = np.zeros((6, 6), bool)
    inside[1:5, 1:5] = True
    vals = x[inside]
    want = np.where(inside, (x - vals.mean()) / vals.std(), 0.0)
    np.testing.assert_allclose(scheme("ZScoreNormalization", True), want, rtol=1e-5, atol=1e-6)
    assert binary_fill_holes(x != 0).sum() == 16
    np.testing.assert_allclose(scheme("CTNormalization"), (np.clip(x, 2, 10) - 6.0) / 2.0, atol=1e-6)
    np.testing.assert_allclose(scheme("RescaleTo01Normalization"), x / 16.0, atol=1e-6)
    np.testing.assert_allclose(scheme("RGBTo0_1Normalization"), x / 255.0, atol=1e-7)
    np.testing.assert_array_equal(scheme("NoNormalization"), x)
    with pytest.raises(InputError, match="MagicNormalization"):
        normalization({"normalization_schemes": ["MagicNormalization"]}, plans, 1, Path("plans.json"))


def test_anisotropic_resampling_matches_hand_computed_values(tmp_path):
    assert auto_separate_z([1, 1, 4], [1, 1, 2]) == 2  # the case is anisotropic: its thick axis
    assert auto_separate_z([1, 1, 1], [1, 1, 3.5]) == 2  # else the target's
    assert auto_separate_z([1, 1, 2], [1, 1, 1]) is None  # neither
    assert auto_separate_z([4, 4, 1], [4, 4, 1]) is None  # two axes share the coarsest spacing
    folder, _, _ = write_result_folder(tmp_path, 3, spacing=[2.0, 1.0, 1.0], schemes=("NoNormalization",))
    plan = Predictor.load(import_nnunet(folder, tmp_path / "m"), precision="fp32").plan
    # 3 slices of 4 mm -> 6 of 2 mm along z with order 0: each output slice takes the input slice
    # holding its centre, (j + 0.5) * 3 / 6 -> 0 0 1 1 2 2; in-plane (1 mm, unchanged) untouched
    img = np.stack([np.full((5, 5), v, np.float32) for v in (10, 20, 40)], axis=-1)[None]
    out, info = prepare_geometry(img, [1.0, 1.0, 4.0], plan, normalise=True)
    assert info.separate_z == 2 and out.shape == (1, 5, 5, 6)
    np.testing.assert_array_equal(out[0, 2, 2], [10, 10, 20, 20, 40, 40])
    # in-plane cubic up-sampling of a step overshoots; clipped to each slice's range as
    # scikit-image's resize does, only along the thin axes
    step = np.full((1, 6, 6, 2), 10.0, np.float32)
    step[0, 3:] = 100.0
    step[0, ..., 1] *= 0.5
    out, info = prepare_geometry(step, [2.0, 2.0, 8.0], plan, normalise=True)  # 8 mm slices: apart
    assert info.separate_z == 2 and out.shape == (1, 12, 12, 8)
    assert out[0, ..., :4].min() >= 10.0 and out[0, ..., :4].max() <= 100.0
    assert out[0, ..., 4:].min() >= 5.0 and out[0, ..., 4:].max() <= 50.0  # slice 1's own range
    plan.preprocessing["clip_resampled"] = False
    raw, _ = prepare_geometry(step, [2.0, 2.0, 8.0], plan, normalise=True)
    assert raw.max() > 100.0 + 1e-3 and raw.min() < 5.0 - 1e-3  # the overshoot the clip removes


def test_normalisation_happens_before_resampling(tmp_path):
    folder, _, _ = write_result_folder(tmp_path, 3, spacing=[2.0, 1.0, 1.0], schemes=("CTNormalization",))
    plan = Predictor.load(import_nnunet(folder, tmp_path / "m"), precision="fp32").plan
    img = np.random.default_rng(0).uniform(-100, 600, (1, 6, 6, 3)).astype(np.float32)
    out, _ = prepare_geometry(img, [1.0, 1.0, 4.0], plan, normalise=True)
    # clipped to [-10, 400] before resampling: the result stays within the clipped, scaled range
    lo, hi = (-10 - 100) / 50, (400 - 100) / 50
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5


# --------------------------------------------------------------------------- prediction


def test_prediction_equals_nnunets_steps_written_out(tmp_path):
    """One window: crop to non-zero, z-score, centre padding to the patch, logits averaged over
    the allowed mirrors and the two folds, argmax, un-crop."""
    folder, sds, kw = write_result_folder(tmp_path, 3, folds=(0, 1), mirror=(1, 2))
    pred = Predictor.load(import_nnunet(folder, tmp_path / "m"), precision="fp32", postprocess="none")
    assert len(pred.members) == 2 and pred.plan.inference["average"] == "logits"
    rng = np.random.default_rng(1)
    img = np.zeros((1, 16, 14, 9), np.float32)
    img[0, 2:15, 1:12, 1:7] = rng.normal(50, 10, (13, 11, 6))  # cropped to 13 x 11 x 6 < patch 16 x 16 x 8
    labels, probs = pred.predict_array(img, tta="flip", spacing=[1.0, 1.0, 2.0])

    crop = img[:, 2:15, 1:12, 1:7]
    x = torch.from_numpy((crop - crop.mean()) / crop.std()).float()[None]
    pads = [(16 - 13) // 2, 16 - 13 - (16 - 13) // 2, (16 - 11) // 2, 16 - 11 - (16 - 11) // 2, 1, 1]
    xp = F.pad(x, [pads[4], pads[5], pads[2], pads[3], pads[0], pads[1]])
    total = 0
    for sd in sds.values():
        # mirror axes (1, 2) are nnU-Net's (y, x): medunet's y and x, i.e. axes 1 and 0 here
        for flip in [(), (2,), (3,), (2, 3)]:
            xin = torch.flip(xp, flip) if flip else xp
            with torch.no_grad():
                y = _to_nnunet_axes(reference_forward(sd, kw, _to_nnunet_axes(xin), "plain"))
            total = total + (torch.flip(y, flip) if flip else y)
    logits = (total / 8)[0, :, pads[0]:pads[0] + 13, pads[2]:pads[2] + 11, pads[4]:pads[4] + 6]
    want = np.zeros(img.shape[1:], np.uint8)
    want[2:15, 1:12, 1:7] = logits.argmax(0).numpy()
    assert (labels == want).mean() > 0.999
    np.testing.assert_allclose(probs[:, 3, 3, 3], torch.softmax(logits[:, 1, 2, 2], 0).numpy(), atol=1e-4)
    assert np.allclose(probs[:, 0, 0, 0], [1, 0, 0])  # outside the crop: background


# --------------------------------------------------------------------------- errors and the CLI


def test_bad_folders_are_one_line_errors_naming_the_file(tmp_path):
    folder, sds, _ = write_result_folder(tmp_path, 3)
    with pytest.raises(InputError, match="fold_3") as e:
        import_nnunet(folder, tmp_path / "a", folds=[3])
    assert "checkpoint_final.pth" in str(e.value) and "\n" not in str(e.value)
    plans = json.loads((folder / "plans.json").read_text())
    del plans["configurations"]["3d_fullres"]["architecture"]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(InputError, match="plans.json.*version"):
        import_nnunet(folder, tmp_path / "b")
    plans["configurations"]["3d_fullres"]["architecture"] = {"network_class_name": "my.nets.FancyNet",
                                                             "arch_kwargs": {}}
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(InputError, match="FancyNet"):
        import_nnunet(folder, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing half-written


def test_a_checkpoint_that_does_not_match_its_plan_is_refused(tmp_path):
    folder, sds, _ = write_result_folder(tmp_path, 3)
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["network_weights"]["decoder.seg_layers.1.weight"] = torch.zeros(3, 5, 1, 1, 1)
    torch.save(ckpt, path)
    with pytest.raises(InputError, match="seg_layers.1.weight.*shape") as e:
        import_nnunet(folder, tmp_path / "m")
    assert "checkpoint_final.pth" in str(e.value)
    del ckpt["network_weights"]["decoder.seg_layers.1.weight"]
    torch.save(ckpt, path)
    with pytest.raises(InputError, match="lacks 1 weight"):
        import_nnunet(folder, tmp_path / "m")


class _Payload:
    """A pickled object whose unpickling would run code: must never be loaded."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoints_are_read_without_unpickling_code(tmp_path, capsys):
    folder, _, _ = write_result_folder(tmp_path, 3)
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["init_args"]["evil"] = _Payload()
    torch.save(ckpt, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(InputError, match="safely"):
        import_nnunet(folder, tmp_path / "m")
    assert "unpickled!" not in capsys.readouterr().out


def test_cli_imports_several_folds_and_predicts_a_result_folder_directly(tmp_path):
    import nibabel as nib

    folder, _, _ = write_result_folder(tmp_path / "results", 3, folds=(0, 1))
    assert is_nnunet_folder(folder)
    runner = CliRunner()
    res = runner.invoke(app, ["import-nnunet", str(folder), "-o", str(tmp_path / "ens"), "--folds", "0,1"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "ens").glob("fold_*")) == ["fold_0", "fold_1"]
    bad = subprocess.run([sys.executable, "-m", "medunet.cli", "import-nnunet", str(folder), "-o",
                          str(tmp_path / "x"), "--folds", "0", "7"], capture_output=True, text=True)
    assert bad.returncode == 2 and "fold_7" in bad.stderr and len(bad.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "x").exists()
    from medunet.cli import optional_values

    assert optional_values(["import-nnunet", "R", "--folds", "0", "1", "all", "-o", "M"]) == [
        "import-nnunet", "R", "--folds", "0,1,all", "-o", "M"]
    images = tmp_path / "imgs"
    images.mkdir()
    vol = np.random.default_rng(0).normal(size=(20, 18, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(images / "case_0000.nii.gz"))
    res = runner.invoke(app, ["predict", str(folder), str(images), "-o", str(tmp_path / "out"), "--quiet",
                              "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert "--backend openvino" in " ".join(res.output.split())  # the faster CPU backend, named
    seg = nib.load(str(tmp_path / "out" / "case.nii.gz"))
    assert seg.shape == vol.shape and set(np.unique(seg.get_fdata())) <= {0, 1, 2}


def test_an_imported_model_exports_serves_and_distils_like_a_trained_one(tmp_path):
    from fastapi.testclient import TestClient

    from medunet.datasets.synthetic import make_synthetic_dataset
    from medunet.export import export_model
    from medunet.serve import create_app
    from medunet.training.distill import distill

    data = make_synthetic_dataset(tmp_path / "Dataset007_Syn", n_train=6, n_test=2, shape=(24, 20, 12))
    folder, _, _ = write_result_folder(tmp_path / "results", 3, classes=2, spacing=[1.5, 1.0, 1.0],
                                       patch=[8, 16, 16])
    model = import_nnunet(folder, tmp_path / "model")
    res = export_model(model, "onnx")  # checked against PyTorch by the exporter
    assert res.path.is_file() and res.check["random"]["max_abs_diff"] < 1e-3
    onnx_pred = Predictor.load(model, backend="onnx")
    torch_pred = Predictor.load(model, precision="fp32")
    image = np.random.default_rng(2).normal(size=(1, 24, 20, 12)).astype(np.float32)
    a, _ = onnx_pred.predict_array(image, tta="none", spacing=[1.0, 1.0, 1.5], probabilities=False)
    b, _ = torch_pred.predict_array(image, tta="none", spacing=[1.0, 1.0, 1.5], probabilities=False)
    assert (a == b).mean() > 0.999
    if importlib.util.find_spec("openvino") is not None:  # the fastest CPU backend, same export
        c, _ = Predictor.load(model, backend="openvino", precision="fp32").predict_array(
            image, tta="none", spacing=[1.0, 1.0, 1.5], probabilities=False)
        assert (c == b).mean() > 0.999
    client = TestClient(create_app(torch_pred))
    assert client.get("/api/model").status_code == 200
    student = distill(model, tmp_path / "student", data, width=0.5, init="random", epochs=1, progress=False,
                      precision="fp32")
    assert (tmp_path / "student" / "checkpoint_best.pt").is_file() and student is not None


def test_a_2d_configuration_of_3d_data_runs_slice_by_slice(tmp_path):
    """nnU-Net's 2d configuration of a volume: a 2D network on each (y, x) slice, the slice
    spacing of every case kept; medunet runs it as a 3D network with kernel 1 across slices."""
    folder, sds, kw = write_result_folder(tmp_path, 2, configuration="2d", volume_spacing=[3.0, 1.0, 1.0],
                                          mirror=(0, 1))
    pred = Predictor.load(import_nnunet(folder, tmp_path / "m"), precision="fp32", postprocess="none")
    plan = pred.plan
    # SimpleITK's (z, y, x): the slice axis z is medunet's axis 2
    assert plan.dim == 3 and plan.configuration == "2d" and plan.patch_size == [16, 16, 1]
    assert plan.preprocessing["keep_spacing_axes"] == [2] and plan.inference["mirror_axes"] == [0, 1]
    img = np.random.default_rng(4).normal(5, 2, (1, 16, 16, 4)).astype(np.float32)
    labels, _ = pred.predict_array(img, tta="flip", spacing=[1.0, 1.0, 3.7], probabilities=False)  # kept
    x = (img - img.mean()) / img.std()
    want = np.zeros(img.shape[1:], np.uint8)
    for z in range(img.shape[3]):
        sl = torch.from_numpy(x[0, :, :, z].T.copy())[None, None]  # nnU-Net's (y, x) slice
        total = 0
        for flip in [(), (2,), (3,), (2, 3)]:
            xin = torch.flip(sl, flip) if flip else sl
            with torch.no_grad():
                y = reference_forward(sds[0], kw, xin, "plain")
            total = total + (torch.flip(y, flip) if flip else y)
        want[:, :, z] = total[0].argmax(0).numpy().T
    assert (labels == want).mean() > 0.999
