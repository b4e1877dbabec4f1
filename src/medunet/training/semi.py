"""Semi-supervised training: labelled patches plus unlabelled ones, as one mode on the loop.

``medunet train DATA --unlabeled [DIR] --semi METHOD`` runs :class:`SemiMode` on the same
:class:`~medunet.training.loop.Loop` as supervised training, so budget, validation (labelled
validation cases only), early stopping, checkpoints, resume and the model directory are the
supervised ones. Every batch holds the plan's ``batch_size`` patches, split between labelled
and unlabelled ones by ``training.semi.unlabeled_ratio`` (with ``unlabeled_on_top`` the plan's
batch stays labelled and ``unlabeled_ratio`` x batch unlabelled patches come on top). An
unlabelled patch may be smaller than the plan's (``unlabeled_patch``, a share of each edge), so
the unlabelled term costs less of a CPU budget that labelled patches would otherwise use; the
network then runs labelled and unlabelled patches as two batches. The unlabelled term of the loss is
weighted by ``training.semi.consistency`` times a sigmoid ramp, ``exp(-5 (1 - t)^2)`` with
``t = progress / ramp_up`` (Laine & Aila 2017), so the random early network teaches nothing.
The first part of the run (``unlabeled_start``, by default half of it) trains on the plan's
whole labelled batch and unlabelled patches join after it (the ramp then counts from there):
early on the ramp keeps their weight near 0, so the batch slots and compute they would take buy
almost nothing.

Methods (``training.semi.method``):

- ``mean-teacher`` (Tarvainen & Valpola 2017): the teacher is the EMA of the student
  (``ema_decay``); the student's softmax on an unlabelled patch is pulled (squared distance,
  weighted by :data:`METHOD_WEIGHTS`) towards the teacher's on a perturbed copy (noise, flips,
  intensity; flips undone on the output). With ``mix = "cutmix"`` (French et al. 2020) the
  student sees two unlabelled patches mixed by a box (``bcp_box`` of each edge) and learns the
  teacher's predictions on the two, mixed by the same box: a perturbation that changes the
  context every voxel is predicted from, where flips, noise and intensity hardly change a
  segmentation network's output (mean teacher's term was 3-10 % of the loss at weight 1). Off by
  default: on the Left Atrium (bench/semisup.py) its term was ~4x plain mean teacher's, its
  runs made about as many steps, and it scored below plain mean teacher at 16 labels and level
  at 8.
  ``confidence`` > 0 keeps the term to voxels the teacher is sure of, and ``temperature`` < 1
  sharpens its probabilities: a student that learns soft targets becomes unsure itself
  (bench/certainty.py: about 200,000 unsure Left Atrium test voxels at weight 10 against
  122,000-131,000 labelled only); both take that back but did not raise test Dice, so both are off.
- ``uamt`` (Yu et al. 2019, uncertainty-aware mean teacher): as mean teacher, but the teacher's
  prediction is the mean of ``uncertainty_passes`` Monte-Carlo passes (input noise and dropout
  before the segmentation head), and only voxels whose predictive entropy is below a threshold
  ramping from 0.75 to 1 x ln(K) count.
- ``cps`` (Chen et al. 2021, cross pseudo supervision): two networks of the plan, initialised
  differently; each learns the other's argmax on every patch (cross-entropy).
- ``bcp`` (Bai et al. 2023, bidirectional copy-paste): a box (``bcp_box`` of each edge) of an
  unlabelled patch is pasted into a labelled one and the reverse; targets are the label and the
  EMA teacher's argmax, the unlabelled regions weighted ``consistency`` (0.5 in the paper).
- ``pseudo`` (self-training in rounds): the run is split into ``pseudo_rounds + 1`` equal
  parts (or a labelled-only part of ``unlabeled_start`` and ``pseudo_rounds`` equal rounds
  after it); the first trains on labels only, with the plan's whole batch. At the start of each
  later round the current (EMA) model is frozen and predicts every unlabelled case whole
  (sliding window, as validation does); voxels whose largest probability is above
  ``pseudo_threshold`` get its class as target, the others are ignored. With
  ``pseudo_class_share`` > 0 the threshold is class-balanced (Zou et al. 2018, CBST): each class
  also keeps that share of the voxels predicted as it, its most confident ones, so a threshold
  that only background clears cannot erase the borders of the foreground. Unlabelled patches
  are then drawn with these targets as labelled ones are (foreground oversampling, one
  augmentation for image and target). The unlabelled weight ramps from the first round's start
  (the labelled-only part has no targets to weigh). One prediction pass per round replaces a teacher
  forward per step, so a step costs what a supervised one does, and whole-case predictions
  have none of the errors a network makes at the borders of a lone patch.
  ``pseudo_tta = "flip"`` predicts the targets with every mirroring averaged, as prediction
  with ``--tta flip`` does (the whole round's prediction is still a small share of a budget).
  ``mix = "cutmix"`` gives the student pairs of pseudo-labelled patches mixed by a box, image
  and targets alike (ST++, Yang et al. 2022: self-training needs strong augmentation of the
  pseudo-labelled images).

With ``restart`` each part of the run (the labelled-only part, then the rest or each
pseudo-label round) runs the plan's learning-rate schedule on its own. Under one decaying
schedule a model frozen at a round's start was taken at a high learning rate, before it had
settled; with a restart it has annealed, and the next part starts over at the plan's rate, or
at ``restart_lr`` of it: the later parts fine-tune a trained network rather than train one from
scratch, and at the plan's rate validation Dice fell to 0 for a few hundred steps after each restart.

The served network (checkpoint key ``model`` / ``ema_model``) is the student, or the teacher
(EMA) for the teacher methods and the first network's EMA for ``cps``: a model directory
trained this way predicts, exports and serves like any other.
"""

from __future__ import annotations

import bisect
import copy
import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medunet.augment import augment_batch
from medunet.errors import InputError
from medunet.inference.backends import TorchBackend
from medunet.inference.network import sliding_window_inference
from medunet.inference.tta import tta_transforms, window_predictor
from medunet.runtime import memory_format
from medunet.training.loop import SupervisedMode
from medunet.training.losses import downsample_target, one_hot
from medunet.training.sampler import PatchSampler
from medunet.training.schedule import learning_rate

