"""Batched augmentation on the training device (torch), one code path for 2D and 3D.

``augment_batch(images, labels, plan.training["augment"], generator)`` is the entry point;
``default_augmentation(dim, patch_size)`` gives a plan's defaults. The preview grid of what
training sees is :func:`medunet.training.preview.augment_preview` (it needs the sampler).
"""

from medunet.augment.config import default_augmentation, validate_augmentation
from medunet.augment.pipeline import augment_batch
from medunet.augment.spatial import flip_rot90

__all__ = ["augment_batch", "default_augmentation", "flip_rot90", "validate_augmentation"]
