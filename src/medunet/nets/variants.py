"""The U-Net variants beside the plain :class:`~medunet.nets.unet.UNet`, each one class for 2D and 3D.

Every variant takes the plan's network fields (``features``, per-level ``strides`` and
``kernel_sizes``, ``n_convs``, ``norm``, ``act``, ``down``, ``up``, ``deep_supervision``) and
returns what the U-Net returns (see :class:`~medunet.nets.base.SegNet`), so the losses, the
sliding window, the exporter and the Predictor use any of them unchanged. Build them by name
through :func:`medunet.nets.create_model`.

The attention, CBAM, scSE and TransUNet variants are the U-Net plus modules at its hooks
(skip gate, decoder output, bottleneck), so their U-Net parameters keep the U-Net's names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medunet.nets.base import SegNet
from medunet.nets.blocks import (
    CBAM,
    SCSE,
    AttentionGate,
    ConvBlock,
    MedNeXtBlock,
    ResidualBlock,
    TransformerBottleneck,
    act_layer,
    conv_type,
    kernel_like,
    norm_layer,
    plain_encoder,
    same_padding,
    up_layer,
)
from medunet.nets.unet import UNet

Levels = Sequence[int | Sequence[int]] | None


class AttentionUNet(UNet):
    """U-Net with an additive attention gate on every skip connection (Oktay et al. 2018).

    The gates learn to pass the skip features near the target and damp the rest: the encoder's
    full-resolution features carry everything, the gate lets the decoder take what matters.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, **options) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, **options)
        norm, act = options.get("norm", "instance"), options.get("act", "leakyrelu")
        self.gates = nn.ModuleList(
            AttentionGate(spatial_dims, self.features[level], self.features[level], norm, act)
            for level in reversed(range(self.depth)))

    def gate(self, i: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.gates[i](skip, up)


class RecalibratedUNet(UNet):
    """U-Net with channel + spatial attention after each decoder merge: ``cbam`` (Woo et al.
    2018) or ``scse`` (Roy et al. 2018). The decoder's merged features mix a coarse semantic and
    a fine local stream; re-weighting them per channel and per voxel is cheap and lets each
    stage stress the informative ones."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, attention: str = "cbam",
                 reduction: int = 4, **options) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, **options)
        if reduction < 1:
            raise ValueError("reduction must be at least 1")
        mods: list[nn.Module] = []
        for level in reversed(range(self.depth)):
            ch = self.features[level]
            if attention == "cbam":
                mods.append(CBAM(spatial_dims, ch, reduction, kernel_like(self.kernel_sizes[level], 7)))
            elif attention == "scse":
                mods.append(SCSE(spatial_dims, ch, reduction))
            else:
                raise ValueError(f"unknown attention '{attention}' (cbam, scse)")
        self.attention = nn.ModuleList(mods)

    def merged(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.attention[i](x)


class TransUNet(UNet):
    """U-Net with a small transformer over the bottleneck tokens (Chen et al. 2021).

    Convolutions keep local detail and the skips; the transformer gives every bottleneck voxel
    the whole patch as context. TransUNet starts from an ImageNet-pretrained ViT; nothing can be
    downloaded here, so this one always trains from scratch (``pretrained=True`` is refused), and
    is kept small (2 layers) for that reason: a deep ViT from scratch needs far more data.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, transformer_layers: int = 2,
                 attention_heads: int = 4, mlp_ratio: float = 2.0, pretrained: bool = False,
                 **options) -> None:
        if pretrained:
            raise ValueError("transunet: pretrained ViT weights cannot be downloaded here; it trains from "
                             "scratch (set network.pretrained=false)")
        super().__init__(spatial_dims, in_channels, out_channels, **options)
        self.transformer = TransformerBottleneck(spatial_dims, self.features[-1], transformer_layers,
                                                 attention_heads, mlp_ratio, self.kernels[-1])

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(x)


# ------------------------------------------------------------------------------------- ResEnc

