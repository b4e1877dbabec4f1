"""nnU-Net v2's two U-Nets, layer for layer, built from medunet's blocks.

nnU-Net's plans describe a plain convolutional U-Net (``PlainConvUNet``) or one with a
residual encoder (``ResidualEncoderUNet``, the ResEnc presets). They differ from medunet's own
``unet``/``resenc`` in details that change the numbers: every conv keeps its bias next to the
norm, an encoder stage down-samples with its first (3x3) conv instead of a separate pooling
layer, and the number of convs may differ per stage and between encoder and decoder. This
class reproduces those layers exactly, so a trained nnU-Net model's weights load into it
(:mod:`medunet.nnunet`) and then run through every medunet backend, export and training path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medunet.nets.base import SegNet
from medunet.nets.blocks import ConvBlock, ResidualBlock, conv_transpose_type, conv_type

ENCODERS = ("plain", "residual")


def _per_stage(value: int | Sequence[int], n: int, name: str) -> list[int]:
    """An int for every stage, or a list with one positive entry per stage."""
    out = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(out) != n or min(out) < 1:
        raise ValueError(f"{name} needs {n} positive entries, got {value}")
    return out


class NnUNet(SegNet):
    """nnU-Net v2's ``PlainConvUNet`` (``encoder="plain"``) or ``ResidualEncoderUNet``
    (``encoder="residual"``) at the given geometry.

    Args:
        features: channels per stage, encoder top to bottleneck (nnU-Net's
            ``features_per_stage``).
        strides: one per down-sampling (nnU-Net's ``strides`` without the first stage's 1s).
        kernel_sizes: one per stage.
        n_convs: plain encoder: convs per stage (``n_conv_per_stage``); residual encoder:
            residual blocks per stage (``n_blocks_per_stage``).
        decoder_convs: convs per decoder stage, deepest first (``n_conv_per_stage_decoder``).
        conv_bias: biases on the convs (nnU-Net's default keeps them next to the norm).
        norm, act: as the plan's ``norm_op`` (instance, batch or none) and ``nonlin``.
        down, up: not used (a preset's values pass through): nnU-Net down-samples with the first
            conv of a stage and up-samples with transposed convs.

    Example:
        >>> net = NnUNet(2, 1, 3, features=[4, 8, 16])
        >>> net(torch.zeros(1, 1, 20, 24)).shape
        torch.Size([1, 3, 20, 24])
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (32, 64, 128, 256, 320), strides: Sequence | None = None,
                 kernel_sizes: Sequence | None = None, deep_supervision: bool = False,
                 n_convs: int | Sequence[int] = 2, decoder_convs: int | Sequence[int] = 2,
                 norm: str = "instance", act: str = "leakyrelu", encoder: str = "plain",
                 conv_bias: bool = True, down: str = "conv", up: str = "transpose") -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, strides, kernel_sizes,
                         deep_supervision)
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder '{encoder}' ({', '.join(ENCODERS)})")
        dims, f, k, depth = spatial_dims, self.features, self.kernels, self.depth
        self.encoder = encoder
        self.n_convs = _per_stage(n_convs, depth + 1, "n_convs")
        self.decoder_convs = _per_stage(decoder_convs, depth, "decoder_convs")
        one = (1,) * dims
        stride = [one, *self.strides]  # stage s down-samples by stride[s] on its way in
        self.stages = nn.ModuleList()
        if encoder == "plain":
            self.stem: nn.Module | None = None
            cin = in_channels
            for s in range(depth + 1):
                self.stages.append(ConvBlock(dims, cin, f[s], self.n_convs[s], norm, act, kernel=k[s],
                                             stride=stride[s], bias=conv_bias))
                cin = f[s]
        else:
            self.stem = ConvBlock(dims, in_channels, f[0], 1, norm, act, kernel=k[0], bias=conv_bias)
            for s in range(depth + 1):
                cin = f[max(0, s - 1)]
                self.stages.append(nn.Sequential(*[
                    ResidualBlock(dims, cin if b == 0 else f[s], f[s], stride[s] if b == 0 else one, k[s],
                                  norm, act, bias=conv_bias, shortcut_bias=False)
                    for b in range(self.n_convs[s])]))
        conv, up = conv_type(dims), conv_transpose_type(dims)
        self.ups, self.decoders, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, level in enumerate(reversed(range(depth))):
            st = self.strides[level]
            self.ups.append(up(f[level + 1], f[level], st, stride=st, bias=conv_bias))
            self.decoders.append(ConvBlock(dims, 2 * f[level], f[level], self.decoder_convs[i], norm, act,
                                           kernel=k[level], bias=conv_bias))
            # nnU-Net always has a head per decoder stage; without deep supervision only the last is used
            if deep_supervision or level == 0:
                self.heads.append(conv(f[level], out_channels, 1))

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        feats = []
        for i, (up, dec) in enumerate(zip(self.ups, self.decoders, strict=True)):
            x = dec(torch.cat([up(x), skips[-2 - i]], dim=1))
            feats.append(x)
        return feats
