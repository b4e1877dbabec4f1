"""What every network of the family shares: level geometry, pad-and-crop, deep supervision.

A variant only says how to turn a padded input into decoder features (:meth:`SegNet.decode`);
the base pads inputs to the down-sampling divisor, applies the 1x1 heads and crops the outputs
back, so every variant returns what the losses, the sliding window, the exporter and the
Predictor expect: logits at the input's size, or in training with deep supervision a list
(full resolution first, then coarser outputs cropped to ``ceil(size / factor)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medunet.nets.blocks import compact, divisor_of, level_geometry, pad_to_divisor


class SegNet(nn.Module):
    """Base of the U-Net family (not a network by itself).

    Subclasses build their layers after ``super().__init__`` (which sets ``strides``,
    ``kernel_sizes``, ``kernels``, ``features``, ``depth``) and must create ``self.heads``: one
    1x1 conv per deep-supervision output (in the order :meth:`decode` returns features), or
    just the final head without deep supervision; ``heads[-1]`` is always the final one. (The
    base registers no modules itself, so a subclass's state-dict keys and their order are its
    own: the U-Net's checkpoints from before this base existed load unchanged.)
    """

    heads: nn.ModuleList

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: Sequence[int],
                 strides: Sequence | None, kernel_sizes: Sequence | None, deep_supervision: bool) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("spatial_dims must be 2 or 3")
        self.spatial_dims = spatial_dims
        self.strides, self.kernel_sizes = level_geometry(spatial_dims, len(features), strides, kernel_sizes)
        # an all-equal kernel is passed as an int: the layers (and their repr) stay as before
        self.kernels = [compact(k) for k in self.kernel_sizes]
        self.features = [int(f) for f in features]
        self.depth = len(self.features) - 1
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deep_supervision = deep_supervision

    @property
    def divisor(self) -> tuple[int, ...]:
        """Input sizes that are multiples of this need no padding."""
        return divisor_of(self.strides, self.spatial_dims)

    def output_levels(self) -> list[int]:
        """The level (0 = full resolution) of each head's output, in :meth:`decode` order:
        by default one per decoder stage, coarsest first."""
        return list(reversed(range(self.depth)))

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder features, one per deep-supervision output (the last is the full-resolution
        one the final head reads), from an input padded to :attr:`divisor`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (N, C, {'D, ' if self.spatial_dims == 3 else ''}H, W) input for a "
                f"{self.spatial_dims}D U-Net, got shape {tuple(x.shape)}")
        size = x.shape[2:]
        feats = self.decode(pad_to_divisor(x, self.divisor))
        full = self.heads[-1](feats[-1])[(..., *(slice(0, n) for n in size))]
        if not (self.deep_supervision and self.training):
            return full
        outputs = []
        for head, f, level in list(zip(self.heads, feats, self.output_levels(), strict=True))[:-1]:
            factor = [math.prod(s[a] for s in self.strides[:level]) for a in range(self.spatial_dims)]
            crop = tuple(slice(0, -(-n // q)) for n, q in zip(size, factor, strict=True))
            outputs.append(head(f)[(..., *crop)])
        return [full] + outputs[::-1]  # full resolution first, then the coarser (or shallower) outputs
