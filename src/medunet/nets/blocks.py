"""Building blocks shared by every network of the U-Net family, written once for 2D and 3D.

Layers come from small factories keyed by ``spatial_dims`` (as MONAI does), so a variant is
one class whatever the dimension. Kernel sizes may differ per axis: a kernel of 1 on an axis
(the slice-wise ``2d`` configuration of 3D data) makes every block blind across that axis,
so the attention modules below take the level's kernel and keep that axis at 1 too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Kernel = int | tuple[int, ...]


# --------------------------------------------------------------------------- factories


def conv_type(dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` / ``nn.Conv3d``."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[dims]


def conv_transpose_type(dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` / ``nn.ConvTranspose3d``."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]


def norm_layer(kind: str, dims: int, ch: int) -> nn.Module:
    """``batch``, ``instance`` (affine), ``group`` (up to 8 groups dividing ``ch``) or ``none``."""
    if kind == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](ch)
    if kind == "instance":
        return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](ch, affine=True)
    if kind == "group":  # up to 8 groups; GroupNorm needs a group count that divides ch
        return nn.GroupNorm(max(g for g in range(1, 9) if ch % g == 0), ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}' (batch, instance, group, none)")


def act_layer(kind: str) -> nn.Module:
    """``relu``, ``leakyrelu`` (slope 0.01, as nnU-Net) or ``gelu``."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation '{kind}' (relu, leakyrelu, gelu)")


def same_padding(kernel: Kernel) -> Kernel:
    """``k // 2`` per axis: odd kernels then keep the size."""
    return kernel // 2 if isinstance(kernel, int) else tuple(k // 2 for k in kernel)


def compact(kernel: Sequence[int]) -> Kernel:
    """An all-equal per-axis kernel as an int (layers and their repr stay as the U-Net's)."""
    return kernel[0] if len(set(kernel)) == 1 else tuple(kernel)


def down_layer(kind: str, dims: int, ch: int, stride: Sequence[int], norm: str, act: str) -> nn.Module:
    """Down-sampling by ``stride``: ``maxpool`` (paper) or ``conv`` (strided conv + norm + act)."""
    s = tuple(stride)
    if kind == "maxpool":
        return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims](s, s)
    if kind == "conv":
        return nn.Sequential(conv_type(dims)(ch, ch, s, stride=s, bias=norm == "none"),
                             norm_layer(norm, dims, ch), act_layer(act))
    raise ValueError(f"unknown down '{kind}' (maxpool, conv)")


def up_layer(kind: str, dims: int, cin: int, cout: int, stride: Sequence[int]) -> nn.Module:
    """Up-sampling by ``stride``: ``transpose`` (paper) or ``interp`` (interpolation + 1x1 conv)."""
    s = tuple(stride)
    if kind == "transpose":
        return conv_transpose_type(dims)(cin, cout, s, stride=s)
    if kind == "interp":
        return nn.Sequential(
            nn.Upsample(scale_factor=s, mode="bilinear" if dims == 2 else "trilinear", align_corners=False),
            conv_type(dims)(cin, cout, 1))
    raise ValueError(f"unknown up '{kind}' (transpose, interp)")


# --------------------------------------------------------------------------- geometry


