"""Batched augmentation on the training device (torch), one code path for 2D and 3D.

``augment_batch(images, labels, plan.training["augment"], generator)`` is the entry point;
``default_augmentation(dim, patch_size)`` gives a plan's defaults; ``augment_preview`` draws a
grid of augmented patches to check the settings by eye.
"""

from medunet.augment.config import default_augmentation, validate_augmentation
from medunet.augment.pipeline import augment_batch
from medunet.augment.spatial import flip_rot90

__all__ = ["augment_batch", "augment_preview", "default_augmentation", "flip_rot90", "validate_augmentation"]


def __getattr__(name: str):
    # the preview pulls in matplotlib, datasets and training: imported only when asked for
    if name == "augment_preview":
        from medunet.augment.preview import augment_preview

        return augment_preview
    raise AttributeError(name)
