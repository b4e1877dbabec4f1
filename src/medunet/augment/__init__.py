"""Batched augmentation on the training device (torch), one code path for 2D and 3D."""

from medunet.augment.spatial import flip_rot90

__all__ = ["flip_rot90"]