def level_geometry(dims: int, n_levels: int, strides: Sequence | None, kernel_sizes: Sequence | None,
                   ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Per-axis strides (one per down-sampling) and odd kernels (one per level), checked.

    ``None`` means stride 2 and kernel 3 everywhere; an int means the same on every axis.
    """
    depth = n_levels - 1
    if depth < 1:
        raise ValueError("features needs at least 2 levels (one down-sampling step)")
    strides = [2] * depth if strides is None else strides
    if len(strides) != depth:
        raise ValueError(f"need {depth} strides for {n_levels} feature levels")
    st = [tuple(int(a) for a in s) if isinstance(s, Sequence) else (int(s),) * dims for s in strides]
    for s in st:
        if len(s) != dims or min(s) < 1:
            raise ValueError(f"stride {s} needs {dims} positive entries, one per axis")
    kernel_sizes = [3] * n_levels if kernel_sizes is None else kernel_sizes
    if len(kernel_sizes) != n_levels:
        raise ValueError(f"need {n_levels} kernel sizes, one per feature level")
    ks = [tuple(int(a) for a in k) if isinstance(k, Sequence) else (int(k),) * dims for k in kernel_sizes]
    for k in ks:
        if len(k) != dims or min(k) < 1 or any(a % 2 == 0 for a in k):
            raise ValueError(f"kernel size {k} needs {dims} odd positive entries, one per axis")
    return st, ks


def divisor_of(strides: Sequence[Sequence[int]], dims: int) -> tuple[int, ...]:
    """The total down-sampling factor per axis: input sizes that are multiples need no padding."""
    return tuple(math.prod(s[a] for s in strides) for a in range(dims))


def pad_to_divisor(x: torch.Tensor, divisor: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes at their far end up to multiples of ``divisor``."""
    pads = [(-n) % d for n, d in zip(x.shape[2:], divisor, strict=True)]
    if not any(pads):
        return x
    return F.pad(x, [p for ax in reversed(pads) for p in (0, ax)])  # F.pad: last axis first


def kernel_like(level_kernel: Sequence[int], k: int) -> tuple[int, ...]:
    """``k`` on the axes the level's convolutions see across, 1 where its kernel is 1."""
    return tuple(1 if a == 1 else max(k, a) for a in level_kernel)


# --------------------------------------------------------------------------- convolution blocks


class ConvBlock(nn.Module):
    """``n_convs`` x (conv k -> norm -> act); optionally with a residual shortcut.

    A residual block adds the shortcut before the last activation (as ResNet and nnU-Net's
    residual encoders do), so the block's output is activated like a plain block's; a channel
    change goes through a 1x1 conv + norm on the shortcut.
    """

    def __init__(self, dims: int, cin: int, cout: int, n_convs: int, norm: str, act: str,
                 residual: bool = False, kernel: Kernel = 3, *, stride: Sequence[int] | None = None,
                 bias: bool | None = None) -> None:
        super().__init__()
        if n_convs < 1:
            raise ValueError("n_convs must be at least 1")
        # odd kernels with k // 2 padding keep the size ('same' convolution); a kernel of 1 on
        # an axis makes the block blind across that axis (the 2d configuration of 3D data)
        padding = same_padding(kernel)
        # ``stride``: the first conv down-samples (nnU-Net's encoder stages); ``bias``: None
        # means a bias only without a norm (a norm's shift makes it redundant)
        bias = norm == "none" if bias is None else bool(bias)
        layers: list[nn.Module] = []
        for i in range(n_convs):
            layers += [
                conv_type(dims)(cin if i == 0 else cout, cout, kernel, padding=padding,
                                stride=tuple(stride) if i == 0 and stride is not None else 1, bias=bias),
                norm_layer(norm, dims, cout),
                act_layer(act),
            ]
        self.shortcut: nn.Module | None = None
        self.out_act: nn.Module | None = None
        if residual:
            self.out_act = layers.pop()  # applied after the sum
            self.shortcut = nn.Identity() if cin == cout else nn.Sequential(
                conv_type(dims)(cin, cout, 1, bias=norm == "none"), norm_layer(norm, dims, cout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.shortcut is None or self.out_act is None:
            return y
        return self.out_act(y + self.shortcut(x))


def plain_encoder(dims: int, in_channels: int, features: Sequence[int], n_convs: int, norm: str, act: str,
                  residual: bool, kernels: Sequence[Kernel], strides: Sequence[Sequence[int]],
                  down: str) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The U-Net encoder: one :class:`ConvBlock` per level and a down-sampling between levels
    (``encoders``, ``downs``), shared by the variants that keep the plain encoder."""
    encoders, downs = nn.ModuleList(), nn.ModuleList()
    cin = in_channels
    for level, ch in enumerate(features):
        encoders.append(ConvBlock(dims, cin, ch, n_convs, norm, act, residual, kernels[level]))
        cin = ch
        if level < len(features) - 1:
            downs.append(down_layer(down, dims, ch, strides[level], norm, act))
    return encoders, downs


class ResidualBlock(nn.Module):
    """nnU-Net ResEnc's basic block: conv(k, stride) -> norm -> act -> conv(k) -> norm, plus a
    shortcut (average pooling for a stride, 1x1 conv + norm for a channel change), then act.

    Pooling the shortcut instead of striding a 1x1 conv keeps every input voxel in the sum
    (ResNet-D), which is what the "Revisited" paper's ResEnc presets use.
    """

    def __init__(self, dims: int, cin: int, cout: int, stride: Sequence[int], kernel: Kernel,
                 norm: str, act: str, *, bias: bool | None = None, shortcut_bias: bool | None = None) -> None:
        super().__init__()
        s = tuple(stride)
        conv = conv_type(dims)
        pad = same_padding(kernel)
        # None: a bias only without a norm; nnU-Net's blocks keep conv biases but not the shortcut's
        bias = norm == "none" if bias is None else bool(bias)
        shortcut_bias = norm == "none" if shortcut_bias is None else bool(shortcut_bias)
        self.body = nn.Sequential(
            conv(cin, cout, kernel, stride=s, padding=pad, bias=bias), norm_layer(norm, dims, cout),
            act_layer(act),
            conv(cout, cout, kernel, padding=pad, bias=bias), norm_layer(norm, dims, cout))
        skip: list[nn.Module] = []
        if max(s) > 1:
            skip.append({2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](s, s))
        if cin != cout:
            skip += [conv(cin, cout, 1, bias=shortcut_bias), norm_layer(norm, dims, cout)]
        self.shortcut = nn.Sequential(*skip) if skip else nn.Identity()
        self.out_act = act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_act(self.body(x) + self.shortcut(x))


class MedNeXtBlock(nn.Module):
    """A ConvNeXt block for segmentation (MedNeXt, Roy et al. 2023): depthwise conv with a
    large kernel -> norm -> 1x1 conv expanding ``expansion`` x -> act -> 1x1 conv, plus a
    residual. With a stride (and a channel change) it is MedNeXt's down-sampling block: the
    depthwise conv strides and a strided 1x1 conv carries the residual.

    The depthwise conv sees space at a tiny cost, the 1x1 convs mix channels: a large
    receptive field per parameter, which is the point of the design.
    """

    def __init__(self, dims: int, cin: int, cout: int, kernel: Kernel, expansion: int, norm: str, act: str,
                 stride: Sequence[int] | None = None) -> None:
        super().__init__()
        conv = conv_type(dims)
        s = tuple(stride) if stride is not None else (1,) * dims
        hidden = max(1, expansion) * cin
        self.body = nn.Sequential(
            conv(cin, cin, kernel, stride=s, padding=same_padding(kernel), groups=cin),
            norm_layer(norm, dims, cin),
            conv(cin, hidden, 1), act_layer(act),
            conv(hidden, cout, 1))
        self.shortcut: nn.Module = (nn.Identity() if cin == cout and max(s) == 1
                                    else conv(cin, cout, 1, stride=s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


# --------------------------------------------------------------------------- attention


def _spatial_axes(x: torch.Tensor) -> list[int]:
    return list(range(2, x.ndim))


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, "Attention U-Net").

    ``alpha = sigmoid(psi(act(W_x skip + W_g gate)))`` weighs each skip voxel in [0, 1], so the
    decoder is told where to look by the coarser, more semantic gating signal. The gate here is
    the up-sampled decoder feature (already on the skip's grid), which keeps the gate exact
    under any per-axis stride instead of resampling the coefficients.
    """

    def __init__(self, dims: int, c_skip: int, c_gate: int, norm: str, act: str) -> None:
        super().__init__()
        conv = conv_type(dims)
        inter = max(1, c_skip // 2)
        self.w_skip = nn.Sequential(conv(c_skip, inter, 1, bias=False), norm_layer(norm, dims, inter))
        self.w_gate = nn.Sequential(conv(c_gate, inter, 1, bias=False), norm_layer(norm, dims, inter))
        self.act = act_layer(act)
        self.psi = conv(inter, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(self.act(self.w_skip(skip) + self.w_gate(gate))))
        return skip * alpha


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al. 2018): channel attention from average- and
    max-pooled descriptors through a shared MLP, then spatial attention from a conv over the
    channel-wise mean and max maps. Cheap re-weighting that lets a decoder stage suppress
    channels and places that do not matter for the classes."""

    def __init__(self, dims: int, ch: int, reduction: int = 4, kernel: Sequence[int] = (7, 7, 7)) -> None:
        super().__init__()
        conv = conv_type(dims)
        hidden = max(1, ch // reduction)
        self.mlp = nn.Sequential(conv(ch, hidden, 1), nn.ReLU(inplace=True), conv(hidden, ch, 1))
        k = tuple(kernel)
        self.spatial = conv(2, 1, k, padding=same_padding(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = _spatial_axes(x)
        avg = x.mean(dim=axes, keepdim=True)
        mx = x.amax(dim=axes, keepdim=True)
        x = x * torch.sigmoid(self.mlp(avg) + self.mlp(mx))
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al. 2018): the sum of a
    channel-recalibrated (global pooling -> bottleneck MLP -> sigmoid) and a
    spatially-recalibrated (1x1 conv -> sigmoid) copy of the features."""

    def __init__(self, dims: int, ch: int, reduction: int = 4) -> None:
        super().__init__()
        conv = conv_type(dims)
        hidden = max(1, ch // reduction)
        self.channel = nn.Sequential(conv(ch, hidden, 1), nn.ReLU(inplace=True), conv(hidden, ch, 1))
        self.spatial = conv(ch, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.sigmoid(self.channel(x.mean(dim=_spatial_axes(x), keepdim=True)))
        s = torch.sigmoid(self.spatial(x))
        return x * c + x * s


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens ``(B, N, C)``, written with plain matmuls so it
    traces to ONNX with a dynamic token count (any window size)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} attention heads do not divide {dim} channels")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        qkv = self.qkv(x).reshape(b, -1, 3, self.heads, x.shape[2] // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2))


class TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer (ViT): x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def attention_heads(dim: int, wanted: int) -> int:
    """The largest head count <= ``wanted`` that divides ``dim`` (so any width works)."""
    return max(h for h in range(1, max(1, wanted) + 1) if dim % h == 0)


class TransformerBottleneck(nn.Module):
    """A small transformer over the bottleneck's voxels as tokens (TransUNet, Chen et al. 2021).

    The bottleneck is where global context is cheap: after all down-samplings a patch is a few
    hundred tokens. Position comes from a depthwise convolution added before the tokens are
    formed (a conditional positional encoding, Chu et al. 2021) instead of TransUNet's learned
    table: it works at every window size, so sliding windows and exports need no interpolation.
    """

    def __init__(self, dims: int, ch: int, layers: int = 2, heads: int = 4, mlp_ratio: float = 2.0,
                 kernel: Kernel = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("transformer_layers must be at least 1")
        self.position = conv_type(dims)(ch, ch, kernel, padding=same_padding(kernel), groups=ch)
        h = attention_heads(ch, heads)
        self.layers = nn.Sequential(*[TransformerLayer(ch, h, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.position(x)
        tokens = self.norm(self.layers(x.flatten(2).transpose(1, 2)))
        return x + tokens.transpose(1, 2).reshape(x.shape)
