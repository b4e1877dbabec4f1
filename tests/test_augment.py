"""Augmentation keeps image and label aligned; probability 0 is the identity; 2D and 3D."""

from __future__ import annotations

import torch

from medunet.augment import flip_rot90


def _checker(shape):
    grids = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    idx = sum(g // 3 for g in grids) % 2
    # a label with an asymmetric marker so flips and rotations are all distinguishable
    lab = idx.clone()
    lab[(0,) * len(shape)] = 2
    return lab


def test_flip_rot90_keeps_alignment_2d_and_3d():
    for shape in [(12, 12), (6, 8, 8)]:
        labels = torch.stack([_checker(shape) for _ in range(8)])
        images = torch.stack([labels.float() * 10 + 1, labels.float() * -3], dim=1)
        gen = torch.Generator().manual_seed(1)
        img, lab = flip_rot90(images, labels, 1.0, 1.0, gen)
        assert img.shape == images.shape and lab.shape == labels.shape
        # the image was made from the label, so it must still decode to the transformed label
        assert torch.equal(((img[:, 0] - 1) / 10).round().long(), lab)
        assert torch.equal(img[:, 1], lab.float() * -3)
        # something actually changed
        assert not torch.equal(lab, labels)


def test_probability_zero_is_identity():
    labels = torch.stack([_checker((10, 10)) for _ in range(4)])
    images = labels[:, None].float()
    img, lab = flip_rot90(images, labels, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(img, images) and torch.equal(lab, labels)


def test_rot90_only_in_square_planes():
    labels = torch.zeros(4, 6, 10, dtype=torch.long)
    img, lab = flip_rot90(labels[:, None].float(), labels, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert lab.shape == (4, 6, 10)