# nnU-Net's ResEnc presets: residual blocks per encoder stage, one conv per decoder stage
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6)
RESENC_SIZES = {"M": 1, "L": 2}  # width multiplier of the plan's features


class ResEncUNet(SegNet):
    """Residual encoder, plain decoder: nnU-Net's ResEnc presets ("nnU-Net Revisited", Isensee
    et al., MICCAI 2024), which beat most newer architectures when trained as well.

    Stem conv, then per stage ``blocks`` residual blocks (1, 3, 4, 6, 6, 6 ...; the first of each
    deeper stage strides), a decoder of one conv block per stage. ``size`` ``M`` uses the plan's
    widths; ``L``: nnU-Net's L keeps M's topology and spends a larger GPU memory target on bigger
    patches, but the patch here is the plan's, so L spends it on twice the channels instead.
    ``down`` and ``n_convs`` are not used (strided residual blocks; one decoder conv, as nnU-Net).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (32, 64, 128, 256, 320), strides: Levels = None,
                 kernel_sizes: Levels = None, deep_supervision: bool = False, n_convs: int = 2,
                 norm: str = "instance", act: str = "leakyrelu", down: str = "conv", up: str = "transpose",
                 size: str = "M", blocks: Sequence[int] | None = None) -> None:
        if str(size).upper() not in RESENC_SIZES:
            raise ValueError(f"unknown resenc size '{size}' ({', '.join(RESENC_SIZES)})")
        self.size = str(size).upper()
        features = [int(f) * RESENC_SIZES[self.size] for f in features]
        super().__init__(spatial_dims, in_channels, out_channels, features, strides, kernel_sizes,
                         deep_supervision)
        dims, f, k = spatial_dims, self.features, self.kernels
        blocks = list(blocks) if blocks is not None else list(RESENC_BLOCKS[: self.depth + 1])
        if len(blocks) != self.depth + 1 or min(blocks) < 1:
            raise ValueError(f"need {self.depth + 1} positive block counts, one per stage")
        self.blocks = blocks
        conv = conv_type(dims)
        self.stem = nn.Sequential(
            conv(in_channels, f[0], k[0], padding=same_padding(k[0]), bias=norm == "none"),
            norm_layer(norm, dims, f[0]), act_layer(act))
        self.stages = nn.ModuleList()
        for level, n in enumerate(blocks):
            cin = f[max(0, level - 1)]
            stride = self.strides[level - 1] if level > 0 else (1,) * dims
            self.stages.append(nn.Sequential(*[
                ResidualBlock(dims, cin if b == 0 else f[level], f[level], stride if b == 0 else (1,) * dims,
                              k[level], norm, act) for b in range(n)]))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in reversed(range(self.depth)):
            self.ups.append(up_layer(up, dims, f[level + 1], f[level], self.strides[level]))
            self.decoders.append(ConvBlock(dims, 2 * f[level], f[level], 1, norm, act, kernel=k[level]))
            if deep_supervision or level == 0:
                self.heads.append(conv(f[level], out_channels, 1))

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        feats = []
        for up, dec in zip(self.ups, self.decoders, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
            feats.append(x)
        return feats


# ------------------------------------------------------------------------------------- UNet++


class UNetPlusPlus(SegNet):
    """Nested U-Net with dense skip pathways (Zhou et al. 2018, "UNet++").

    Node ``X[i][j]`` (level i, column j) convolves the concatenation of every earlier node of
    its level and the up-sampled ``X[i+1][j-1]``, so the decoder of each depth is trained at
    once and the semantic gap between encoder and decoder features is bridged step by step.
    Deep supervision puts a head on each top node ``X[0][1..D]``: every output is at full
    resolution, the deepest (final) one first, then the shallower sub-networks.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (32, 64, 128, 256, 320), strides: Levels = None,
                 kernel_sizes: Levels = None, deep_supervision: bool = False, n_convs: int = 2,
                 norm: str = "instance", act: str = "leakyrelu", down: str = "conv", up: str = "transpose",
                 residual: bool = False) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, strides, kernel_sizes,
                         deep_supervision)
        dims, f, k, depth = spatial_dims, self.features, self.kernels, self.depth
        self.encoders, self.downs = plain_encoder(dims, in_channels, f, n_convs, norm, act, residual, k,
                                                  self.strides, down)
        # column j (1..D) holds the nodes of levels 0..D-j
        self.ups = nn.ModuleList()
        self.nodes = nn.ModuleList()
        for j in range(1, depth + 1):
            self.ups.append(nn.ModuleList(up_layer(up, dims, f[i + 1], f[i], self.strides[i])
                                          for i in range(depth - j + 1)))
            self.nodes.append(nn.ModuleList(
                ConvBlock(dims, (j + 1) * f[i], f[i], n_convs, norm, act, residual, k[i])
                for i in range(depth - j + 1)))
        self.heads = nn.ModuleList(conv_type(dims)(f[0], out_channels, 1)
                                   for _ in range(depth if deep_supervision else 1))

    def output_levels(self) -> list[int]:
        return [0] * len(self.heads)

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        grid: list[list[torch.Tensor]] = []  # grid[i][j] = X[i][j]
        for level, enc in enumerate(self.encoders):
            x = enc(x)
            grid.append([x])
            if level < len(self.downs):
                x = self.downs[level](x)
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                up = self.ups[j - 1][i](grid[i + 1][j - 1])
                grid[i].append(self.nodes[j - 1][i](torch.cat([*grid[i][:j], up], dim=1)))
        top = grid[0][1:]
        return top if self.deep_supervision and self.training else top[-1:]