METHODS = ("mean-teacher", "uamt", "cps", "bcp", "pseudo")
# Measured by bench/semisup.py (Left Atrium, 8 and 16 labels, 30-minute CPU budget; BENCHMARKS.md):
# level with pseudo-label rounds at 16 labels, ahead at 8; ahead of uamt, bcp and cps at 8 labels
# and of bcp at 16 (last weights, one seed each).
DEFAULT_METHOD = "mean-teacher"
# The labelled-only share of a run before unlabelled patches join (methods other than pseudo).
# Measured with mean teacher (bench/semisup.py, Left Atrium, 30 minutes): 0.5 against 0 raised
# test Dice from 0.890 to 0.899 at 8 labels and from 0.895 to 0.906 at 16, level with or above
# the labelled cases alone, where starting at 0 was below them.
DEFAULT_START = 0.5
# Weight of the unlabelled term per method (``consistency: null`` in a plan means this one):
# squared distances of probabilities (mean teacher, UA-MT), cross-entropies (CPS, pseudo-labels)
# and BCP's weight of the unlabelled regions (alpha = 0.5 in the paper). A squared distance
# averaged over every voxel is small where most voxels are confident background on which student
# and teacher agree: at weight 1 mean teacher's term was 3-10 % of the loss and at 16 Left Atrium
# labels it scored 0.18 points below the labelled cases alone; at 10 it drew level (+0.04, two
# seeds) and stayed within 0.1 points of weight 1 at 8 labels (three seeds; bench/semisup.py,
# BENCHMARKS.md, issue 20). The mean-teacher authors' code weighs its squared distance up to 100
# (classification, no background). UA-MT's masked form at 10 (16 labels, one seed) lost its
# validation Dice (0.87 -> 0.72) as the weight ramped in, so it keeps 1.
METHOD_WEIGHTS = {"mean-teacher": 10.0, "uamt": 1.0, "cps": 1.0, "bcp": 0.5, "pseudo": 1.0}
# ``training.semi``: keep the keys equal to planning.plan.TYPED_SECTIONS["training.semi"]
SEMI_DEFAULTS: dict = {
    "method": DEFAULT_METHOD,
    "unlabeled_ratio": 1.0,  # unlabelled patches per labelled patch in a batch (1:1)
    "unlabeled_on_top": False,  # True: the plan's batch stays labelled; unlabelled patches are added
    "unlabeled_patch": 1.0,  # edge of an unlabelled patch as a share of the plan's (rounded to the divisor)
    # share of the run trained on labelled patches alone (the plan's whole batch) before unlabelled
    # ones join; None: DEFAULT_START, or for pseudo the first of pseudo_rounds + 1 equal parts
    "unlabeled_start": None,
    "ramp_up": 0.4,  # share of the rest of the run over which the unlabelled weight ramps up (sigmoid)
    "consistency": None,  # weight of the unlabelled term; None: METHOD_WEIGHTS[method]
    "ema_decay": 0.99,  # teacher = EMA of the student (mean-teacher, uamt, bcp)
    "noise": 0.1,  # std of the teacher's input noise (clipped at 2 std), in normalised units
    "uncertainty_passes": 4,  # UA-MT Monte-Carlo passes (the paper: 8; a CPU budget halves it)
    "dropout": 0.5,  # UA-MT Monte-Carlo dropout before the segmentation head
    "pseudo_threshold": 0.9,  # pseudo: a voxel becomes a target above this probability
    # pseudo: each class also keeps this share of its predicted voxels (its most confident; 0: off)
    "pseudo_class_share": 0.0,
    "pseudo_rounds": 2,  # pseudo: rounds after the labelled-only first part
    "pseudo_tta": "none",  # pseudo: "flip" predicts the targets with every mirroring averaged
    "bcp_box": 2 / 3,  # BCP and cutmix: edge of the pasted box as a share of the patch edge
    "mix": "none",  # mean-teacher / uamt / pseudo: "cutmix" mixes two unlabelled patches for the student
    # mean-teacher / uamt: the consistency counts only voxels whose teacher probability of its
    # most likely class is at least this (0: every voxel)
    "confidence": 0.0,
    # mean-teacher / uamt: the teacher's probabilities sharpened to p^(1/T) / sum (1: as they are);
    # a student that learns soft targets becomes unsure near borders itself
    "temperature": 1.0,
    # each part of the run (the labelled-only part, then the rest or each pseudo-label round) runs
    # the plan's learning-rate schedule on its own: a part ends annealed, so a round's frozen model
    # is a settled one rather than one taken mid-schedule at a high learning rate
    "restart": False,
    # with restart, the peak learning rate of every part after the first as a share of the plan's:
    # those parts start from a trained network, which the plan's from-scratch rate throws out of
    # its minimum (validation Dice fell to 0 for 600 steps after a restart at 1)
    "restart_lr": 1.0,
}
MIXES = ("none", "cutmix")
IGNORE = 255  # pseudo-label value of a voxel that is not a target


# --------------------------------------------------------------------------------------------
# settings


