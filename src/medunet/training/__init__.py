"""Training: losses, patch sampling, schedules and the Trainer loop."""

from medunet.training.losses import DiceCELoss, build_loss, soft_dice_loss
from medunet.training.trainer import TrainResult, parse_duration, train

__all__ = ["DiceCELoss", "TrainResult", "build_loss", "parse_duration", "soft_dice_loss", "train"]
