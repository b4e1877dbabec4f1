"""A dimension-agnostic U-Net.

One class serves 2D and 3D: layers come from small factories keyed by ``spatial_dims``
(as MONAI does). Inputs of any size work: the forward pass pads to a multiple of the total
down-sampling factor and crops the output back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def _conv(dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[dims]


def _conv_t(dims: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]


def _norm(kind: str, dims: int, ch: int) -> nn.Module:
    if kind == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](ch)
    if kind == "instance":
        return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](ch, affine=True)
    if kind == "group":  # up to 8 groups; GroupNorm needs a group count that divides ch
        return nn.GroupNorm(max(g for g in range(1, 9) if ch % g == 0), ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}' (batch, instance, group, none)")


def _act(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation '{kind}' (relu, leakyrelu, gelu)")


class ConvBlock(nn.Module):
    """``n_convs`` x (conv k -> norm -> act); optionally with a residual shortcut.

    A residual block adds the shortcut before the last activation (as ResNet and nnU-Net's
    residual encoders do), so the block's output is activated like a plain block's; a channel
    change goes through a 1x1 conv + norm on the shortcut.
    """

    def __init__(self, dims: int, cin: int, cout: int, n_convs: int, norm: str, act: str,
                 residual: bool = False, kernel: int | tuple[int, ...] = 3) -> None:
        super().__init__()
        if n_convs < 1:
            raise ValueError("n_convs must be at least 1")
        # odd kernels with k // 2 padding keep the size ('same' convolution); a kernel of 1 on
        # an axis makes the block blind across that axis (the 2d configuration of 3D data)
        padding = kernel // 2 if isinstance(kernel, int) else tuple(k // 2 for k in kernel)
        layers: list[nn.Module] = []
        for i in range(n_convs):
            layers += [
                _conv(dims)(cin if i == 0 else cout, cout, kernel, padding=padding,
                            bias=norm == "none"),
                _norm(norm, dims, cout),
                _act(act),
            ]
        self.shortcut: nn.Module | None = None
        self.out_act: nn.Module | None = None
        if residual:
            self.out_act = layers.pop()  # applied after the sum
            self.shortcut = nn.Identity() if cin == cout else nn.Sequential(
                _conv(dims)(cin, cout, 1, bias=norm == "none"), _norm(norm, dims, cout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.shortcut is None or self.out_act is None:
            return y
        return self.out_act(y + self.shortcut(x))


class UNet(nn.Module):
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
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("spatial_dims must be 2 or 3")
        dims = spatial_dims
        depth = len(features) - 1
        if depth < 1:
            raise ValueError("features needs at least 2 levels (one down-sampling step)")
        if strides is None:
            strides = [2] * depth
        if len(strides) != depth:
            raise ValueError(f"need {depth} strides for {len(features)} feature levels")
        self.spatial_dims = dims
        self.strides = [tuple(int(a) for a in s) if isinstance(s, Sequence) else (int(s),) * dims
                        for s in strides]
        for s in self.strides:
            if len(s) != dims or min(s) < 1:
                raise ValueError(f"stride {s} needs {dims} positive entries, one per axis")
        if kernel_sizes is None:
            kernel_sizes = [3] * len(features)
        if len(kernel_sizes) != len(features):
            raise ValueError(f"need {len(features)} kernel sizes, one per feature level")
        self.kernel_sizes = [tuple(int(a) for a in k) if isinstance(k, Sequence) else (int(k),) * dims
                             for k in kernel_sizes]
        for k in self.kernel_sizes:
            if len(k) != dims or min(k) < 1 or any(a % 2 == 0 for a in k):
                raise ValueError(f"kernel size {k} needs {dims} odd positive entries, one per axis")
        # an all-equal kernel is passed as an int: the layers (and their repr) stay as before
        kernels = [k[0] if len(set(k)) == 1 else k for k in self.kernel_sizes]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deep_supervision = deep_supervision
        conv = _conv(dims)

        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        cin = in_channels
        for level, ch in enumerate(features):
            self.encoders.append(ConvBlock(dims, cin, ch, n_convs, norm, act, residual, kernels[level]))
            cin = ch
            if level < depth:
                s = self.strides[level]
                if down == "maxpool":
                    pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
                    self.downs.append(pool(s, s))
                elif down == "conv":
                    self.downs.append(nn.Sequential(
                        conv(ch, ch, s, stride=s, bias=norm == "none"), _norm(norm, dims, ch),
                        _act(act)))
                else:
                    raise ValueError(f"unknown down '{down}' (maxpool, conv)")

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in reversed(range(depth)):
            c_low, c_skip = features[level + 1], features[level]
            s = self.strides[level]
            if up == "transpose":
                self.ups.append(_conv_t(dims)(c_low, c_skip, s, stride=s))
            elif up == "interp":
                self.ups.append(nn.Sequential(
                    nn.Upsample(scale_factor=s, mode="bilinear" if dims == 2 else "trilinear",
                                align_corners=False),
                    conv(c_low, c_skip, 1)))
            else:
                raise ValueError(f"unknown up '{up}' (transpose, interp)")
            self.decoders.append(ConvBlock(dims, 2 * c_skip, c_skip, n_convs, norm, act, residual,
                                           kernels[level]))
            # a 1x1 head per decoder level only with deep supervision: unused heads would get no
            # gradients (and break DistributedDataParallel); heads[-1] is always the final head
            if deep_supervision or level == 0:
                self.heads.append(conv(c_skip, out_channels, 1))

    @property
    def divisor(self) -> tuple[int, ...]:
        """Input sizes that are multiples of this need no padding."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (N, C, {'D, ' if self.spatial_dims == 3 else ''}H, W) input for a "
                f"{self.spatial_dims}D U-Net, got shape {tuple(x.shape)}"
            )
        size = x.shape[2:]
        pads = [(-n) % d for n, d in zip(size, self.divisor, strict=True)]
        if any(pads):
            # F.pad takes the last axis first; pad at the far end only, then crop it off again
            x = F.pad(x, [p for ax in reversed(pads) for p in (0, ax)])
        skips = []
        for level, enc in enumerate(self.encoders):
            x = enc(x)
            if level < len(self.downs):
                skips.append(x)
                x = self.downs[level](x)
        supervise = self.deep_supervision and self.training
        outputs = []
        for i, (up, dec) in enumerate(zip(self.ups, self.decoders, strict=True)):
            x = dec(torch.cat([up(x), skips[-1 - i]], dim=1))
            if supervise and i < len(self.decoders) - 1:
                level = len(self.decoders) - 1 - i  # outputs at 1 / prod(strides[:level])
                factor = [math.prod(s[a] for s in self.strides[:level])
                          for a in range(self.spatial_dims)]
                crop = tuple(slice(0, -(-n // f)) for n, f in zip(size, factor, strict=True))
                outputs.append(self.heads[i](x)[(..., *crop)])
        full = self.heads[-1](x)[(..., *(slice(0, n) for n in size))]
        if supervise:
            return [full] + outputs[::-1]  # full resolution first, then coarser levels
        return full


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
