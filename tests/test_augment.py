"""Augmentation keeps image and label aligned; probability 0 is the identity; 2D and 3D.

Alignment is checked exactly: a label-coded image resampled with the label's own (nearest)
rule must equal the label voxel for voxel, and a coordinate-ramp image resampled linearly must
read within half a voxel of where the label was read.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from medunet.augment import augment_batch, default_augmentation, flip_rot90, validate_augmentation
from medunet.augment.config import anisotropic_axis
from medunet.augment.filters import gaussian_blur, resize_linear
from medunet.augment.spatial import elastic_field, resample_sample
from medunet.errors import InputError

SPATIAL = ["flip", "rot90", "rotation", "scaling", "elastic"]
INTENSITY = ["gamma", "brightness", "contrast", "noise", "blur", "lowres"]


def _checker(shape):
    grids = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    idx = sum(g // 3 for g in grids) % 2
    # a label with an asymmetric marker so flips and rotations are all distinguishable
    lab = idx.clone()
    lab[(0,) * len(shape)] = 2
    return lab


def _only(name: str, **settings) -> dict:
    """A config with one transform at p = 1 (strong enough to change a small patch)."""
    if name in ("flip", "rot90"):
        return {name: 1.0}
    extra = {"elastic": {"alpha": 300.0, "sigma": 4.0}}.get(name, {})
    return {name: {"p": 1.0, **extra, **settings}}


def _all_spatial() -> dict:
    return {"flip": 0.5, "rot90": 0.5, "rotation": {"p": 1.0}, "scaling": {"p": 1.0},
            "elastic": {"p": 1.0, "alpha": 300.0, "sigma": 4.0}}


def _ramp_case(shape, batch=3):
    """Image channels = voxel coordinates; label = flat voxel index (decodes to the coordinates)."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    image = torch.stack(grids)[None].repeat(batch, 1, *[1] * len(shape))
    flat = torch.arange(math.prod(shape)).view(shape)
    return image, flat[None].repeat(batch, *[1] * len(shape))


