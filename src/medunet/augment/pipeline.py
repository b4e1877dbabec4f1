"""``augment_batch``: the training-time augmentation of one batch, spatial then intensity."""

from __future__ import annotations

import torch

from medunet.augment.config import anisotropic_axis, is_identity, validate_augmentation
from medunet.augment.intensity import intensity_augment
from medunet.augment.spatial import spatial_augment


def _field_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator for the large random fields (noise, elastic): on the data's device.

    Scalar parameters come from ``generator`` itself; when it lives elsewhere (a CPU generator
    with CUDA tensors) a device generator is seeded from it, so runs stay reproducible and a
    resumed run (``generator.get_state()`` in the checkpoint) draws the same fields.
    """
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def augment_batch(images: torch.Tensor, labels: torch.Tensor, config: dict | None,
                  generator: torch.Generator, *, image_mode: str = "linear"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: images ``(B, C, *S)`` float, labels ``(B, *S)`` integer classes (2D or 3D).

    Spatial transforms (mirroring, rot90, rotation, scaling, elastic) move image and label
    together in one resampling per sample; intensity transforms (noise, blur, brightness,
    contrast, low resolution, gamma) change the image only. Parameters are drawn per sample
    from ``generator``, which alone makes the result reproducible. Works on the tensors'
    device. ``config`` is ``plan.training["augment"]`` (see :mod:`medunet.augment.config`);
    with every probability 0 the inputs are returned unchanged (the same tensors).

    ``image_mode`` ``nearest`` resamples the image like the label (for tests and label-like
    images); ``linear`` (default) is bi/trilinear.
    """
    if images.ndim not in (4, 5) or labels.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(f"need images (B, C, *S) and labels (B, *S) for 2D/3D, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if image_mode not in ("linear", "nearest"):
        raise ValueError(f"image_mode must be 'linear' or 'nearest', got {image_mode!r}")
    cfg = validate_augmentation(config)
    if is_identity(cfg):
        return images, labels
    fields = _field_generator(generator, images.device)
    out_i, out_l = spatial_augment(images, labels, cfg, generator, fields, image_mode)
    shape = images.shape[2:]
    thin = anisotropic_axis(shape)
    axes = [a for a in range(len(shape)) if a != thin]
    # a resampled batch is a fresh tensor: intensity changes may then be written into it
    return intensity_augment(out_i, cfg, generator, fields, axes, inplace=out_i is not images), out_l
