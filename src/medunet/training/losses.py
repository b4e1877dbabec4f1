"""Segmentation losses. Logits are ``(B, K, *S)``, targets ``(B, *S)`` class indices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, *S)`` indices -> ``(B, K, *S)`` float one-hot."""
    out = torch.zeros((target.shape[0], num_classes, *target.shape[1:]), device=target.device)
    return out.scatter_(1, target.unsqueeze(1).long(), 1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False,
                   batch_dice: bool = True, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over classes.

    ``batch_dice`` pools the batch as one volume (as nnU-Net does for 2D), which is stabler
    when a patch holds no foreground; background is left out by default because it dominates.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = one_hot(target, logits.shape[1])
    dims = (0, *range(2, logits.ndim)) if batch_dice else tuple(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if not include_background:
        dice = dice[..., 1:]
    return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    """Soft Dice + cross-entropy, equally weighted (nnU-Net's default)."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target.long())
        return self.dice_weight * soft_dice_loss(logits, target) + self.ce_weight * ce


LOSSES = {"dice_ce": DiceCELoss}


def build_loss(name: str) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}' ({', '.join(LOSSES)})")
    return LOSSES[name]()