# ------------------------------------------------------------------------------------- MedNeXt


class MedNeXt(SegNet):
    """ConvNeXt-style U-Net (MedNeXt, Roy et al. 2023): every stage is ``n_convs`` MedNeXt
    blocks (depthwise ``kernel`` conv, inverted bottleneck of ``expansion`` x, residual), the
    down-sampling blocks are strided MedNeXt blocks, and decoder stages add (not concatenate)
    the skip, as the paper does. ``kernel`` applies on the axes the plan's kernels see across
    (1 stays 1: the slice-wise configuration). ``down`` is not used (MedNeXt's own blocks).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (32, 64, 128, 256, 320), strides: Levels = None,
                 kernel_sizes: Levels = None, deep_supervision: bool = False, n_convs: int = 2,
                 norm: str = "instance", act: str = "gelu", down: str = "conv", up: str = "transpose",
                 expansion: int = 2, kernel: int = 5) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, features, strides, kernel_sizes,
                         deep_supervision)
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"mednext kernel {kernel} must be odd and positive")
        if expansion < 1:
            raise ValueError("expansion must be at least 1")
        dims, f, depth = spatial_dims, self.features, self.depth
        ks = [kernel_like(k, kernel) for k in self.kernel_sizes]

        def stage(level: int) -> nn.Sequential:
            return nn.Sequential(*[MedNeXtBlock(dims, f[level], f[level], ks[level], expansion, norm, act)
                                   for _ in range(n_convs)])

        self.stem = conv_type(dims)(in_channels, f[0], 1)
        self.encoders = nn.ModuleList(stage(level) for level in range(depth + 1))
        self.downs = nn.ModuleList(MedNeXtBlock(dims, f[level], f[level + 1], ks[level], expansion, norm, act,
                                                stride=self.strides[level]) for level in range(depth))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in reversed(range(depth)):
            self.ups.append(up_layer(up, dims, f[level + 1], f[level], self.strides[level]))
            self.decoders.append(stage(level))
            if deep_supervision or level == 0:
                self.heads.append(conv_type(dims)(f[level], out_channels, 1))

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for level, enc in enumerate(self.encoders):
            x = enc(x)
            if level < self.depth:
                skips.append(x)
                x = self.downs[level](x)
        feats = []
        for up, dec in zip(self.ups, self.decoders, strict=True):
            x = dec(up(x) + skips.pop())
            feats.append(x)
        return feats
