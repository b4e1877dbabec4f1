"""Losses: hand-computed values on tiny tensors, gradient signs, Lovász by brute force, clDice
skeletons, deep supervision, 2D/3D and bf16."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medunet.errors import InputError
from medunet.nets.unet import UNet
from medunet.training.losses import (
    LOSSES,
    DeepSupervisionLoss,
    DiceCELoss,
    build_loss,
    downsample_target,
    soft_dice_loss,
    soft_skeleton,
)

log = math.log


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)

# The shared tiny example: 1 image, 2 classes, 2x2 pixels. Background logit 0, foreground logit
# logit(p), so the softmax foreground probabilities are exactly P (row-major) and the target is T.
P = [0.75, 0.25, 0.5, 0.8]
T = [1, 0, 1, 0]


def _logits(p: list[float], shape: tuple[int, ...] = (2, 2)) -> torch.Tensor:
    fg = torch.tensor([log(v / (1 - v)) for v in p]).reshape(1, 1, *shape)
    return torch.cat([torch.zeros_like(fg), fg], dim=1)


def _target(t: list[int], shape: tuple[int, ...] = (2, 2)) -> torch.Tensor:
    return torch.tensor(t).reshape(1, *shape)


def test_dice_ce_keeps_its_numbers():
    logits = torch.tensor([[[[50.0, -50.0]], [[-50.0, 50.0]]]])  # pred: class 0 then class 1
    target = torch.tensor([[[1, 1]]])
    # class 1: inter 1, |p| 1, |g| 2 -> Dice 2/3; CE: (100 + 0) / 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(1 / 3, abs=1e-4)
    assert build_loss("dice_ce", 2)(logits, target).item() == pytest.approx(1 / 3 + 50.0, rel=1e-3)
    x, t = _logits(P), _target(T)
    ce = -(log(0.75) + log(0.75) + log(0.5) + log(0.2)) / 4
    assert DiceCELoss()(x, t).item() == pytest.approx(1.8 / 4.3 + ce, rel=1e-5)


def test_dice_by_hand():
    # foreground only: inter .75 + .5 = 1.25; sum p = 2.3; sum g = 2 -> 1 - 2.5 / 4.3
    assert build_loss("dice", 2)(_logits(P), _target(T)).item() == pytest.approx(1.8 / 4.3, rel=1e-5)


def test_tversky_by_hand():
    # TP = 1.25; FP = .25 + .8 = 1.05; FN = .25 + .5 = .75 -> 1.25 / (1.25 + .3*1.05 + .7*.75)
    ti = 1.25 / (1.25 + 0.3 * 1.05 + 0.7 * 0.75)
    assert build_loss("tversky", 2)(_logits(P), _target(T)).item() == pytest.approx(1 - ti, rel=1e-5)
    # alpha = beta = 0.5 is Dice
    half = build_loss("tversky", 2, {"alpha": 0.5, "beta": 0.5})(_logits(P), _target(T))
    assert half.item() == pytest.approx(1.8 / 4.3, rel=1e-5)


def test_bce_by_hand():
    x = _logits(P)
    # fixed weight 3 on positives: targets 1 at p = .75, .5; targets 0 at p = .25, .8
    want = (3 * (-log(0.75) - log(0.5)) - log(0.75) - log(0.2)) / 4
    assert build_loss("bce", 2, {"pos_weight": 3})(x, _target(T)).item() == pytest.approx(want, rel=1e-5)
    # from the batch: one positive, three negatives -> weight 3
    t = _target([1, 0, 0, 0])
    want = (3 * -log(0.75) - log(0.75) - log(0.5) - log(0.2)) / 4
    assert build_loss("bce", 2)(x, t).item() == pytest.approx(want, rel=1e-5)


def test_bce_uses_the_softmax_log_odds_with_three_classes():
    x = torch.tensor([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    t = torch.tensor([[[2]]])
    z = [1.0, 2.0, 0.5]
    # class 1 vs rest: z1 - log(e^z0 + e^z2), a negative; class 2 vs rest: z2 - log(e^z0 + e^z1), positive
    o1 = z[1] - log(math.exp(z[0]) + math.exp(z[2]))
    o2 = z[2] - log(math.exp(z[0]) + math.exp(z[1]))
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = (-log(1 - sig(o1)) - 2 * log(sig(o2))) / 2
    got = build_loss("bce", 3, {"pos_weight": [5, 2]})(x, t).item()
    assert got == pytest.approx(want, rel=1e-5)
    # sigmoid of the one-vs-rest logit is the softmax probability
    assert sig(o2) == pytest.approx(torch.softmax(torch.tensor(z), 0)[2].item(), rel=1e-6)


def test_focal_by_hand():
    x, t = _logits(P), _target(T)
    # p_t: .75, .75 (1 - .25), .5, .2 (1 - .8); FL = -(1 - p_t)^2 log p_t
    terms = [-(0.25 ** 2) * log(0.75), -(0.25 ** 2) * log(0.75),
             -(0.5 ** 2) * log(0.5), -(0.8 ** 2) * log(0.2)]
    assert build_loss("focal", 2)(x, t).item() == pytest.approx(sum(terms) / 4, rel=1e-5)
    # alpha .25: foreground pixels (0 and 2) x .25, background pixels (1 and 3) x .75
    w = [0.25, 0.75, 0.25, 0.75]
    got = build_loss("focal", 2, {"alpha": 0.25})(x, t).item()
    assert got == pytest.approx(sum(a * b for a, b in zip(w, terms, strict=True)) / 4, rel=1e-5)
    # gamma 0 is cross-entropy
    ce = torch.nn.functional.cross_entropy(x, t).item()
    assert build_loss("focal", 2, {"gamma": 0})(x, t).item() == pytest.approx(ce, rel=1e-6)


def test_lovasz_by_hand():
    # class 1: gt {0, 2}, errors |g - p| = .25 .25 .5 .8; sorted: 3, 2, then 0 and 1 (tied).
    # Jaccard loss of the mispredicted set M is |M| / |gt u M|: {3} 1/3, {3,2} 2/3, {3,2,0} 1, all 1
    fg = 0.8 * (1 / 3) + 0.5 * (1 / 3) + 0.25 * (1 / 3) + 0.25 * 0
    # class 0: gt {1, 3}, same errors: {3} 1/2, {3,2} 2/3, {3,2,0} 3/4, all 1
    bg = 0.8 * 0.5 + 0.5 * (2 / 3 - 0.5) + 0.25 * (3 / 4 - 2 / 3) + 0.25 * (1 - 3 / 4)
    assert build_loss("lovasz", 2)(_logits(P), _target(T)).item() == pytest.approx((fg + bg) / 2, rel=1e-5)
    only_fg = build_loss("lovasz", 2, {"include_background": False})(_logits(P), _target(T))
    assert only_fg.item() == pytest.approx(fg, rel=1e-5)


def _lovasz_brute_force(probs: np.ndarray, target: np.ndarray) -> float:
    """Lovász extension as the integral over thresholds t of the set function at {i: m_i >= t}."""
    losses = []
    for c in range(probs.shape[0]):
        gt = set(np.flatnonzero(target == c).tolist())
        if not gt:
            continue
        m = np.abs((target == c).astype(float) - probs[c])

        def jaccard_loss(mis: set[int], gt: set[int] = gt) -> float:
            return len(mis) / len(gt | mis) if mis else 0.0

        levels = np.unique(np.concatenate([[0.0], m]))
        total = sum((hi - lo) * jaccard_loss(set(np.flatnonzero(m >= hi).tolist()))
                    for lo, hi in zip(levels[:-1], levels[1:], strict=True))
        losses.append(total)
    return float(np.mean(losses))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 2, 3, generator=g) * 2
    target = torch.randint(0, 3, (2, 2, 3), generator=g)
    probs = torch.softmax(logits, 1).movedim(1, 0).reshape(3, -1).double().numpy()
    want = _lovasz_brute_force(probs, target.reshape(-1).numpy())
    assert build_loss("lovasz", 3)(logits, target).item() == pytest.approx(want, rel=1e-5)
    per_image = [_lovasz_brute_force(torch.softmax(logits[i], 0).reshape(3, -1).double().numpy(),
                                     target[i].reshape(-1).numpy()) for i in range(2)]
    got = build_loss("lovasz", 3, {"per_image": True})(logits, target).item()
    assert got == pytest.approx(np.mean(per_image), rel=1e-5)


def test_soft_skeleton_of_a_band_and_a_tube_is_its_centre_line():
    band = torch.zeros(1, 1, 7, 9)
    band[..., 2:5, :] = 1  # 3 pixels thick
    centre = torch.zeros_like(band)
    centre[..., 3, :] = 1
    assert torch.equal(soft_skeleton(band, 3), centre)
    tube = torch.zeros(1, 1, 8, 7, 7)
    tube[..., 2:5, 2:5] = 1  # 3x3 cross-section along the first axis
    axis = torch.zeros_like(tube)
    axis[..., 3, 3] = 1
    assert torch.equal(soft_skeleton(tube, 3), axis)


def test_cldice_by_hand_on_a_broken_line():
    target = torch.zeros(1, 7, 7, dtype=torch.long)
    target[0, 3, 1:6] = 1  # a 1-pixel line of 5 pixels: its own skeleton
    pred = target.clone()
    pred[0, 3, 3] = 0  # a gap in the middle
    logits = torch.stack([(pred == 0).float(), (pred == 1).float()], 1) * 100 - 50
    # skeletons: prediction 4 px, truth 5 px; Tprec = 4/4, Tsens = 4/5 -> clDice 2*.8/1.8
    cl = 1 - 2 * 0.8 / 1.8
    dice = 1 - 2 * 4 / 9
    ce = 100 / 49  # one pixel of 49 wrong by a logit margin of 100
    got = build_loss("cldice", 2, {"weight": 0.5})(logits, target).item()
    assert got == pytest.approx(dice + ce + 0.5 * cl, rel=1e-4)


@pytest.mark.parametrize("name", ["dice", "tversky", "lovasz", "cldice", "dice_ce", "focal"])
@pytest.mark.parametrize("shape", [(2, 9, 10), (2, 6, 7, 8)])
def test_perfect_prediction_costs_nothing(name, shape):
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, shape, generator=g)
    target[0, 0] = 2  # make sure every class appears
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 40
    assert build_loss(name, 3)(logits, target).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 4, 5, 6)])
def test_raising_the_true_class_logit_lowers_the_loss(name, shape):
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, shape, generator=g)
    logits = torch.randn(shape[0], 3, *shape[1:], generator=g).requires_grad_()
    loss_fn = build_loss(name, 3)
    loss = loss_fn(logits, target)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    true_grad = logits.grad.gather(1, target.unsqueeze(1))
    if name != "cldice":  # the skeleton term is not monotone voxel by voxel; its direction is
        assert (true_grad <= 1e-7).all()
    assert true_grad.sum() < 0
    with torch.no_grad():
        step = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 0.1
        assert loss_fn(logits + step, target) < loss
    # the all-zero logits point the same way
    zero = torch.zeros_like(logits, requires_grad=True)
    loss_fn(zero, target).backward()
    assert zero.grad.gather(1, target.unsqueeze(1)).sum() < 0


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_inputs_give_a_float32_loss(name):
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 2, (2, 8, 8), generator=g)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    loss_fn = build_loss(name, 2)
    ref = loss_fn(logits.bfloat16().float(), target)
    out = loss_fn(logits.bfloat16(), target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(logits, target)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(loss_fn(logits, target).item(), rel=1e-6)


def test_downsample_target_is_nearest_neighbour_on_the_pooling_grid():
    t = torch.arange(64).reshape(1, 8, 8)
    assert torch.equal(downsample_target(t, (4, 4)), t[:, ::2, ::2])
    assert torch.equal(downsample_target(t, (2, 2)), t[:, ::4, ::4])
    v = torch.arange(512).reshape(1, 8, 8, 8)
    assert torch.equal(downsample_target(v, (4, 4, 2)), v[:, ::2, ::2, ::4])
    assert downsample_target(t, (8, 8)) is t
    assert downsample_target(t, (4, 4)).dtype == torch.long


def test_deep_supervision_weights_and_targets():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, logits, target):
            seen.append(target.clone())
            return logits.sum() * 0 + float(len(seen))  # 1, 2, 3 for the three outputs

    ds = DeepSupervisionLoss(Probe(), 3)
    assert ds.weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    t = torch.arange(64).reshape(1, 8, 8) % 3
    outs = [torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2)]
    assert ds(outs, t).item() == pytest.approx(4 / 7 * 1 + 2 / 7 * 2 + 1 / 7 * 3)
    assert [tuple(s.shape) for s in seen] == [(1, 8, 8), (1, 4, 4), (1, 2, 2)]
    assert torch.equal(seen[1], t[:, ::2, ::2]) and torch.equal(seen[2], t[:, ::4, ::4])
    with pytest.raises(ValueError, match="3 deep-supervision outputs"):
        ds(outs[:2], t)


@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervision_on_the_unet(dims):
    net = UNet(dims, 1, 2, features=(2, 4, 8), deep_supervision=True).train()
    size = (8,) * dims
    x = torch.randn(2, 1, *size)
    target = (torch.rand(2, *size) > 0.5).long()
    outs = net(x)
    loss_fn = build_loss("dice_ce", 2, deep_supervision=len(outs))
    assert isinstance(loss_fn, DeepSupervisionLoss)
    inner = DiceCELoss()
    half = target[(..., *[slice(None, None, 2)] * dims)]
    want = (2 / 3) * inner(outs[0], target) + (1 / 3) * inner(outs[1], half)
    got = loss_fn(outs, target)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert all(p.grad is not None for p in net.heads.parameters())
    # eval mode returns one tensor: the wrapper passes it through
    net.eval()
    with torch.no_grad():
        assert loss_fn(net(x), target).item() == pytest.approx(inner(net(x), target).item(), rel=1e-6)


def test_build_loss_errors_name_the_plan_field_and_choices():
    with pytest.raises(InputError, match="training.loss") as err:
        build_loss("jaccard", 2)
    assert all(n in str(err.value) for n in LOSSES)
    with pytest.raises(InputError, match="training.loss.*unknown option.*gama") as err:
        build_loss("focal", 2, {"gama": 2})
    assert "gamma" in str(err.value)
    with pytest.raises(InputError, match="training.loss"):
        build_loss("focal", 2, {"gamma": -1})
    with pytest.raises(InputError, match="training.loss"):
        build_loss("bce", 3, {"pos_weight": [1, 2, 3]})  # 2 foreground classes
    with pytest.raises(InputError, match="training.loss"):
        build_loss("dice", 1)
    assert LOSSES[0] == "dice_ce"
    assert set(LOSSES) == {"dice", "dice_ce", "bce", "focal", "tversky", "lovasz", "cldice"}
