"""A dimension-agnostic U-Net.

One class serves 2D and 3D: layers come from small factories keyed by ``spatial_dims``
(as MONAI does). Inputs of any size work: the forward pass pads to a multiple of the total
down-sampling factor and crops the output back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from medunet.nets.base import SegNet
from medunet.nets.blocks import (
    ConvBlock,
    act_layer,
    conv_transpose_type,
    conv_type,
    norm_layer,
    plain_encoder,
    up_layer,
)

# the factories and the conv block live in blocks.py; these names stay for older imports
_conv = conv_type
_conv_t = conv_transpose_type
_norm = norm_layer
_act = act_layer


class UNet(SegNet):
    """U-Net encoder/decoder with skip concatenation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: number of classes (logits out).
        features: channels per stage, encoder top to bottleneck; its length - 1 is the depth.
        strides: down-sampling factor per level (int or per-axis tuple); default 2 everywhere.
        n_convs: convolutions per stage.
        norm: ``batch``, ``instance``, ``group`` or ``none``.
        act: ``relu``, ``leakyrelu`` or ``gelu``.
        down: ``maxpool`` (paper) or ``conv`` (strided convolution, as nnU-Net).
        up: ``transpose`` (paper) or ``interp`` (interpolation + 1x1 conv).
        residual: residual shortcuts in every block.
        deep_supervision: in training mode return a list: the full-resolution logits, then
            the logits of each coarser decoder level (coarsest last), each cropped to
            ``ceil(size / factor)`` of the input size, the shape of a label down-sampled to it.
        kernel_sizes: convolution kernel per level (int or per-axis tuple, odd), encoder top to
            bottleneck, also used by the decoder block of that level; default 3 everywhere.
            ``[1, 3, 3]`` with strides ``[1, 2, 2]`` on every level is a 2D U-Net applied to
            each slice of a 3D input independently (with batch norm, or one-slice patches).

    Example:
        >>> net = UNet(2, 1, 2, features=(8, 16, 32))
        >>> net(torch.zeros(1, 1, 37, 50)).shape
        torch.Size([1, 2, 37, 50])
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (32, 64, 128, 256, 320),
                 strides: Sequence[int | Sequence[int]] | None = None, n_convs: int = 2,
                 norm: str = "instance", act: str = "leakyrelu", down: str = "conv",
                 up: str = "transpose", residual: bool = False,
                 deep_supervision: bool = False,
                 kernel_sizes: Sequence[int | Sequence[int]] | None = None) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, strides, kernel_sizes,
                         deep_supervision)
        dims, depth, kernels = spatial_dims, self.depth, self.kernels
        conv = conv_type(dims)

        self.encoders, self.downs = plain_encoder(dims, in_channels, features, n_convs, norm, act, residual,
                                                  kernels, self.strides, down)

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in reversed(range(depth)):
            c_low, c_skip = features[level + 1], features[level]
            self.ups.append(up_layer(up, dims, c_low, c_skip, self.strides[level]))
            self.decoders.append(ConvBlock(dims, 2 * c_skip, c_skip, n_convs, norm, act, residual,
                                           kernels[level]))
            # a 1x1 head per decoder level only with deep supervision: unused heads would get no
            # gradients (and break DistributedDataParallel); heads[-1] is always the final head
            if deep_supervision or level == 0:
                self.heads.append(conv(c_skip, out_channels, 1))

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for level, enc in enumerate(self.encoders):
            x = enc(x)
            if level < len(self.downs):
                skips.append(x)
                x = self.downs[level](x)
        x = self.bottleneck(x)
        feats = []
        for i, (up, dec) in enumerate(zip(self.ups, self.decoders, strict=True)):
            u = up(x)
            x = self.merged(i, dec(torch.cat([u, self.gate(i, skips[-1 - i], u)], dim=1)))
            feats.append(x)
        return feats

    # hooks for the variants built on this encoder/decoder (attention, CBAM, scSE, TransUNet);
    # the plain U-Net leaves every one the identity

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest features, after the last encoder block."""
        return x

    def gate(self, i: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The skip connection decoder ``i`` concatenates, given its up-sampled input."""
        return skip

    def merged(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The output of decoder ``i`` (after its merge and conv block)."""
        return x


@dataclass
class NetConfig:
    """What build_network needs; stored in plan.json under ``network``."""

    preset: str = "default"
    features: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    strides: list | None = None
    n_convs: int = 2
    norm: str = "batch"
    act: str = "leakyrelu"
    down: str = "maxpool"
    up: str = "transpose"
    residual: bool = False
    deep_supervision: bool = False
    kernel_sizes: list | None = None


PRESETS: dict[str, dict] = {
    # Ronneberger et al. 2015 (with 'same' padding so outputs keep the input size)
    "classic": dict(features=[64, 128, 256, 512, 1024], n_convs=2, norm="none", act="relu",
                    down="maxpool", up="transpose"),
    # small and fast on a CPU: a quarter of the classic widths, batch norm, leaky ReLU
    "default": dict(features=[16, 32, 64, 128, 256], n_convs=2, norm="batch", act="leakyrelu",
                    down="maxpool", up="transpose"),
    # wider, nnU-Net-like (instance norm, strided convs): for GPUs or long CPU budgets
    "large": dict(features=[32, 64, 128, 256, 320], n_convs=2, norm="instance", act="leakyrelu",
                  down="conv", up="transpose"),
}


def encoder_receptive_field(levels: int, n_convs: int = 2, kernel: int = 3, stride: int = 2) -> int:
    """Voxels along one axis that one bottleneck voxel of the U-Net sees (``levels``
    down-samplings, ``n_convs`` convolutions of ``kernel`` per level, pooling by ``stride``).

    The planner compares it with the objects' size: a network whose encoder cannot see a whole
    object with its border has to guess the object from texture. 140 for the default preset.
    """
    rf, jump = 1, 1
    for level in range(levels + 1):
        rf += n_convs * (kernel - 1) * jump
        if level < levels:
            rf += (stride - 1) * jump
            jump *= stride
    return rf


def build_network(spatial_dims: int, in_channels: int, out_channels: int,
                  preset: str = "default", **overrides) -> UNet:
    """Build a U-Net from a preset name plus overrides (any :class:`UNet` argument)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown network preset '{preset}' ({', '.join(PRESETS)})")
    kwargs = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return UNet(spatial_dims, in_channels, out_channels, **kwargs)
