"""The U-Net family: one dimension-agnostic builder with presets."""

from medunet.nets.unet import PRESETS, UNet, build_network

__all__ = ["PRESETS", "UNet", "build_network"]
