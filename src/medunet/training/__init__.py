"""Training: losses, patch sampling, schedules the one training loop and its modes."""

from medunet.training.loop import parse_duration
from medunet.training.losses import DiceCELoss, build_loss, soft_dice_loss
from medunet.training.trainer import TrainResult, train

__all__ = ["DiceCELoss", "TrainResult", "build_loss", "parse_duration", "soft_dice_loss", "train"]