def _decode(flat, shape):
    out = []
    for j in range(len(shape)):
        div = math.prod(shape[j + 1:])
        out.append((flat // div) % shape[j])
    return out


# ---------------------------------------------------------------------------------------- old API

def test_flip_rot90_keeps_alignment_2d_and_3d():
    for shape in [(12, 12), (6, 8, 8)]:
        labels = torch.stack([_checker(shape) for _ in range(8)])
        images = torch.stack([labels.float() * 10 + 1, labels.float() * -3], dim=1)
        gen = torch.Generator().manual_seed(1)
        img, lab = flip_rot90(images, labels, 1.0, 1.0, gen)
        assert img.shape == images.shape and lab.shape == labels.shape
        assert torch.equal(((img[:, 0] - 1) / 10).round().long(), lab)
        assert torch.equal(img[:, 1], lab.float() * -3)
        assert not torch.equal(lab, labels)


def test_rot90_only_in_square_planes():
    labels = torch.zeros(4, 6, 10, dtype=torch.long)
    img, lab = flip_rot90(labels[:, None].float(), labels, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert lab.shape == (4, 6, 10)


# ------------------------------------------------------------------------------------- alignment

@pytest.mark.parametrize("name", [*SPATIAL, "all"])
@pytest.mark.parametrize("shape", [(20, 20), (9, 12, 12)])
def test_spatial_transform_keeps_image_and_label_aligned(name, shape):
    labels = torch.stack([_checker(shape) for _ in range(4)]).to(torch.uint8)
    images = torch.stack([labels.float() * 10 + 1, labels.float() * -3], dim=1)
    config = _all_spatial() if name == "all" else _only(name)
    img, lab = augment_batch(images, labels, config, torch.Generator().manual_seed(3), image_mode="nearest")
    assert img.shape == images.shape and lab.shape == labels.shape and lab.dtype == torch.uint8
    assert torch.equal(img[:, 0], lab.float() * 10 + 1)
    assert torch.equal(img[:, 1], lab.float() * -3)
    assert not torch.equal(lab, labels)
    assert set(lab.unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("shape", [(30, 22), (9, 16, 12), (1, 16, 20)])
def test_linear_image_reads_where_the_label_reads(shape):
    image, flat = _ramp_case(shape)
    img, lab = augment_batch(image, flat, _all_spatial(), torch.Generator().manual_seed(5))
    assert not torch.equal(lab, flat)
    for j, coord in enumerate(_decode(lab, shape)):
        # bilinear of a ramp is the position itself; nearest is that position rounded
        assert (img[:, j] - coord.float()).abs().max() <= 0.5 + 1e-3


def _theta(matrix: torch.Tensor, shape) -> torch.Tensor:
    """Reference: the voxel-space matrix as an affine_grid theta (align_corners=False)."""
    half = torch.tensor([s / 2 for s in shape], dtype=torch.float64)
    theta = (matrix * half[None, :] / half[:, None]).flip(0).flip(1)
    return torch.cat([theta, torch.zeros(len(shape), 1, dtype=theta.dtype)], 1).float()[None]


@pytest.mark.parametrize("shape", [(21, 34), (11, 14, 9)])
def test_resampling_matches_torch_grid_sample(shape):
    """Our slab-wise (3D: tiled 2D) resampler equals grid_sample with reflection padding."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, *shape, generator=gen)
    n = len(shape)
    matrix = torch.eye(n, dtype=torch.float64) * 0.8
    matrix += torch.rand(n, n, generator=gen, dtype=torch.float64) * 0.6
    out, _ = resample_sample(image, torch.zeros(shape, dtype=torch.long), matrix)
    grid = F.affine_grid(_theta(matrix, shape), [1, 2, *shape], align_corners=False)
    ref = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    assert torch.allclose(out, ref, atol=2e-4)


def test_rotation_is_rigid_on_a_non_square_patch():
    shape = (40, 24)
    image, flat = _ramp_case(shape, batch=4)
    config = {"rotation": {"p": 1.0, "degrees": 180}}
    img, _ = augment_batch(image, flat, config, torch.Generator().manual_seed(2))
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(1, 2, 1, 1)
    out_r = (image - centre).norm(dim=1)
    src_r = (img - centre).norm(dim=1)
    inside = out_r < 10.5  # these read from inside the patch (no mirroring)
    assert (src_r - out_r)[inside].abs().max() < 1e-3  # distances to the centre kept: no shear
    assert (img - image)[:, :, inside[0]].abs().max() > 2  # and it did turn


@pytest.mark.parametrize("shape", [(16, 24), (8, 12, 10)])
def test_scaling_is_about_the_centre(shape):
    image, flat = _ramp_case(shape, batch=2)
    img, _ = augment_batch(image, flat, {"scaling": {"p": 1.0, "range": [2.0, 2.0]}},
                           torch.Generator().manual_seed(0))
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(1, -1, *[1] * len(shape))
    assert torch.allclose(img, centre + (image - centre) / 2, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 16, 16), (4, 24, 24)])
def test_slice_stacks_are_transformed_in_plane_only(shape):
    assert anisotropic_axis(shape) == 0
    image, flat = _ramp_case(shape)
    config = {"rotation": {"p": 1.0}, "scaling": {"p": 1.0}, "elastic": {"p": 1.0, "alpha": 300, "sigma": 4}}
    img, lab = augment_batch(image, flat, config, torch.Generator().manual_seed(1))
    assert torch.allclose(img[:, 0], image[:, 0], atol=1e-4)  # every voxel stays in its slice
    assert torch.equal(_decode(lab, shape)[0], _decode(flat, shape)[0])
    assert not torch.equal(lab, flat)


# ------------------------------------------------------------------------------ identity and seeds

def _zero_config(dim, patch):
    cfg = default_augmentation(dim, patch)
    return {k: ({**v, "p": 0.0} if isinstance(v, dict) else 0.0) for k, v in cfg.items()}


@pytest.mark.parametrize("shape", [(16, 16), (6, 10, 8)])
def test_probability_zero_is_identity(shape):
    labels = torch.stack([_checker(shape) for _ in range(4)])
    images = torch.randn(4, 2, *shape)
    for config in ({}, None, {"flip": 0.0, "rot90": 0.0}, _zero_config(len(shape), list(shape))):
        img, lab = augment_batch(images, labels, config, torch.Generator().manual_seed(0))
        assert torch.equal(img, images) and torch.equal(lab, labels)
        assert img is images and lab is labels  # not even a copy


def test_old_config_still_works():
    labels = torch.stack([_checker((12, 12)) for _ in range(8)])
    images = labels[:, None].float() * 2
    img, lab = augment_batch(images, labels, {"flip": 0.5, "rot90": 0.5}, torch.Generator().manual_seed(0))
    assert torch.equal(img[:, 0], lab.float() * 2) and not torch.equal(lab, labels)
    # mirroring and 90-degree turns only permute voxels
    assert torch.equal(lab.flatten(1).sort(1).values, labels.flatten(1).sort(1).values)


@pytest.mark.parametrize("shape", [(32, 32), (8, 16, 16)])
def test_same_seed_same_output(shape):
    cfg = default_augmentation(len(shape), list(shape))
    for v in cfg.values():
        if isinstance(v, dict):
            v["p"] = 0.5
    cfg["elastic"]["p"] = 0.5
    labels = torch.stack([_checker(shape) for _ in range(6)])
    images = torch.randn(6, 2, *shape, generator=torch.Generator().manual_seed(9))
    a = augment_batch(images, labels, cfg, torch.Generator().manual_seed(4))
    b = augment_batch(images, labels, cfg, torch.Generator().manual_seed(4))
    c = augment_batch(images, labels, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # a generator saved mid-run (as in a checkpoint) continues identically
    g = torch.Generator().manual_seed(4)
    augment_batch(images, labels, cfg, g)
    state = g.get_state()
    d = augment_batch(images, labels, cfg, g)
    e = augment_batch(images, labels, cfg, torch.Generator().set_state(state))
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


# -------------------------------------------------------------------------------------- intensity

@pytest.mark.parametrize("name", [*SPATIAL, *INTENSITY])
@pytest.mark.parametrize("shape", [(24, 24), (8, 16, 16)])
def test_each_transform_changes_the_image(name, shape):
    labels = torch.stack([_checker(shape) for _ in range(2)])
    images = torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    img, lab = augment_batch(images, labels, _only(name), torch.Generator().manual_seed(1))
    assert img.shape == images.shape and not torch.equal(img, images)
    if name in INTENSITY:
        assert lab is labels


def test_intensity_transforms_never_touch_labels():
    labels = torch.stack([_checker((8, 16, 16)) for _ in range(3)])
    before = labels.clone()
    config = {name: {"p": 1.0} for name in INTENSITY}
    img, lab = augment_batch(torch.randn(3, 2, 8, 16, 16), labels, config, torch.Generator().manual_seed(0))
    assert lab is labels and torch.equal(labels, before)


def _batch(seed=0):
    return torch.randn(3, 2, 20, 24, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def test_intensity_values():
    x = _batch()
    lab = torch.zeros(3, 20, 24, dtype=torch.long)
    g = torch.Generator().manual_seed(0)

    out, _ = augment_batch(x, lab, {"brightness": {"p": 1.0, "range": [2.0, 2.0]}}, g)
    assert torch.allclose(out, x * 2)

    out, _ = augment_batch(x, lab, {"contrast": {"p": 1.0, "range": [1.5, 1.5]}}, g)
    mean = x.mean((2, 3), keepdim=True)
    expect = torch.minimum(torch.maximum((x - mean) * 1.5 + mean, x.amin((2, 3), keepdim=True)),
                           x.amax((2, 3), keepdim=True))
    assert torch.allclose(out, expect, atol=1e-5)

    out, _ = augment_batch(x, lab, {"gamma": {"p": 1.0, "range": [2.0, 2.0]}}, g)
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    assert torch.allclose(out, ((x - lo) / (hi - lo)) ** 2 * (hi - lo) + lo, atol=1e-4)
    out, _ = augment_batch(x, lab, {"gamma": {"p": 1.0, "range": [2.0, 2.0], "invert_p": 1.0}}, g)
    assert torch.allclose(out, (1 - (1 - (x - lo) / (hi - lo)) ** 2) * (hi - lo) + lo, atol=1e-4)

    big = torch.zeros(2, 1, 128, 128)
    out, _ = augment_batch(big, torch.zeros(2, 128, 128, dtype=torch.long),
                           {"noise": {"p": 1.0, "variance": [0.04, 0.04]}}, g)
    assert abs(float(out.std()) - 0.2) < 0.005

    out, _ = augment_batch(x, lab, {"lowres": {"p": 1.0, "range": [2.0, 2.0]}}, g)
    ref = F.interpolate(F.interpolate(x, size=[10, 12], mode="nearest"), size=[20, 24], mode="bilinear")
    assert torch.allclose(out, ref, atol=1e-5)


def test_blur_matches_scipy_gaussian_filter():
    x = torch.randn(1, 1, 12, 20, 16, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(x, 1.0, [2, 3, 4])[0, 0].numpy()
    ref = ndimage.gaussian_filter(x[0, 0].numpy(), 1.0, mode="mirror", truncate=3.0)
    assert np.allclose(ours, ref, atol=1e-5)


def test_resize_linear_3d_equals_trilinear():
    x = torch.randn(2, 3, 5, 7, 6)
    ref = F.interpolate(x, size=[10, 9, 12], mode="trilinear", align_corners=False)
    assert torch.allclose(resize_linear(x, [10, 9, 12]), ref, atol=1e-5)


def test_elastic_field_has_the_classic_amplitude():
    """Coarse-grid field with the 1/f^(d/2) gain ~ Simard's full-resolution field (alpha 34, sigma 10)."""
    rng = np.random.default_rng(0)
    ref = np.std([ndimage.gaussian_filter(rng.uniform(-1, 1, (128, 128)), 10, mode="mirror", truncate=3) * 34
                  for _ in range(16)])
    gen = torch.Generator().manual_seed(0)
    ours = elastic_field(16, [128, 128], [0, 1], 34.0, 10.0, gen, torch.device("cpu"))
    assert 0.8 < float(ours.std()) / ref < 1.25


# ---------------------------------------------------------------------------------- configuration

def test_config_validation_names_the_field():
    with pytest.raises(InputError, match=r"training\.augment\.rotate"):
        validate_augmentation({"rotate": 0.2})
    with pytest.raises(InputError, match=r"training\.augment\.rotation\.p .*\[0, 1\]"):
        validate_augmentation({"rotation": {"p": 2}})
    with pytest.raises(InputError, match=r"training\.augment\.scaling\.range"):
        validate_augmentation({"scaling": {"p": 0.2, "range": [1.4, 0.7]}})
    with pytest.raises(InputError, match=r"training\.augment\.gamma"):
        validate_augmentation({"gamma": "high"})
    with pytest.raises(InputError, match=r"training\.augment\.elastic\.alfa"):
        validate_augmentation({"elastic": {"alfa": 3}})
    with pytest.raises(InputError, match=r"--set training\.augment\.flip="):
        validate_augmentation({"flip": "yes"})
    with pytest.raises(InputError, match=r"training\.augment\.noise"):
        augment_batch(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4), {"noise": {"p": -1}}, torch.Generator())
    cfg = validate_augmentation({"gamma": 0.3, "flip": 1})
    assert cfg["gamma"] == {"p": 0.3, "range": [0.7, 1.5], "invert_p": 0.0}
    assert cfg["flip"] == 1.0 and cfg["rotation"]["p"] == 0.0


def test_default_augmentation():
    d2, d3, thin = (default_augmentation(2, [256, 256]), default_augmentation(3, [96, 96, 48]),
                    default_augmentation(3, [8, 160, 160]))
    for cfg in (d2, d3, thin):
        assert validate_augmentation(cfg)["flip"] == 0.5
        assert cfg["rotation"]["p"] == cfg["scaling"]["p"] == 0.2 and cfg["gamma"]["p"] == 0.3
    assert d2["rotation"]["degrees"] == 180 and d3["rotation"]["degrees"] == 30
    assert thin["rotation"]["degrees"] == 180  # in-plane only
    assert d2["elastic"]["p"] > 0 and d3["elastic"]["p"] == 0


# ------------------------------------------------------------------------------------------ preview

@pytest.mark.parametrize("shape,n", [((48, 48), 5), ((12, 24, 24), 2)])
def test_preview_writes_a_png_of_the_expected_size(tmp_path, shape, n):
    from medunet.datasets.synthetic import make_synthetic_dataset
    from medunet.training.preview import TILE_PX, augment_preview, grid_shape

    data = make_synthetic_dataset(tmp_path / "data", n_train=3, n_test=0, shape=shape)
    out = augment_preview(data, tmp_path / "out" / "grid.png", n=n, seed=0,
                          overrides={"training.augment.rotation": 1.0})
    rows, cols = grid_shape(n)
    assert out.is_file() and Image.open(out).size == (cols * TILE_PX, rows * TILE_PX)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temporary left behind


def test_preview_rejects_bad_settings(tmp_path):
    from medunet.datasets.synthetic import make_synthetic_dataset
    from medunet.training.preview import augment_preview

    data = make_synthetic_dataset(tmp_path / "data", n_train=2, n_test=0, shape=(32, 32))
    with pytest.raises(InputError, match=r"training\.augment\.gamma"):
        augment_preview(data, tmp_path / "g.png", n=2, overrides={"training.augment.gamma": "x"})
    with pytest.raises(InputError, match="--n"):
        augment_preview(data, tmp_path / "g.png", n=0)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_tensors_device():
    cfg = default_augmentation(3, [16, 16, 8])
    cfg["elastic"]["p"] = 1.0
    labels = torch.stack([_checker((16, 16, 8)) for _ in range(2)]).cuda()
    images = torch.randn(2, 1, 16, 16, 8, device="cuda")
    a = augment_batch(images, labels, cfg, torch.Generator().manual_seed(0))
    b = augment_batch(images, labels, cfg, torch.Generator().manual_seed(0))
    assert a[0].device.type == "cuda" and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_inputs_are_never_modified():
    for shape in [(16, 16), (6, 10, 8)]:
        config = {**_all_spatial(), **{name: {"p": 1.0} for name in INTENSITY}}
        for cfg in (config, {name: {"p": 1.0} for name in INTENSITY}):
            images, labels = torch.randn(3, 2, *shape), torch.stack([_checker(shape) for _ in range(3)])
            saved = images.clone(), labels.clone()
            img, _ = augment_batch(images, labels, cfg, torch.Generator().manual_seed(0))
            assert torch.equal(images, saved[0]) and torch.equal(labels, saved[1])
            assert not torch.equal(img, images)