def semi_settings(given: dict | None, method: str | None = None,
                  pseudo_threshold: float | None = None) -> dict:
    """``training.semi`` completed with defaults and checked; ``method`` and ``pseudo_threshold``
    (command-line options) override the plan's. Raises :class:`InputError` naming the field."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(SEMI_DEFAULTS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(SEMI_DEFAULTS), n=1)
        raise InputError(f"unknown plan field 'training.semi.{unknown[0]}'", "plan.json",
                         f"did you mean 'training.semi.{close[0]}'?" if close
                         else f"use {', '.join(sorted(SEMI_DEFAULTS))}")
    s = {**SEMI_DEFAULTS, **given}
    if method is not None:
        s["method"] = method
    if pseudo_threshold is not None:
        s["pseudo_threshold"] = pseudo_threshold
    if s["method"] not in METHODS:
        raise InputError(f"unknown semi-supervised method '{s['method']}'",
                         fix=f"use --semi {', '.join(METHODS)}")
    if s["consistency"] is None:
        s["consistency"] = METHOD_WEIGHTS[s["method"]]

    def number(key: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        v = s[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            brackets = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise InputError(f"training.semi.{key} = {v!r} is out of range", "plan.json",
                             f"use a number in {brackets}")

    number("unlabeled_ratio", 0, 16, lo_open=True)
    number("unlabeled_patch", 0, 1, lo_open=True)
    for key in ("unlabeled_on_top", "restart"):
        if not isinstance(s[key], bool):
            raise InputError(f"training.semi.{key} = {s[key]!r} is not true or false", "plan.json",
                             "use true or false")
    if s["method"] == "bcp" and s["unlabeled_patch"] < 1:
        raise InputError("bcp pastes boxes between labelled and unlabelled patches of one size", "plan.json",
                         "use training.semi.unlabeled_patch = 1 with --semi bcp")
    number("ramp_up", 0, 1)
    if s["unlabeled_start"] is not None:
        number("unlabeled_start", 0, 1, hi_open=True)
    number("consistency", 0, 1000)
    if s["mix"] not in MIXES:
        raise InputError(f"training.semi.mix = {s['mix']!r} is not one of {', '.join(MIXES)}", "plan.json",
                         f"use {' or '.join(repr(m) for m in MIXES)}")
    if s["mix"] != "none" and s["method"] not in ("mean-teacher", "uamt", "pseudo"):
        raise InputError(f"training.semi.mix = {s['mix']!r} is for mean-teacher, uamt and pseudo, "
                         f"not {s['method']}", "plan.json", "use training.semi.mix = 'none' with this method")
    if s["pseudo_tta"] not in ("none", "flip"):
        raise InputError(f"training.semi.pseudo_tta = {s['pseudo_tta']!r} is not 'none' or 'flip'",
                         "plan.json", "use 'none' or 'flip'")
    if s["pseudo_tta"] != "none" and s["method"] != "pseudo":
        raise InputError(f"training.semi.pseudo_tta is for pseudo, not {s['method']}", "plan.json",
                         "use training.semi.pseudo_tta = 'none' with this method")
    number("restart_lr", 0, 1, lo_open=True)
    if s["restart_lr"] != 1 and not s["restart"]:
        raise InputError("training.semi.restart_lr is for runs with training.semi.restart = true",
                         "plan.json", "set training.semi.restart = true, or leave restart_lr at 1")
    number("confidence", 0, 1, hi_open=True)
    number("temperature", 0, 1, lo_open=True)
    for key, off in (("confidence", 0), ("temperature", 1)):
        if s[key] != off and s["method"] not in ("mean-teacher", "uamt"):
            raise InputError(f"training.semi.{key} is for mean-teacher and uamt, not {s['method']}",
                             "plan.json", f"use training.semi.{key} = {off} with this method")
    number("ema_decay", 0, 1, lo_open=True, hi_open=True)
    number("noise", 0, 10)
    number("dropout", 0, 1, hi_open=True)
    number("pseudo_threshold", 0, 1, hi_open=True)
    number("pseudo_class_share", 0, 1)
    number("bcp_box", 0, 1, lo_open=True, hi_open=True)
    for key, lo in (("uncertainty_passes", 1), ("pseudo_rounds", 1)):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < lo:
            raise InputError(f"training.semi.{key} = {s[key]!r} is out of range", "plan.json",
                             f"use a whole number >= {lo}")
    return s


def batch_split(batch_size: int, ratio: float, on_top: bool = False) -> tuple[int, int]:
    """Labelled and unlabelled patches per step: the plan's batch shared ``1 : ratio`` (at
    least one of each, so a batch of 1 becomes 1 + 1), or with ``on_top`` the whole batch
    labelled plus ``ratio`` x batch unlabelled patches (at least one)."""
    if on_top:
        return batch_size, max(1, round(batch_size * ratio))
    n_l = max(1, round(batch_size / (1 + ratio)))
    return n_l, max(1, batch_size - n_l)


def unlabeled_patch_size(patch: Sequence[int], share: float, divisor: Sequence[int]) -> list[int]:
    """Each edge of the plan's patch times ``share``, rounded to a multiple of the network's
    down-sampling ``divisor`` (at least one multiple, at most the patch): a network pads any
    other size to that multiple, which would cost compute on zeros."""
    out = []
    for p, d in zip(patch, divisor, strict=True):
        k = max(1, round(p * share / d))
        out.append(min(int(p), k * int(d)) if p >= d else int(p))
    return out


def labelled_only_share(settings: dict) -> float:
    """The share of the run trained on labelled patches alone: ``unlabeled_start``, by default
    :data:`DEFAULT_START`, or for ``pseudo`` the first of ``pseudo_rounds + 1`` equal parts."""
    if settings.get("unlabeled_start") is not None:
        return float(settings["unlabeled_start"])
    if settings["method"] == "pseudo":
        return 1.0 / (int(settings["pseudo_rounds"]) + 1)
    return DEFAULT_START


def part_bounds(settings: dict) -> list[float]:
    """Where the parts of a run begin and end, as shares of it: the labelled-only part (when
    there is one), then the rest, which ``pseudo`` splits into ``pseudo_rounds`` equal rounds."""
    start = labelled_only_share(settings)
    rounds = int(settings["pseudo_rounds"]) if settings["method"] == "pseudo" else 1
    rest = [start + (1.0 - start) * k / rounds for k in range(rounds + 1)]
    return ([0.0] if start > 0 else []) + rest


def part_index(progress: float, bounds: Sequence[float]) -> int:
    """Which part of ``bounds`` ``progress`` falls in (a part begins within 1e-9 before its
    bound, as :meth:`SemiMode._labelled_only` counts it; the last part runs on past 1)."""
    return min(max(bisect.bisect_right(bounds, progress + 1e-9) - 1, 0), len(bounds) - 2)


def part_progress(progress: float, bounds: Sequence[float]) -> float:
    """``progress`` as a share of the part of ``bounds`` it falls in."""
    i = part_index(progress, bounds)
    return (progress - bounds[i]) / (bounds[i + 1] - bounds[i])


def sigmoid_ramp(progress: float, ramp_up: float) -> float:
    """``exp(-5 (1 - t)^2)``, ``t = progress / ramp_up`` clipped to [0, 1]: ~0.007 at the start,
    1 from ``ramp_up`` on (1 throughout when ``ramp_up`` is 0)."""
    if ramp_up <= 0:
        return 1.0
    t = min(max(progress / ramp_up, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


# --------------------------------------------------------------------------------------------
# the pieces every method is made of (tested one by one)


def consistency_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distance between the student's softmax and the teacher's probabilities, summed
    over classes and averaged over voxels (those of ``mask`` only, when given); no gradient
    flows into the teacher. 0 for identical predictions."""
    p = torch.softmax(student_logits.float(), 1)
    sq = ((p - teacher_probs.detach().float()) ** 2).sum(1)
    if mask is None:
        return sq.mean()
    m = mask.float()
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities (class axis 1) raised to ``1 / temperature`` and renormalised: below 1
    each voxel's most likely class gains, its order of classes stays (MixMatch's sharpening)."""
    logp = torch.log(probs.float().clamp_min(1e-12)) / temperature
    return torch.softmax(logp, 1)


def class_thresholds(confidence: Sequence[np.ndarray], label: Sequence[np.ndarray], num_classes: int,
                     threshold: float, share: float, samples: int = 2_000_000) -> list[float]:
    """Class-balanced thresholds (CBST): class ``c``'s is ``threshold``, lowered where needed so
    that the ``share`` most confident of the voxels predicted as ``c`` (over all ``confidence`` /
    ``label`` maps) clear it. Quantiles come from at most ``samples`` evenly spaced voxels per
    class. ``share`` 0 gives ``threshold`` for every class."""
    out = [float(threshold)] * num_classes
    if share <= 0:
        return out
    conf = np.concatenate([np.ravel(c) for c in confidence])
    lab = np.concatenate([np.ravel(m) for m in label])
    for c in range(num_classes):
        values = conf[lab == c]
        if values.size == 0:
            continue
        values = values[:: max(1, values.size // samples)].astype(np.float64)
        # the (1 - share) quantile, nudged below so that the voxels at it pass ``conf > limit``
        cut = float(np.quantile(values, 1.0 - share)) if share < 1 else float(values.min())
        out[c] = min(out[c], float(np.nextafter(np.float32(cut), np.float32(-1))))
    return out


def predict_confidence(net: nn.Module, image: np.ndarray, plan, device: torch.device,
                       precision: str, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """One preprocessed case ``(C, *S)`` -> the largest probability and its class (uint8) per
    voxel, from the network's whole-case prediction (sliding window at the plan's patch, as
    validation scores a case; ``tta`` ``flip`` averages every mirroring, as prediction does).
    float16 probabilities (steps of 5e-4 near 1) halve what a round holds for all unlabelled
    cases until the class thresholds are known."""
    predictor = window_predictor([TorchBackend(net.eval(), device, precision)], tta_transforms(tta, plan.dim))
    probs = sliding_window_inference(
        predictor, torch.from_numpy(np.array(image, dtype=np.float32)), plan.patch_size, plan.num_classes,
        overlap=plan.inference.get("overlap", 0.5), batch_size=plan.batch_size, precision=precision,
        device=device)
    conf, label = probs.max(0)
    return conf.to(torch.float16).numpy(), label.numpy().astype(np.uint8)


def threshold_maps(confidence: np.ndarray, label: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """A case's pseudo-label map from :func:`predict_confidence`'s output: its class where the
    confidence is above that class's threshold, :data:`IGNORE` elsewhere."""
    limit = np.asarray(thresholds, dtype=np.float32)[label]
    return np.where(confidence > limit, label, IGNORE).astype(np.uint8)


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice (foreground classes, pooled over the batch), each voxel
    counted with ``weight`` (0: not a target; :data:`IGNORE` targets must carry weight 0)."""
    logits = logits.float()
    k = logits.shape[1]
    weight = weight.float()
    target = torch.where(weight > 0, target, torch.zeros_like(target)).long()
    ce = F.cross_entropy(logits, target, reduction="none")
    total = weight.sum()
    ce = (ce * weight).sum() / total.clamp_min(1e-6)
    probs = torch.softmax(logits, 1)
    oh = one_hot(target, k).float()
    w = weight.unsqueeze(1)
    dims = (0, *range(2, logits.ndim))
    inter = (probs * oh * w).sum(dims)[1:]
    denom = ((probs + oh) * w).sum(dims)[1:]
    dice = 1.0 - (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + dice.mean()


def _down_weight(weight: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(weight.shape[1:]) == tuple(shape):
        return weight
    return F.interpolate(weight.unsqueeze(1).float(), size=tuple(shape), mode="nearest").squeeze(1)


def over_heads(outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor, weight: torch.Tensor,
               loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = masked_dice_ce,
               ) -> torch.Tensor:
    """``loss`` on a network's output, or on every deep-supervision head (full resolution first,
    weights halving per level as in :class:`~medunet.training.losses.DeepSupervisionLoss`), with
    target and weights down-sampled (nearest) to each head."""
    if isinstance(outputs, torch.Tensor):
        return loss(outputs, target, weight)
    w = torch.tensor([0.5 ** i for i in range(len(outputs))])
    w = (w / w.sum()).tolist()
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for wi, out in zip(w, outputs, strict=True):
        shape = out.shape[2:]
        total = total + wi * loss(out, downsample_target(target, shape), _down_weight(weight, shape))
    return total


def box_mask(batch: int, shape: Sequence[int], ratio: float, generator: torch.Generator,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, *S)`` bool: per sample a box whose edges are ``ratio`` of the patch's (at least one
    voxel) at a random position: BCP's copy-paste region."""
    mask = torch.zeros((batch, *shape), dtype=torch.bool)
    for b in range(batch):
        region = []
        for n in shape:
            edge = max(1, min(n, int(round(n * ratio))))
            start = int(torch.randint(0, n - edge + 1, (1,), generator=generator))
            region.append(slice(start, start + edge))
        mask[(b, *region)] = True
    return mask.to(device)


