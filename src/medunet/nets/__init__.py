"""The U-Net family: one dimension-agnostic builder with presets."""

from medunet.nets.unet import PRESETS, UNet, build_network, encoder_receptive_field

__all__ = ["PRESETS", "UNet", "build_network", "encoder_receptive_field"]
