"""Segmentation losses. Logits are ``(B, K, *S)``, targets ``(B, *S)`` class indices.

Every loss is a softmax over K >= 2 classes (class 0 = background) and works for 2D and 3D.
Losses are computed in float32 with autocast switched off: sums over a whole patch and the
sorting in Lovász lose too much precision in bf16/fp16.

The losses are written here rather than taken from MONAI (which has Dice, Tversky, focal and
a skeleton-free clDice): medunet does not depend on MONAI, the maths is a few lines each, and
each loss is checked against hand-computed values in ``tests/test_losses.py``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medunet.errors import InputError


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, *S)`` indices -> ``(B, K, *S)`` float32 one-hot."""
    out = torch.zeros((target.shape[0], num_classes, *target.shape[1:]), device=target.device,
                      dtype=torch.float32)
    return out.scatter_(1, target.unsqueeze(1).long(), 1.0)


def _float32(forward: Callable) -> Callable:
    """Run a loss's forward with autocast off and float32 logits, whatever the caller's precision."""

    @functools.wraps(forward)
    def wrapper(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return forward(self, logits.float(), target.long())

    return wrapper


def _pool_dims(ndim: int, batch: bool) -> tuple[int, ...]:
    """Axes summed over per class: all spatial axes, plus the batch axis for batch Dice."""
    return (0, *range(2, ndim)) if batch else tuple(range(2, ndim))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False,
                   batch_dice: bool = True, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over classes.

    ``batch_dice`` pools the batch as one volume (as nnU-Net does for 2D), which is stabler
    when a patch holds no foreground; background is left out by default because it dominates.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = one_hot(target, logits.shape[1])
    dims = _pool_dims(logits.ndim, batch_dice)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if not include_background:
        dice = dice[..., 1:]
    return 1.0 - dice.mean()


class SoftDiceLoss(nn.Module):
    """Soft Dice over the foreground classes, pooled over the batch (``dice``)."""

    def __init__(self, include_background: bool = False, batch_dice: bool = True,
                 smooth: float = 1e-5) -> None:
        super().__init__()
        self.include_background, self.batch_dice, self.smooth = include_background, batch_dice, smooth

    @_float32
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(logits, target, self.include_background, self.batch_dice, self.smooth)


class DiceCELoss(nn.Module):
    """Soft Dice + cross-entropy, equally weighted (nnU-Net's default; ``dice_ce``)."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    @_float32
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target)
        return self.dice_weight * soft_dice_loss(logits, target) + self.ce_weight * ce


def one_vs_rest_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, *S)`` -> ``(B, K-1, *S)``: the log-odds of each foreground class under the softmax.

    ``z_k - logsumexp_{j != k} z_j`` = ``log(p_k / (1 - p_k))``, so ``sigmoid`` of it is exactly
    the softmax probability of class k: a binary loss on it trains the same softmax/argmax the
    predictor uses (with K = 2 it is simply ``z_1 - z_0``).
    """
    out = []
    for k in range(1, logits.shape[1]):
        others = torch.cat([logits[:, :k], logits[:, k + 1:]], dim=1)
        out.append(logits[:, k] - torch.logsumexp(others, dim=1))
    return torch.stack(out, dim=1)


class WeightedBCELoss(nn.Module):
    """Binary cross-entropy, one foreground class against the rest, with a positive-class weight.

    ``pos_weight``: a number (every foreground class), a list of K-1 numbers, or None: then each
    class's weight is #negatives / #positives in the batch (the class frequency), so a class
    covering 1 % of the voxels weighs 99 x per positive voxel; kept within
    [1 / ``max_pos_weight``, ``max_pos_weight``] so a batch with a handful of positives cannot
    blow up the step. The weight is not
    differentiated. The loss is the mean over voxels and foreground classes.
    """

    def __init__(self, num_classes: int = 2, pos_weight: float | Sequence[float] | None = None,
                 max_pos_weight: float = 100.0) -> None:
        super().__init__()
        if pos_weight is not None:
            w = [float(pos_weight)] * (num_classes - 1) if isinstance(pos_weight, (int, float)) \
                else [float(v) for v in pos_weight]
            if len(w) != num_classes - 1 or min(w) <= 0:
                raise ValueError(f"pos_weight needs one positive number or {num_classes - 1} "
                                 "(one per foreground class)")
            self.register_buffer("fixed_pos_weight", torch.tensor(w), persistent=False)
        else:
            self.fixed_pos_weight = None
        if max_pos_weight <= 0:
            raise ValueError("max_pos_weight must be positive")
        self.max_pos_weight = float(max_pos_weight)

    @_float32
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        x = one_vs_rest_logits(logits)
        y = one_hot(target, k)[:, 1:]
        if self.fixed_pos_weight is not None:
            w = self.fixed_pos_weight.to(x.device)
        else:
            dims = _pool_dims(y.ndim, batch=True)
            pos = y.sum(dims)
            w = (y.numel() / (k - 1) - pos) / pos.clamp_min(1.0)
            w = w.clamp(1.0 / self.max_pos_weight, self.max_pos_weight)
        w = w.view(1, k - 1, *([1] * (x.ndim - 2)))
        return F.binary_cross_entropy_with_logits(x, y, pos_weight=w)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, mean over voxels.

    ``alpha``: None (no class weighting), a number a (foreground classes weigh a, background
    1 - a, as in the paper's binary form) or a list of K per-class weights.
    """

    def __init__(self, num_classes: int = 2, gamma: float = 2.0,
                 alpha: float | Sequence[float] | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError("gamma must be >= 0")
        self.gamma = float(gamma)
        if alpha is None:
            self.alpha = None
        else:
            a = [1.0 - float(alpha)] + [float(alpha)] * (num_classes - 1) \
                if isinstance(alpha, (int, float)) else [float(v) for v in alpha]
            if len(a) != num_classes or min(a) < 0:
                raise ValueError(f"alpha needs one number in [0, 1] or {num_classes} non-negative "
                                 "weights (one per class)")
            self.register_buffer("alpha", torch.tensor(a), persistent=False)

    @_float32
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp_t = torch.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -((1.0 - logp_t.exp()) ** self.gamma) * logp_t
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss.device)[target]
        return loss.mean()


class TverskyLoss(nn.Module):
    """1 - mean soft Tversky index over the foreground classes (Salehi et al. 2017), batch-pooled.

    ``TP / (TP + alpha FP + beta FN)``; beta > alpha punishes missed foreground more, which
    trades precision for recall on small structures. alpha = beta = 0.5 is Dice.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, include_background: bool = False,
                 batch_dice: bool = True, smooth: float = 1e-5) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError("alpha and beta must be >= 0")
        self.alpha, self.beta = float(alpha), float(beta)
        self.include_background, self.batch_dice, self.smooth = include_background, batch_dice, smooth

    @_float32
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits, dim=1)
        g = one_hot(target, logits.shape[1])
        dims = _pool_dims(logits.ndim, self.batch_dice)
        tp = (p * g).sum(dims)
        fp = (p * (1 - g)).sum(dims)
        fn = ((1 - p) * g).sum(dims)
        ti = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        if not self.include_background:
            ti = ti[..., 1:]
        return 1.0 - ti.mean()


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at errors sorted in decreasing order.

    With the first i voxels (largest errors) counted as mispredicted, the Jaccard loss is
    ``1 - |gt \\ M_i| / |gt ∪ M_i|``; the i-th weight is its increase when voxel i joins
    (Berman et al. 2018, eq. 8-9).
    """
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class LovaszSoftmaxLoss(nn.Module):
    """Lovász-softmax (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU per class.

    For each class c, errors ``|[y = c] - p_c|`` are sorted in decreasing order and dotted with
    :func:`lovasz_grad`; the loss is the mean over the classes present in the target (the paper's
    default, an absent class has no IoU to optimise) of the whole batch, or per image with
    ``per_image``. Background is a class here, as in the paper's mean IoU.
    """

    def __init__(self, per_image: bool = False, include_background: bool = True) -> None:
        super().__init__()
        self.per_image, self.include_background = per_image, include_background

    def _flat(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """probs ``(K, N)``, target ``(N,)`` -> the loss (0 when no class is present)."""
        losses = []
        for c in range(0 if self.include_background else 1, probs.shape[0]):
            fg = (target == c).float()
            if fg.sum() == 0:
                continue
            errors = (fg - probs[c]).abs()
            errors_sorted, order = torch.sort(errors, descending=True)
            losses.append(torch.dot(errors_sorted, lovasz_grad(fg[order])))
        return torch.stack(losses).mean() if losses else probs.sum() * 0.0

    @_float32
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)
        k = probs.shape[1]
        if self.per_image:
            return torch.stack([self._flat(p.reshape(k, -1), t.reshape(-1))
                                for p, t in zip(probs, target, strict=True)]).mean()
        return self._flat(probs.movedim(1, 0).reshape(k, -1), target.reshape(-1))


def _max_pool(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    return pool(x, kernel, stride=1, padding=tuple(k // 2 for k in kernel))


def soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Min-pooling with a cross (one 3-wide min per axis, then the minimum of those), as clDice.

    (Stride-1 max-pooling measured ~3x faster forward + backward on a CPU than elementwise
    min/max of shifted copies, whose backward is slow.)
    """
    dims = x.ndim - 2
    axes = [tuple(3 if a == i else 1 for a in range(dims)) for i in range(dims)]
    return torch.stack([-_max_pool(-x, k) for k in axes]).amin(0)


def soft_dilate(x: torch.Tensor) -> torch.Tensor:
    """Max-pooling over the full 3x3(x3) neighbourhood."""
    return _max_pool(x, (3,) * (x.ndim - 2))


def soft_skeleton(x: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Soft skeleton of probabilities ``(B, C, *S)`` (Shit et al., CVPR 2021, algorithm 1).

    Each round erodes the image and keeps what an opening (erode then dilate) would remove:
    ``S <- S + (1 - S) * relu(I - open(I))``. ``iterations`` should reach the half-width of the
    thickest structure.
    """
    eroded = soft_erode(x)
    skel = F.relu(x - soft_dilate(eroded))
    for _ in range(iterations):
        # the paper erodes I and then opens it (another erosion); each erosion is reused once
        x, eroded = eroded, soft_erode(eroded)
        delta = F.relu(x - soft_dilate(eroded))
        skel = skel + (1.0 - skel) * delta
    return skel


def soft_cldice_loss(probs: torch.Tensor, onehot: torch.Tensor, iterations: int = 3,
                     smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft clDice, mean over the channels given, pooled over the batch.

    Topology precision: how much of the predicted skeleton lies inside the true mask; topology
    sensitivity: how much of the true skeleton lies inside the prediction; clDice is their
    harmonic mean, so a broken vessel (a gap in the prediction) costs more than its few voxels.
    """
    sp, sl = soft_skeleton(probs, iterations), soft_skeleton(onehot, iterations)
    dims = _pool_dims(probs.ndim, batch=True)
    tprec = ((sp * onehot).sum(dims) + smooth) / (sp.sum(dims) + smooth)
    tsens = ((sl * probs).sum(dims) + smooth) / (sl.sum(dims) + smooth)
    return 1.0 - (2.0 * tprec * tsens / (tprec + tsens)).mean()


class ClDiceLoss(nn.Module):
    """Dice + CE + ``weight`` x soft clDice over the foreground classes (thin tubular structures)."""

    def __init__(self, weight: float = 1.0, iterations: int = 3, smooth: float = 1e-5) -> None:
        super().__init__()
        if weight < 0 or iterations < 0:
            raise ValueError("weight and iterations must be >= 0")
        self.weight, self.iterations, self.smooth = float(weight), int(iterations), smooth
        self.dice_ce = DiceCELoss()

    @_float32
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)[:, 1:]
        onehot = one_hot(target, logits.shape[1])[:, 1:]
        cl = soft_cldice_loss(probs, onehot, self.iterations, self.smooth)
        return self.dice_ce(logits, target) + self.weight * cl


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour down-sampling of ``(B, *S)`` class indices to ``(B, *shape)``.

    Output voxel i takes input voxel ``floor(i * n / m)``: with the U-Net's outputs at
    ``ceil(n / f)`` of a patch that is a multiple of f this is voxel ``f * i``, the first of the
    block the network pooled into output voxel i.
    """
    if tuple(target.shape[1:]) == tuple(shape):
        return target
    return F.interpolate(target.unsqueeze(1).float(), size=tuple(shape), mode="nearest").squeeze(1).long()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over the U-Net's deep-supervision outputs.

    Takes the list the U-Net returns in training (full resolution first, then each coarser
    decoder level); output i weighs ``2^-i``, normalised to sum to 1, and is compared with the
    target down-sampled to its shape. A single tensor (eval mode) goes straight to ``loss``.
    """

    def __init__(self, loss: nn.Module, num_outputs: int) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ValueError("num_outputs must be at least 1")
        self.loss = loss
        self.num_outputs = num_outputs
        w = torch.tensor([0.5 ** i for i in range(num_outputs)])
        self.weights: list[float] = (w / w.sum()).tolist()

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        if len(outputs) != self.num_outputs:
            raise ValueError(f"expected {self.num_outputs} deep-supervision outputs, got {len(outputs)}")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.weights, outputs, strict=True):
            total = total + w * self.loss(out, downsample_target(target, out.shape[2:]))
        return total