def copy_paste(background: torch.Tensor, foreground: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``foreground`` inside ``mask`` ``(B, *S)``, ``background`` elsewhere: images ``(B, C, *S)``
    and label maps ``(B, *S)`` alike."""
    m = mask if mask.ndim == background.ndim else mask.unsqueeze(1)
    return torch.where(m, foreground, background)


def perturb(x: torch.Tensor, generator: torch.Generator, noise: float
            ) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """The teacher's view of a batch: per sample random flips, a brightness/contrast change
    (scale 0.9-1.1, shift +-0.1) and clipped Gaussian noise; returns the flipped axes per
    sample, for :func:`unflip` on the output."""
    b, spatial = x.shape[0], x.ndim - 2
    u = torch.rand((b, 2 + spatial), generator=generator)
    scale = (0.9 + 0.2 * u[:, 0]).to(x.device, x.dtype).view(b, *([1] * (x.ndim - 1)))
    shift = (0.2 * u[:, 1] - 0.1).to(x.device, x.dtype).view(b, *([1] * (x.ndim - 1)))
    out = x * scale + shift
    if noise > 0:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        g = torch.Generator(device=x.device).manual_seed(seed)
        n = torch.randn(x.shape, generator=g, device=x.device, dtype=torch.float32) * noise
        out = out + n.clamp(-2 * noise, 2 * noise).to(x.dtype)
    flips = [tuple(2 + a for a in range(spatial) if u[i, 2 + a] < 0.5 and x.shape[2 + a] > 1)
             for i in range(b)]
    out = torch.stack([o.flip([a - 1 for a in f]) if f else o for o, f in zip(out, flips, strict=True)])
    return out, flips


def unflip(y: torch.Tensor, flips: list[tuple[int, ...]]) -> torch.Tensor:
    """Undo :func:`perturb`'s flips on an output ``(B, K, *S)``."""
    return torch.stack([o.flip([a - 1 for a in f]) if f else o for o, f in zip(y, flips, strict=True)])


@contextmanager
def batch_statistics(net: nn.Module) -> Iterator[nn.Module]:
    """The network (in eval mode otherwise) normalising with each batch's own statistics, its
    running statistics untouched (momentum 0): how the teacher predicts in the mean-teacher and
    UA-MT authors' code. Early in a run the running statistics (copied from the student) lag
    far behind its weights, and an eval-mode teacher then teaches near-constant maps."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield net
    finally:
        for m, (training, momentum) in zip(norms, saved, strict=True):
            m.train(training)
            m.momentum = momentum


def _head_convs(net: nn.Module, num_classes: int) -> list[nn.Module]:
    """The 1x1 convolutions producing the class logits (the segmentation heads)."""
    return [m for m in net.modules()
            if isinstance(m, nn.modules.conv._ConvNd) and getattr(m, "out_channels", None) == num_classes
            and all(k == 1 for k in m.kernel_size)]


@torch.no_grad()
def mc_predict(teacher: nn.Module, x: torch.Tensor, passes: int, noise: float, dropout: float,
               generator: torch.Generator, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo teacher prediction (UA-MT): ``passes`` forward passes with input noise and
    dropout on the segmentation head's input; returns the mean probabilities ``(B, K, *S)`` and
    their entropy ``(B, *S)`` (the uncertainty)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    g = torch.Generator(device=x.device).manual_seed(seed)

    def drop(_module: nn.Module, args: tuple) -> tuple:
        (h,) = args
        if dropout <= 0:
            return args
        keep = torch.rand(h.shape, generator=g, device=h.device) >= dropout
        return (h * keep.to(h.dtype) / (1.0 - dropout),)

    hooks = [m.register_forward_pre_hook(drop) for m in _head_convs(teacher, num_classes)]
    try:
        xs = x.repeat(passes, *([1] * (x.ndim - 1)))
        if noise > 0:
            n = torch.randn(xs.shape, generator=g, device=x.device, dtype=torch.float32) * noise
            xs = xs + n.clamp(-2 * noise, 2 * noise).to(xs.dtype)
        with batch_statistics(teacher):
            out = teacher(xs.contiguous(memory_format=memory_format(x.ndim - 2)))
    finally:
        for h in hooks:
            h.remove()
    probs = torch.softmax(out.float(), 1).reshape(passes, x.shape[0], *out.shape[1:]).mean(0)
    entropy = -(probs * torch.log(probs + 1e-6)).sum(1)
    return probs, entropy


# --------------------------------------------------------------------------------------------
# unlabelled patches


class ImageSampler:
    """Uniformly placed patch batches ``(B, C, *P)`` from unlabelled cases (preprocessed,
    memory-mapped); cases smaller than the patch are padded with 0, as :class:`PatchSampler`
    pads labelled ones."""

    def __init__(self, images: Sequence[np.ndarray], patch: Sequence[int], batch_size: int,
                 rng: np.random.Generator) -> None:
        self.patch = np.asarray(patch, dtype=int)
        self.batch_size, self.rng = batch_size, rng
        self.cases = list(images)  # as given (unpadded): what pseudo-label rounds predict
        self.images = []
        for img in images:
            pad = np.maximum(self.patch - np.array(img.shape[1:]), 0)
            if pad.any():
                img = np.pad(img, [(0, 0), *[(p // 2, p - p // 2) for p in pad]])
            self.images.append(img)

    def sample(self) -> np.ndarray:
        out = []
        for _ in range(self.batch_size):
            img = self.images[int(self.rng.integers(len(self.images)))]
            start = self.rng.integers(0, np.array(img.shape[1:]) - self.patch + 1)
            sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))
            out.append(img[(slice(None), *sl)])
        return np.stack(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# the mode


class SemiMode(SupervisedMode):
    """Supervised training of labelled patches plus the method's unlabelled term.

    ``ema`` (the base class's) is the teacher for ``mean-teacher``, ``uamt`` and ``bcp``
    (decay ``ema_decay``, folded in every step) and the plan's EMA otherwise; ``net_b`` is the
    second network of ``cps`` (the optimiser steps both). ``progress`` is the run's share done
    (the trainer binds it to :meth:`Loop.progress`): it drives the ramp and the pseudo rounds.
    Checkpoints add the unlabelled sampler's and the perturbations' random states, ``model_b``,
    and the frozen pseudo-label model with its round (a resumed round predicts its targets
    again with that model, rather than storing a label map per unlabelled case).
    """

    name = "semi"

    def __init__(self, *args, settings: dict, unlabeled: ImageSampler, semi_gen: torch.Generator,
                 net_b: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.s, self.method = settings, settings["method"]
        self.unlabeled, self.semi_gen, self.net_b = unlabeled, semi_gen, net_b
        self.progress: Callable[[], float] = lambda: 0.0
        self.pseudo_net: nn.Module | None = None
        self.pseudo_round = 0
        self.pseudo_sampler: PatchSampler | None = None  # unlabelled cases with this round's targets
        self.pseudo_share = float("nan")  # share of the unlabelled voxels that are targets this round
        self.pseudo_thresholds: list[float] = []  # this round's threshold per class
        self.n_labelled = self.sampler.batch_size  # labelled patches per step once unlabelled ones join
        self.name = f"semi {self.method}"
        if self.method == "cps" and net_b is None:
            raise ValueError("cps needs a second network")
        if self.method in ("mean-teacher", "uamt", "bcp") and self.ema is None:
            raise ValueError(f"{self.method} needs the teacher (ema)")

    def train(self) -> None:
        super().train()
        if self.net_b is not None:
            self.net_b.train()

    def draw(self) -> tuple[torch.Tensor, ...]:
        """Labelled patches (augmented with their labels) and unlabelled ones (the same
        augmentation, drawn independently; with their pseudo-labels for ``pseudo``)."""
        if self.method == "pseudo":
            self._enter_round()
        if self._labelled_only():  # the plan's whole batch
            self.sampler.batch_size = self.plan.batch_size
            return super().draw()
        self.sampler.batch_size = self.n_labelled
        x, y = super().draw()
        if self.method == "pseudo":
            return x, y, *self._pseudo_patches()
        u = self.unlabeled.sample()
        if self._mixing:  # a second patch per unlabelled slot, for the cutmix
            u = np.concatenate([u, self.unlabeled.sample()])
        u = torch.from_numpy(u).to(self.device, non_blocking=True)
        dummy = torch.zeros((u.shape[0], *u.shape[2:]), dtype=torch.uint8, device=u.device)
        u, _ = augment_batch(u, dummy, self.plan.training.get("augment"), self.aug_gen)
        return x, y, u.contiguous(memory_format=memory_format(self.plan.dim))

    @property
    def _mixing(self) -> bool:
        return self.s["mix"] == "cutmix"

    def weight(self) -> float:
        return float(self.s["consistency"]) * sigmoid_ramp(self.ramp_progress(), float(self.s["ramp_up"]))

    @property
    def start(self) -> float:
        """The share of the run before unlabelled patches join (:func:`labelled_only_share`)."""
        return labelled_only_share(self.s)

    def lr_at(self, training: dict, progress: float) -> float:
        """With ``restart`` the schedule runs once per part of the run (:func:`part_bounds`),
        every part after the first from ``restart_lr`` x the plan's peak."""
        if not self.s["restart"]:
            return super().lr_at(training, progress)
        bounds = part_bounds(self.s)
        share = float(self.s["restart_lr"]) if part_index(progress, bounds) > 0 else 1.0
        peak = share * float(training["lr"])
        return learning_rate({**training, "lr": peak}, part_progress(progress, bounds))

    def _labelled_only(self) -> bool:
        """Before :attr:`start` (to within float error of the progress): labelled patches alone."""
        return self.progress() < self.start - 1e-9

    def ramp_progress(self) -> float:
        """The share of the run the ramp counts: 0 when unlabelled patches join, 1 at the end;
        the labelled-only part has no unlabelled term to weigh."""
        start = self.start
        return max(0.0, (self.progress() - start) / (1.0 - start))

    def losses(self, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor | None = None,
               yu: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if u is None:  # the labelled-only part, with the columns log.csv has for the rest
            sup = self.loss_fn(self.train_net(x), y)
            if self.net_b is not None:  # cps: the second network learns the labels too
                sup = sup + self.loss_fn(self.net_b(x), y)
            parts = {"supervised_loss": float(sup.detach()), "unlabeled_loss": float("nan"),
                     "unlabeled_weight": 0.0}
            if self.method == "pseudo":
                parts.update(pseudo_labelled_share=float("nan"), pseudo_lowest_threshold=float("nan"))
            return sup, parts
        w = self.weight()
        if self.method == "cps":
            return self._cps(x, y, u, w)
        if self.method == "bcp":
            return self._bcp(x, y, u, w)
        box = None
        # u: two patches per slot, the second fills the box, the first the rest (pseudo: mixed in draw)
        if self._mixing and self.method != "pseudo":
            half = u.shape[0] // 2
            box = box_mask(half, u.shape[2:], float(self.s["bcp_box"]), self.semi_gen, u.device)
            mixed = copy_paste(u[:half], u[half:], box).contiguous(memory_format=memory_format(self.plan.dim))
            student_x, student_u = forward_pair(self.train_net, x, mixed)
        else:
            student_x, student_u = forward_pair(self.train_net, x, u)
        sup = self.loss_fn(_unlist(student_x), y)
        if self.method == "pseudo":
            unsup = over_heads(_unlist(student_u), yu, (yu != IGNORE).float())
            loss, parts = _total(sup, unsup, w)
            return loss, {**parts, "pseudo_labelled_share": self.pseudo_share,
                                "pseudo_lowest_threshold": min(self.pseudo_thresholds)}
        teacher = self.ema.module
        if self.method == "uamt":
            probs, entropy = mc_predict(teacher, u, int(self.s["uncertainty_passes"]),
                                        float(self.s["noise"]), float(self.s["dropout"]), self.semi_gen,
                                        self.plan.num_classes)
            limit = (0.75 + 0.25 * sigmoid_ramp(self.progress(), float(self.s["ramp_up"]))) \
                * math.log(self.plan.num_classes)
            mask = entropy < limit
        else:
            with torch.no_grad(), batch_statistics(teacher):
                tu, flips = perturb(u, self.semi_gen, float(self.s["noise"]))
                probs = unflip(torch.softmax(teacher(tu).float(), 1), flips)
            mask = None
        if box is not None:  # the teacher's predictions of the two patches, mixed as the student's input
            probs = copy_paste(probs[:half], probs[half:], box)
            mask = None if mask is None else copy_paste(mask[:half], mask[half:], box)
        if self.s["confidence"] > 0:  # soft targets near 0.5 would soften the student's borders
            sure = probs.amax(1) >= float(self.s["confidence"])
            mask = sure if mask is None else mask & sure
        if self.s["temperature"] != 1:
            probs = sharpen(probs, float(self.s["temperature"]))
        unsup = consistency_loss(student_u[0], probs, mask)
        return _total(sup, unsup, w)

    # ---- methods with their own forward passes

    def _cps(self, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, w: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Both networks on labelled + unlabelled patches; each learns the other's argmax. The
        labelled and unlabelled patches' cross-entropies are weighted by their voxels: the mean
        over all voxels, also when the two are of different sizes."""
        ax, au = forward_pair(self.train_net, x, u)
        bx, bu = forward_pair(self.net_b, x, u)
        sup = self.loss_fn(_unlist(ax), y) + self.loss_fn(_unlist(bx), y)
        parts, sizes = [], []
        for a, b in ((ax, bx), (au, bu)):
            target_a, target_b = b[0].detach().argmax(1), a[0].detach().argmax(1)  # a learns b's labels
            ones = torch.ones(target_a.shape, device=target_a.device)
            parts.append(over_heads(_unlist(a), target_a, ones, weighted_ce)
                         + over_heads(_unlist(b), target_b, ones, weighted_ce))
            sizes.append(target_a.numel())
        unsup = sum(p * (n / sum(sizes)) for p, n in zip(parts, sizes, strict=True))
        return _total(sup, unsup, w)

    def _bcp(self, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, w: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Bidirectional copy-paste: an unlabelled box into a labelled patch and a labelled box
        into an unlabelled patch; labels inside/outside from the label and the teacher."""
        with torch.no_grad(), batch_statistics(self.ema.module) as teacher:
            y_u = teacher(u).float().argmax(1)
        pairs = max(x.shape[0], u.shape[0])
        il = [i % x.shape[0] for i in range(pairs)]
        iu = [i % u.shape[0] for i in range(pairs)]
        xl, yl, xu, yu = x[il], y[il], u[iu], y_u[iu]
        m = box_mask(pairs, x.shape[2:], float(self.s["bcp_box"]), self.semi_gen, x.device)
        x_in, y_in = copy_paste(xl, xu, m), copy_paste(yl, yu, m)  # unlabelled box inside a labelled patch
        x_out, y_out = copy_paste(xu, xl, m), copy_paste(yu, yl, m)  # labelled box inside an unlabelled patch
        from_label = torch.cat([~m, m]).float()
        out = self.train_net(torch.cat([x_in, x_out]).contiguous(memory_format=memory_format(self.plan.dim)))
        target = torch.cat([y_in, y_out])
        sup = over_heads(out, target, from_label)
        unsup = over_heads(out, target, 1.0 - from_label)
        return _total(sup, unsup, w)

    def _pseudo_patches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``pseudo``: unlabelled patches with this round's targets, augmented together. With
        ``mix = "cutmix"`` each is a pair of them mixed by a box, image and target alike (the
        strong augmentation of pseudo-labelled images that ST++ found self-training needs)."""
        u, yu = self.pseudo_sampler.sample()
        if self._mixing:
            u2, yu2 = self.pseudo_sampler.sample()
            u, yu = np.concatenate([u, u2]), np.concatenate([yu, yu2])
        ut = torch.from_numpy(u).to(self.device, non_blocking=True)
        yt = torch.from_numpy(yu).to(self.device, non_blocking=True)
        ut, yt = augment_batch(ut, yt, self.plan.training.get("augment"), self.aug_gen)
        if self._mixing:  # the second of each pair fills the box, the first the rest
            half = ut.shape[0] // 2
            box = box_mask(half, ut.shape[2:], float(self.s["bcp_box"]), self.semi_gen, ut.device)
            ut, yt = copy_paste(ut[:half], ut[half:], box), copy_paste(yt[:half], yt[half:], box)
        return ut.contiguous(memory_format=memory_format(self.plan.dim)), yt.long()

    def _enter_round(self) -> None:
        """Entering a pseudo-label round (the run's share done says which) freezes the current
        (EMA) model and predicts the round's targets with it; a resumed round predicts them
        again with its restored frozen model."""
        # the parts restart's schedule follows: the labelled-only part (when there is one), then the rounds
        now = part_index(self.progress(), part_bounds(self.s)) + (0 if self.start > 0 else 1)
        if now > self.pseudo_round or (now and self.pseudo_net is None):
            self.pseudo_round = now
            self.pseudo_net = _frozen(self.eval_net)
            self.pseudo_sampler = None
        if self.pseudo_round and self.pseudo_sampler is None:
            self.pseudo_sampler = self._pseudo_sampler()

    def _pseudo_sampler(self) -> PatchSampler:
        """The unlabelled cases with the frozen model's targets, sampled like labelled cases."""
        cases = self.unlabeled.cases
        with torch.inference_mode():
            preds = [predict_confidence(self.pseudo_net, img, self.plan, self.device, self.precision,
                                        self.s["pseudo_tta"])
                     for img in cases]
        self.pseudo_thresholds = class_thresholds([c for c, _ in preds], [m for _, m in preds],
                                                  self.plan.num_classes, float(self.s["pseudo_threshold"]),
                                                  float(self.s["pseudo_class_share"]))
        labels = [threshold_maps(c, m, self.pseudo_thresholds) for c, m in preds]
        del preds
        total = sum(lab.size for lab in labels)
        self.pseudo_share = sum(int((lab != IGNORE).sum()) for lab in labels) / max(1, total)
        # its own generator for the foreground points, so that a resumed round draws what the
        # uninterrupted one did from the (restored) unlabelled generator
        sampler = PatchSampler(cases, labels, self.unlabeled.patch.tolist(), self.unlabeled.batch_size,
                               self.plan.training["fg_oversample"],
                               np.random.default_rng(self.pseudo_round), ignore=IGNORE)
        sampler.rng = self.unlabeled.rng
        return sampler

    # ---- checkpoints

    def checkpoint(self) -> dict:
        return {
            **super().checkpoint(),
            "semi_method": self.method,
            "unlabeled_rng": self.unlabeled.rng.bit_generator.state,
            "semi_rng": self.semi_gen.get_state(),
            "model_b": self.net_b.state_dict() if self.net_b is not None else None,
            "pseudo_model": self.pseudo_net.state_dict() if self.pseudo_net is not None else None,
            "pseudo_round": self.pseudo_round,
        }

    def restore(self, ckpt: dict, source: str) -> None:
        if ckpt.get("semi_method") != self.method:
            raise InputError(f"the checkpoint was not written by --semi {self.method} "
                             f"(it holds {ckpt.get('semi_method') or 'a supervised run'})", source,
                             "resume with the run's own settings, or train into another -o")
        super().restore(ckpt, source)
        self.unlabeled.rng.bit_generator.state = ckpt["unlabeled_rng"]
        self.semi_gen.set_state(ckpt["semi_rng"])
        if self.net_b is not None:
            self.net_b.load_state_dict(ckpt["model_b"])
        self.pseudo_round = int(ckpt.get("pseudo_round", 0))
        self.pseudo_net, self.pseudo_sampler = None, None  # the round's targets: predicted again
        if ckpt.get("pseudo_model") is not None:
            self.pseudo_net = _frozen(self.eval_net)
            self.pseudo_net.load_state_dict(ckpt["pseudo_model"])

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.unlabeled.rng = np.random.default_rng(seed + 1)
        if self.pseudo_sampler is not None:
            self.pseudo_sampler.rng = self.unlabeled.rng
        self.semi_gen.manual_seed(seed + 2)


def forward_pair(net: nn.Module, x: torch.Tensor, u: torch.Tensor
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``net``'s heads on labelled patches ``x`` and unlabelled ``u``: one batch when their sizes
    match (batch norm sees both), two passes when ``unlabeled_patch`` made ``u`` smaller. The
    smaller patches then normalise with their own statistics but leave the running ones to the
    labelled pass: statistics of small crops differ in the deep layers from a full patch's, and
    validation and prediction use the running ones. The Left Atrium run that folded them in
    scored 3.5 Dice points below the labelled cases alone (BENCHMARKS.md, issue 20)."""
    if x.shape[2:] == u.shape[2:]:
        n = x.shape[0]
        heads = _listed(net(torch.cat([x, u])))
        return [h[:n] for h in heads], [h[n:] for h in heads]
    hx = _listed(net(x))
    with batch_statistics(net):
        hu = _listed(net(u))
    return hx, hu


def _listed(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _unlist(heads: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """What the loss takes: the deep-supervision list, or the one head."""
    return heads if len(heads) > 1 else heads[0]


def _total(sup: torch.Tensor, unsup: torch.Tensor, w: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss and the parts ``log.csv`` shows."""
    return sup + w * unsup, {"supervised_loss": float(sup.detach()), "unlabeled_loss": float(unsup.detach()),
                             "unlabeled_weight": w}


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, each voxel counted with ``weight``."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1e-6)


def _frozen(net: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(net).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


# --------------------------------------------------------------------------------------------
# building the mode (called by the trainer)


def build_semi_mode(plan, net: nn.Module, train_net: nn.Module, loss_fn: nn.Module,
                    labelled: tuple[list, list], unlabeled: list[np.ndarray], device: torch.device,
                    precision: str, seed: int, settings: dict) -> SemiMode:
    """A :class:`SemiMode` for ``plan`` with its samplers, optimiser, teacher or second network."""
    from medunet.training.optim import ModelEMA, build_optimizer

    t = plan.training
    method = settings["method"]
    n_l, n_u = batch_split(plan.batch_size, float(settings["unlabeled_ratio"]),
                           bool(settings["unlabeled_on_top"]))
    u_patch = unlabeled_patch_size(plan.patch_size, float(settings["unlabeled_patch"]),
                                   getattr(net, "divisor", (1,) * plan.dim))
    net_b = None
    if method == "cps":  # the second network: same plan, another initialisation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 104729)
            net_b = plan.build_network().to(device).to(memory_format=memory_format(plan.dim))
        optimizer = build_optimizer(nn.ModuleList([net, net_b]), t)
    else:
        optimizer = build_optimizer(net, t)
    if method in ("mean-teacher", "uamt", "bcp"):
        ema = ModelEMA(net, float(settings["ema_decay"]), 1)
    else:
        ema = ModelEMA(net, t["ema"], t.get("ema_every", 1)) if t.get("ema") else None
    sampler = PatchSampler(labelled[0], labelled[1], plan.patch_size, n_l, t["fg_oversample"],
                           np.random.default_rng(seed))
    return SemiMode(plan, net, optimizer, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                    loss_fn, sampler, torch.Generator().manual_seed(seed), device, precision, ema=ema,
                    train_net=train_net, settings=settings,
                    unlabeled=ImageSampler(unlabeled, u_patch, n_u, np.random.default_rng(seed + 1)),
                    semi_gen=torch.Generator().manual_seed(seed + 2), net_b=net_b)


def semi_reason(settings: dict, n_unlabeled: int, source: str) -> str:
    """The plan's ``reasons['training.semi']``: what the settings mean, from their values."""
    s = settings
    extra = " on top of the whole labelled batch" if s["unlabeled_on_top"] else ""
    if s["unlabeled_patch"] < 1:
        extra += f", unlabelled patch edges {s['unlabeled_patch']:g} of the plan's"
    start = labelled_only_share(s)
    part = "pseudo-label rounds" if s["method"] == "pseudo" else "rest of the run" if start > 0 else "run"
    text = (f"semi-supervised ({s['method']}) with {n_unlabeled} unlabelled case(s) from {source}; "
            f"unlabelled:labelled patches {s['unlabeled_ratio']:g}:1 per batch{extra}, unlabelled weight "
            f"{s['consistency']:g} ramped (sigmoid) over the first {100 * s['ramp_up']:g}% of the {part}")
    if start > 0:
        text += f"; the first {100 * start:.3g}% of the run on labelled patches alone"
    if s["mix"] == "cutmix":
        text += f"; the student sees two unlabelled patches mixed by a box of {s['bcp_box']:.3g} of each edge"
    if s["method"] in ("mean-teacher", "uamt", "bcp"):
        text += f"; teacher = EMA {s['ema_decay']:g} of the student, validated and saved"
    if s["method"] == "pseudo":
        text += f"; {s['pseudo_rounds']} pseudo-label round(s), threshold {s['pseudo_threshold']:g}"
        if s["pseudo_class_share"] > 0:
            text += (f", lowered per class to keep its {100 * s['pseudo_class_share']:g}% most confident "
                     "voxels (class-balanced)")
        if s["pseudo_tta"] == "flip":
            text += ", targets predicted with every mirroring averaged"
    if s["restart"]:
        text += "; the learning-rate schedule runs once per part of the run (restart)"
        if s["restart_lr"] != 1:
            text += f", every part after the first from {s['restart_lr']:g} of the plan's rate"
    if s["method"] == DEFAULT_METHOD:
        text += " (the default method: bench/semisup.py's best semi-supervised run at 8 labels)"
    return text


def unlabeled_source(folder: Path | None) -> str:
    return "imagesTr (images without a label)" if folder is None else str(folder)
