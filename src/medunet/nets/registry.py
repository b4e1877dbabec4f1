"""The network registry: every U-Net variant by name, built by :func:`create_model`.

A plan names its network in ``network.arch`` (a plan without it means ``unet``); the other
``network`` fields are the builder's options, over the named ``preset``'s values. Adding a
variant is one entry here, one class in :mod:`medunet.nets.variants` and one subclass of the
shared test class in ``tests/test_archs.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from medunet.errors import InputError
from medunet.nets.nnunet import NnUNet
from medunet.nets.unet import PRESETS, UNet
from medunet.nets.variants import (
    AttentionUNet,
    MedNeXt,
    RecalibratedUNet,
    ResEncUNet,
    TransUNet,
    UNetPlusPlus,
)

# Measured (bench/archs.py, BENCHMARKS.md): the screening's best variant, scse, tied with it on DRIVE
# and ISBI EM and lost 0.41 Dice points on the Left Atrium at 30 CPU minutes.
DEFAULT_ARCH = "unet"


def classic_options(n_levels: int) -> dict:
    """The classic preset's settings for ``n_levels`` feature levels: the 2015 paper's widths
    (64, 128, ... 1024), norm-free ReLU convs, max-pooling and up-convs."""
    widths = list(PRESETS["classic"]["features"])
    widths += [widths[-1]] * max(0, n_levels - len(widths))
    return {**PRESETS["classic"], "features": widths[:n_levels]}


def _classic(spatial_dims: int, in_channels: int, out_channels: int, **options) -> UNet:
    """The U-Net with the paper's widths and layers at the plan's depth, strides and kernels
    (the paper's settings replace the plan's ``features``, ``norm``, ``act``, ``down``, ``up``)."""
    n_levels = len(options.get("features") or PRESETS["classic"]["features"])
    return UNet(spatial_dims, in_channels, out_channels, **{**options, **classic_options(n_levels)})


@dataclass(frozen=True)
class Arch:
    """One registered variant: how to build it, one line on what it is, whether
    :func:`medunet.training.distill.prune_unet` can map its channels (a plain ``UNet``)."""

    name: str
    build: Callable[..., nn.Module]
    summary: str
    prunable: bool = False
    family: bool = True  # listed by `medunet archs` and screened by bench/archs.py

    def option_names(self) -> frozenset[str]:
        """The ``network.*`` options it takes (the U-Net's for the variants built on it)."""
        fn = self.build.func if isinstance(self.build, partial) else self.build
        target = fn.__init__ if inspect.isclass(fn) else fn
        params = inspect.signature(target).parameters
        names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            names |= set(inspect.signature(UNet.__init__).parameters)
        if isinstance(self.build, partial):
            names -= set(self.build.keywords)
        return frozenset(names - {"self", "spatial_dims", "in_channels", "out_channels"})


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("unet", UNet, "U-Net (Ronneberger 2015) at the preset's widths; the default", prunable=True),
    Arch("classic", _classic, "U-Net with the 2015 paper's widths (64-1024, ReLU, no norm)", prunable=True),
    Arch("resenc", ResEncUNet, "residual encoder + plain decoder, nnU-Net ResEnc (Isensee 2024); "
         "network.size=M or L"),
    Arch("attention", AttentionUNet, "attention gates on the skip connections (Oktay 2018)"),
    Arch("cbam", partial(RecalibratedUNet, attention="cbam"),
         "channel + spatial attention (CBAM, Woo 2018) after each decoder merge"),
    Arch("scse", partial(RecalibratedUNet, attention="scse"),
         "concurrent spatial and channel squeeze & excitation (Roy 2018) after each decoder merge"),
    Arch("unetpp", UNetPlusPlus, "UNet++: nested dense skips, deep supervision over its heads (Zhou 2018)"),
    Arch("transunet", TransUNet, "transformer over the bottleneck tokens (Chen 2021); trains from scratch, "
         "no pretrained weights"),
    Arch("mednext", MedNeXt, "ConvNeXt blocks: depthwise large kernel, inverted bottleneck (Roy 2023)"),
    # what `medunet import-nnunet` builds: nnU-Net v2's own networks, layer for layer; trainable
    # like any entry, but not one of the variants the table compares (it is `unet` at the
    # `large` preset up to conv biases and the position of the down-sampling)
    Arch("nnunet", NnUNet, "nnU-Net v2's PlainConvUNet / ResidualEncoderUNet (network.encoder), as "
         "import-nnunet loads them", family=False),
]}
ARCH_NAMES: tuple[str, ...] = tuple(a.name for a in ARCHS.values() if a.family)