_REGISTRY: dict[str, type[nn.Module]] = {
    "dice_ce": DiceCELoss,
    "dice": SoftDiceLoss,
    "bce": WeightedBCELoss,
    "focal": FocalLoss,
    "tversky": TverskyLoss,
    "lovasz": LovaszSoftmaxLoss,
    "cldice": ClDiceLoss,
}
LOSSES: tuple[str, ...] = tuple(_REGISTRY)  # the names, default first, for the CLI help


def _option_names(cls: type[nn.Module]) -> list[str]:
    """Constructor arguments a plan may set (``num_classes`` comes from the dataset)."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n in params if n not in ("self", "num_classes")]


def build_loss(name: str, num_classes: int, options: dict[str, Any] | None = None,
               deep_supervision: int = 0) -> nn.Module:
    """The loss the plan names (``training.loss``), with its options, for ``num_classes`` classes.

    ``deep_supervision`` = the number of outputs the U-Net returns in training (0: plain
    tensor); the loss is then wrapped in :class:`DeepSupervisionLoss`.
    """
    if name not in _REGISTRY:
        raise InputError(f"training.loss: unknown loss '{name}'", fix=f"use one of {', '.join(LOSSES)}")
    if num_classes < 2:
        raise InputError(f"training.loss: {num_classes} class(es); a softmax loss needs at least 2",
                         fix="declare the background and at least one foreground label")
    cls = _REGISTRY[name]
    allowed = _option_names(cls)
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"training.loss: unknown option(s) {', '.join(unknown)} for loss '{name}'",
                         fix=f"use {', '.join(allowed) if allowed else 'no options'}")
    if "num_classes" in inspect.signature(cls.__init__).parameters:
        options["num_classes"] = num_classes
    try:
        loss = cls(**options)
    except (TypeError, ValueError) as exc:
        raise InputError(f"training.loss: bad option for loss '{name}' ({exc})",
                         fix=f"check the values of {', '.join(allowed)}") from exc
    if deep_supervision:
        loss = DeepSupervisionLoss(loss, deep_supervision)
    return loss
