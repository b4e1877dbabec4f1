"""The U-Net family: variants by name (:func:`create_model`), built from shared blocks."""

from medunet.nets.registry import (
    ARCH_NAMES,
    ARCHS,
    DEFAULT_ARCH,
    arch_table,
    create_model,
    get_arch,
    network_option_names,
)
from medunet.nets.unet import PRESETS, UNet, build_network, encoder_receptive_field

__all__ = ["ARCHS", "ARCH_NAMES", "DEFAULT_ARCH", "PRESETS", "UNet", "arch_table", "build_network",
           "create_model", "encoder_receptive_field", "get_arch", "network_option_names"]