def get_arch(name: str) -> Arch:
    """The registered variant, or a one-line :class:`InputError` listing the valid names."""
    if name not in ARCHS:
        raise InputError(f"unknown network arch '{name}'", fix=f"use one of {', '.join(ARCHS)}")
    return ARCHS[name]


def network_option_names() -> frozenset[str]:
    """Every ``network.*`` field some variant reads, plus ``preset`` and ``arch``."""
    names: set[str] = {"preset", "arch"}
    for a in ARCHS.values():
        names |= a.option_names()
    return frozenset(names)


def create_model(arch: str, spatial_dims: int, in_channels: int, out_channels: int,
                 **options) -> nn.Module:
    """Build the variant ``arch`` (see :data:`ARCH_NAMES`) for 2D or 3D inputs.

    Args:
        arch: registered name; unknown names raise :class:`InputError` listing the valid ones.
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels and classes (logits out).
        options: ``preset`` (``default``, ``classic``, ``large``: the starting values) and any
            option of the variant (``features``, ``strides``, ``kernel_sizes``,
            ``deep_supervision``, ...); ``None`` keeps the preset's value. An option the variant
            does not take is a ``ValueError`` naming the ones it does.

    Example:
        >>> net = create_model("attention", 2, 1, 2, features=[8, 16, 32])
        >>> net(torch.zeros(1, 1, 37, 50)).shape
        torch.Size([1, 2, 37, 50])
    """
    spec = get_arch(arch)
    preset = options.pop("preset", None) or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown network preset '{preset}' ({', '.join(PRESETS)})")
    kwargs = {**PRESETS[preset], **{k: v for k, v in options.items() if v is not None}}
    allowed = spec.option_names()
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"arch '{arch}' has no option {', '.join(unknown)} "
                         f"(it takes {', '.join(sorted(allowed))})")
    return spec.build(spatial_dims, in_channels, out_channels, **kwargs)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# the sizes `medunet archs` reports: the default preset as the planner builds it (4 down-samplings,
# 1 channel in, 2 classes; deep supervision in 3D, as planned for volumes)
TABLE_SETTINGS = {2: {"deep_supervision": False}, 3: {"deep_supervision": True}}


def arch_table(in_channels: int = 1, out_channels: int = 2, preset: str = "default") -> list[dict]:
    """One row per variant: name, parameters in 2D and 3D at the planned sizes, summary
    (``resenc`` also in its L size). Built on the meta device: no memory, no time."""
    rows = []
    variants: list[tuple[str, str, dict]] = [(n, n, {}) for n in ARCH_NAMES]
    variants.insert(ARCH_NAMES.index("resenc") + 1, ("resenc", "resenc (size=L)", {"size": "L"}))
    for arch, label, extra in variants:
        counts = {}
        for dims, settings in TABLE_SETTINGS.items():
            with torch.device("meta"):
                net = create_model(arch, dims, in_channels, out_channels, preset=preset, **settings, **extra)
            counts[dims] = count_parameters(net)
        summary = ARCHS[arch].summary if not extra else "twice the channels of resenc (nnU-Net's L budget)"
        rows.append({"arch": label, "params_2d": counts[2], "params_3d": counts[3], "summary": summary})
    return rows
