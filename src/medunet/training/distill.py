"""Shrink a trained model: structured pruning of the teacher, then knowledge distillation.

``distill(teacher_dir, student_dir, width=0.5)`` builds a student whose channels per level are
``width`` times the teacher's (about ``width**2`` of its parameters and compute), initialises it
from the teacher by L1-norm channel pruning (Li et al. 2017, "Pruning Filters for Efficient
ConvNets") and fine-tunes it on the teacher's soft outputs plus the labels (Hinton et al. 2015):

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * Dice+CE

The student directory is an ordinary model directory (``plan.json``, ``splits.json``,
``checkpoint_{best,last}.pt``, ``log.csv``, ``curves.png``) plus ``distill.json`` with both
models' parameter counts, validation Dice and seconds per validation image, so ``predict``,
``export`` and ``serve`` use it like any trained model.

The pruning is written for :class:`medunet.nets.UNet` (the ``unet`` and ``classic`` archs; a
teacher of another variant is refused for ``init='prune'`` and distils from a random start): the
channel bookkeeping follows its forward pass (encoder blocks, down-sampling, up-sampling, the
``[upsampled, skip]`` concatenation, residual shortcuts and heads). A layer it cannot map
raises :class:`PruneError`; ``distill`` then starts from a random initialisation and says so
on the console and in ``distill.json`` (``init_used``). GroupNorm layers are sliced but their
groups re-form over other channels (an approximation, listed in ``prune_notes``). After pruning,
BatchNorm statistics are re-estimated on a few training batches (the removed channels changed
every layer's input), and the initialised student is validated and saved as "epoch 0", so
``checkpoint_best.pt`` is never worse than the pruned teacher on the validation cases.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medunet.datasets import Case, Dataset, find_dataset, validate_dataset
from medunet.errors import InputError
from medunet.files import exclusive_lock
from medunet.modeldir import load_network
from medunet.planning import Plan
from medunet.preprocessing.cache import preprocess_dataset
from medunet.runtime import (
    autocast,
    float_mode_kept,
    flush_denormals,
    memory_format,
    resolve_device,
    resolve_precision,
)
from medunet.training.callbacks import write_json
from medunet.training.loop import Loop, SupervisedMode, ValidationSet, parse_duration
from medunet.training.losses import build_loss
from medunet.training.optim import ModelEMA, build_optimizer
from medunet.training.sampler import PatchSampler

INITS = ("prune", "random")
TIMING_IMAGES = 4  # validation images timed per pass: enough for a median, short on 3D data
# keys under which a model directory may record the dataset it was trained on (splits.json
# first, then plan.json); the trainer does not record one yet, so ``data`` is usually needed
DATA_KEYS = ("data", "data_path", "dataset_path", "dataset_root", "dataset")


class PruneError(ValueError):
    """The teacher and student differ in a way channel slicing cannot map."""


@dataclass
class DistillResult:
    """What a finished distillation reports (also written to ``distill.json``)."""

    student_dir: Path
    teacher_dice: float
    student_dice: float
    teacher_params: int
    student_params: int
    teacher_seconds_per_image: float
    student_seconds_per_image: float
    speedup: float
    epochs: int
    iterations: int
    seconds: float
    init_used: str
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# student plan


def scale_features(features: list[int], width: float) -> list[int]:
    """``round(width * f)`` to a multiple of 4 (at least 4): multiples of 4 keep channels_last /
    vectorised kernels efficient and GroupNorm divisible."""
    return [max(4, int(round(width * f / 4)) * 4) for f in features]


def student_plan(teacher_plan: Plan, width: float, teacher_dir: str | Path) -> Plan:
    """The teacher's plan with every level's channels scaled by ``width``."""
    from medunet.nets.registry import classic_options

    d = teacher_plan.to_dict()
    net = dict(d["network"])
    if net.get("arch") == "classic":  # the paper's widths are fixed: the student is that U-Net, thinner
        net.update(classic_options(len(net["features"])), arch="unet")
    teacher_features = list(net["features"])
    net["features"] = scale_features(teacher_features, width)
    d["network"] = net
    reasons = dict(d.get("reasons", {}))
    reasons["network"] = (f"distilled from {Path(teacher_dir).resolve()} at width {width:g}: features "
                          f"{teacher_features} -> {net['features']}; "
                          + reasons.get("network", ""))
    reasons["distillation"] = f"distilled from {Path(teacher_dir).resolve()} at width {width:g}"
    d["reasons"] = reasons
    # the teacher's post-processing was chosen on the teacher's predictions, not the student's
    d["inference"] = {k: v for k, v in d.get("inference", {}).items() if k != "postprocessing"}
    return Plan.from_dict(d)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------------------------
# structured L1-norm pruning


def _keep(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending order (so width 1.0 is the identity)."""
    if k > score.numel():
        raise PruneError(f"the student has {k} channels where the teacher has {score.numel()}")
    return torch.sort(torch.topk(score, k).indices).values


def _l1(weight: torch.Tensor, out_dim: int = 0) -> torch.Tensor:
    """L1 norm of each output channel's filter."""
    return weight.detach().abs().transpose(0, out_dim).flatten(1).sum(1)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise PruneError(f"{name}: sliced teacher shape {tuple(src.shape)} != student {tuple(dst.shape)}")
    dst.copy_(src)


def _copy_conv(t: nn.Module, s: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor, name: str) -> None:
    if type(t) is not type(s) or not isinstance(t, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d,
                                                    nn.ConvTranspose3d)):
        raise PruneError(f"{name}: cannot map {type(t).__name__} onto {type(s).__name__}")
    if t.groups != 1:
        raise PruneError(f"{name}: grouped convolutions are not supported")
    w = t.weight.detach()
    if isinstance(t, nn.modules.conv._ConvTransposeNd):  # weight is (in, out, *k)
        w = w.index_select(0, in_idx).index_select(1, out_idx)
    else:
        w = w.index_select(0, out_idx).index_select(1, in_idx)
    _copy(s.weight, w, f"{name}.weight")
    if (t.bias is None) != (s.bias is None):
        raise PruneError(f"{name}: bias present in one network only")
    if t.bias is not None:
        _copy(s.bias, t.bias.detach().index_select(0, out_idx), f"{name}.bias")


def _copy_norm(t: nn.Module, s: nn.Module, idx: torch.Tensor, name: str, notes: list[str]) -> None:
    if type(t) is not type(s):
        raise PruneError(f"{name}: cannot map {type(t).__name__} onto {type(s).__name__}")
    if isinstance(t, nn.Identity):
        return
    if isinstance(t, nn.GroupNorm) and (t.num_groups != s.num_groups or s.num_channels != t.num_channels):
        # weights copy, but the groups are re-formed over other channels: an approximation
        notes.append(f"{name}: GroupNorm groups differ ({t.num_groups} of {t.num_channels} -> "
                     f"{s.num_groups} of {s.num_channels}); affine parameters copied, statistics regroup")
    for attr in ("weight", "bias", "running_mean", "running_var"):
        src, dst = getattr(t, attr, None), getattr(s, attr, None)
        if (src is None) != (dst is None):
            raise PruneError(f"{name}.{attr} is present in one network only")
        if src is not None:
            _copy(dst, src.detach().index_select(0, idx), f"{name}.{attr}")
    tracked_t, tracked_s = getattr(t, "num_batches_tracked", None), getattr(s, "num_batches_tracked", None)
    if tracked_t is not None and tracked_s is not None:
        tracked_s.copy_(tracked_t)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _prune_sequence(t_layers: list[nn.Module], s_layers: list[nn.Module], idx: torch.Tensor, name: str,
                    notes: list[str], last_out: torch.Tensor | None = None) -> torch.Tensor:
    """Conv -> norm -> act chains: each conv keeps its strongest filters; norms follow the conv
    before them; parameter-free layers pass channels through. ``last_out`` forces the indices of
    the last conv (a residual sum ties them to the shortcut)."""
    if len(t_layers) != len(s_layers):
        raise PruneError(f"{name}: {len(t_layers)} layers in the teacher, {len(s_layers)} in the student")
    conv_pos = [i for i, m in enumerate(t_layers) if _is_conv(m)]
    for i, (t, s) in enumerate(zip(t_layers, s_layers, strict=True)):
        here = f"{name}.{i}"
        if _is_conv(t):
            out_dim = 1 if isinstance(t, nn.modules.conv._ConvTransposeNd) else 0
            forced = i == conv_pos[-1] and last_out is not None
            out = last_out if forced else _keep(_l1(t.weight, out_dim), s.out_channels)
            _copy_conv(t, s, out, idx, here)
            idx = out
        elif isinstance(t, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            _copy_norm(t, s, idx, here, notes)
        elif isinstance(t, nn.Sequential):
            idx = _prune_sequence(list(t), list(s), idx, here, notes)
        elif _has_params(t):
            raise PruneError(f"{here}: no channel mapping for {type(t).__name__}")
        elif type(t) is not type(s):
            raise PruneError(f"{here}: {type(t).__name__} in the teacher, {type(s).__name__} in the student")
    return idx


def _prune_block(t: nn.Module, s: nn.Module, idx: torch.Tensor, name: str, notes: list[str]) -> torch.Tensor:
    """A :class:`ConvBlock`; with a residual shortcut the last conv and the shortcut feed one sum,
    so they keep the same channels: scored together (conv shortcut), or the block's input
    channels (identity shortcut)."""
    t_sc, s_sc = getattr(t, "shortcut", None), getattr(s, "shortcut", None)
    if (t_sc is None) != (s_sc is None) or (t_sc is not None and type(t_sc) is not type(s_sc)):
        raise PruneError(f"{name}: the residual shortcut differs between teacher and student "
                         "(a channel change at one width only)")
    t_body, s_body = list(t.body), list(s.body)
    last_out = None
    if isinstance(t_sc, nn.Identity):
        last_out = idx
    elif t_sc is not None:
        last_conv = [m for m in t_body if _is_conv(m)][-1]
        k = [m for m in s_body if _is_conv(m)][-1].out_channels
        last_out = _keep(_l1(last_conv.weight) + _l1(t_sc[0].weight), k)
        _prune_sequence(list(t_sc), list(s_sc), idx, f"{name}.shortcut", notes, last_out=last_out)
    return _prune_sequence(t_body, s_body, idx, f"{name}.body", notes, last_out=last_out)


def _prune_up(t: nn.Module, s: nn.Module, idx: torch.Tensor, name: str, notes: list[str]) -> torch.Tensor:
    layers_t = list(t) if isinstance(t, nn.Sequential) else [t]
    layers_s = list(s) if isinstance(s, nn.Sequential) else [s]
    return _prune_sequence(layers_t, layers_s, idx, name, notes)


def prune_unet(teacher_net: nn.Module, student_net: nn.Module, notes: list[str] | None = None) -> nn.Module:
    """Copy the teacher's strongest channels into an already built, thinner student (in place).

    Per conv, the output channels with the largest L1 filter norm are kept (ascending order), and
    every consumer of those channels is sliced the same way: the next conv's input channels, norm
    parameters and running statistics, the transposed conv, the decoder conv whose input is
    ``[upsampled, skip]`` (both halves mapped), residual shortcuts, deep-supervision heads and the
    final 1x1 head (its class outputs are all kept). With equal widths the copy is exact.

    Raises :class:`PruneError` when a layer cannot be mapped; ``notes`` collects approximations.
    """
    from medunet.nets import UNet

    notes = notes if notes is not None else []
    # exactly UNet: the variants built on it (attention, cbam, scse, transunet) add layers it cannot map
    if type(teacher_net) is not UNet or type(student_net) is not UNet:
        raise PruneError(f"pruning maps medunet UNets only, got {type(teacher_net).__name__}")
    for attr in ("spatial_dims", "in_channels", "out_channels", "strides", "deep_supervision"):
        if getattr(teacher_net, attr) != getattr(student_net, attr):
            raise PruneError(f"teacher and student differ in {attr}")
    if (len(teacher_net.encoders), len(teacher_net.downs), len(teacher_net.heads)) != (
            len(student_net.encoders), len(student_net.downs), len(student_net.heads)):
        raise PruneError("teacher and student differ in depth")
    with torch.no_grad():
        idx = torch.arange(teacher_net.in_channels)
        skips: list[torch.Tensor] = []
        for level, (te, se) in enumerate(zip(teacher_net.encoders, student_net.encoders, strict=True)):
            idx = _prune_block(te, se, idx, f"encoders.{level}", notes)
            if level < len(teacher_net.downs):
                skips.append(idx)
                idx = _prune_up(teacher_net.downs[level], student_net.downs[level], idx,
                                f"downs.{level}", notes)
        n_dec = len(teacher_net.decoders)
        for i in range(n_dec):
            up_idx = _prune_up(teacher_net.ups[i], student_net.ups[i], idx, f"ups.{i}", notes)
            t_first = next(m for m in teacher_net.decoders[i].body if _is_conv(m))
            n_up_teacher = t_first.in_channels - _channels_of(teacher_net, i)
            cat_idx = torch.cat([up_idx, skips[-1 - i] + n_up_teacher])
            idx = _prune_block(teacher_net.decoders[i], student_net.decoders[i], cat_idx,
                               f"decoders.{i}", notes)
            last = len(teacher_net.heads) - 1 if i == n_dec - 1 else None
            head = i if teacher_net.deep_supervision else last
            if head is not None:
                classes = torch.arange(teacher_net.out_channels)
                _copy_conv(teacher_net.heads[head], student_net.heads[head], classes, idx, f"heads.{head}")
    return student_net


def _channels_of(net: nn.Module, decoder: int) -> int:
    """Channels of the skip that decoder ``decoder`` concatenates (the matching encoder's output)."""
    enc = net.encoders[len(net.decoders) - 1 - decoder]
    return [m for m in enc.body if _is_conv(m)][-1].out_channels


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches: list[torch.Tensor], device: torch.device,
                          precision: str) -> bool:
    """Re-estimate BatchNorm running statistics on real batches (cumulative average).

    Pruning removes inputs of every layer, so the teacher's running means and variances no
    longer describe the student's activations; a few forward passes fix that cheaply.
    Returns whether the net had any BatchNorm.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return False
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = net.training
    net.train()
    for x in batches:
        with autocast(device, precision):
            net(x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    net.train(was_training)
    return True


# --------------------------------------------------------------------------------------------
# losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, summed over classes and averaged
    over voxels; the T^2 keeps its gradient on the scale of the hard-label loss (Hinton 2015)."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)
    return kl.mean() * t * t


def supervised_loss(plan: Plan) -> nn.Module:
    """The plan's hard-label loss on the full-resolution output (distillation supervises only it)."""
    t = plan.training
    return build_loss(t.get("loss", "dice_ce"), plan.num_classes, t.get("loss_options"), deep_supervision=0)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      supervised: nn.Module, temperature: float, alpha: float
                      ) -> tuple[torch.Tensor, float, float]:
    """``alpha * kd + (1 - alpha) * supervised``; also returns both parts for the log."""
    kd = kd_loss(student_logits, teacher_logits, temperature)
    if alpha >= 1.0:
        return kd, float(kd.detach()), float("nan")
    sup = supervised(student_logits, target)
    return alpha * kd + (1 - alpha) * sup, float(kd.detach()), float(sup.detach())


# --------------------------------------------------------------------------------------------
# data


def recorded_data(teacher_dir: Path) -> Path | None:
    """The dataset folder the teacher's model directory names, if it names one that exists."""
    for name in ("splits.json", "plan.json"):
        path = teacher_dir / name
        if not path.is_file():
            continue
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        for key in DATA_KEYS:
            value = d.get(key) if isinstance(d, dict) else None
            if isinstance(value, str) and Path(value).is_dir():
                return Path(value)
    return None


def _load_cases(cases: list[Case], dataset: Dataset, plan: Plan, cache_dirs: list[Path]
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The cases as the teacher saw them: preprocessed (crop, resample, normalise) through the
    shared ``.npy`` cache, reusing the teacher's cache when it exists (its key is the
    preprocessing part of the plan, which the student shares), else the first of ``cache_dirs``."""
    cache_dir = next((d for d in cache_dirs[1:] if d.is_dir()), cache_dirs[0])
    ids = [c.case_id for c in cases]
    workers = 1 if len(ids) <= 8 else min(2, os.cpu_count() or 1)  # a pool costs seconds to start
    cached = preprocess_dataset(dataset, plan, cache_dir, case_ids=ids, workers=workers, progress=False)
    pairs = [cached[i].load() for i in ids]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _teacher_split(teacher_dir: Path, dataset: Dataset, plan: Plan, seed: int) -> dict:
    """The teacher's ``splits.json`` (so both models validate on the same cases); a model
    directory without one gets the trainer's rule: a seeded 20 % validation share."""
    path = teacher_dir / "splits.json"
    known = {c.case_id for c in dataset.train}
    if path.is_file():
        try:
            split = json.loads(path.read_text())
            ids = list(split["train"]) + list(split["val"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"cannot read splits.json ({exc})", path) from exc
        missing = [c for c in ids if c not in known]
        if missing:
            raise InputError(f"the teacher's splits.json names cases that are not in the dataset: "
                             f"{missing[:3]}", path,
                             "pass the dataset the teacher was trained on with --data")
        return split
    ids = sorted(known)
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * plan.training.get("val_fraction", 0.2)))) if len(ids) > 1 else 0
    split = {"seed": seed, "val": sorted(ids[:n_val]), "train": sorted(ids[n_val:])}
    if not split["val"]:
        split["val"] = list(split["train"])
    return split


# --------------------------------------------------------------------------------------------
# the run


def time_per_image(nets: dict[str, nn.Module], images: list[np.ndarray], plan_of: dict[str, Plan],
                   device: torch.device, precision: str, repeats: int = 3) -> dict[str, float]:
    """Median seconds per image of a whole-image sliding-window pass, runs interleaved between
    the networks so a change of machine load hits all of them alike."""
    from medunet.inference.network import sliding_window_inference

    times: dict[str, list[float]] = {k: [] for k in nets}
    images = [np.array(img) for img in images]  # writable copies of (memory-mapped) cached arrays
    with torch.inference_mode():
        for _ in range(repeats):
            for name, net in nets.items():
                net.eval()
                plan = plan_of[name]
                t0 = time.perf_counter()
                for img in images:
                    sliding_window_inference(
                        net, torch.from_numpy(img), plan.patch_size, plan.num_classes,
                        overlap=plan.inference.get("overlap", 0.5), batch_size=plan.batch_size,
                        precision=precision, device=device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - t0) / max(1, len(images)))
    return {k: statistics.median(v) for k, v in times.items()}


def check_prunable(teacher_plan: Plan, init: str, teacher_dir: str | Path | None = None) -> None:
    """Refuse ``init='prune'`` for a teacher whose variant :func:`prune_unet` cannot map (only the
    plain U-Nets, ``unet`` and ``classic``): a clear error instead of a silent random start. Every
    variant distils at any width from a random start (``init='random'``)."""
    from medunet.nets import ARCHS, get_arch

    arch = teacher_plan.network.get("arch") or "unet"
    if init == "prune" and not get_arch(arch).prunable:
        prunable = ", ".join(n for n, a in ARCHS.items() if a.prunable)
        raise InputError(f"channel pruning maps the {prunable} archs only, not this teacher's arch '{arch}'",
                         teacher_dir, "distil from a random start instead: --init random")


def _check_args(width: float, temperature: float, alpha: float, init: str) -> None:
    if not (isinstance(width, (int, float)) and 0 < width <= 1):
        raise InputError(f"width {width} is out of range", fix="use a width in (0, 1], e.g. 0.5")
    if not temperature > 0:
        raise InputError(f"temperature {temperature} must be positive", fix="use e.g. --temperature 2")
    if not 0 <= alpha <= 1:
        raise InputError(f"alpha {alpha} is out of range", fix="use a value in [0, 1], e.g. 0.5")
    if init not in INITS:
        raise InputError(f"unknown init '{init}'", fix=f"use {' or '.join(INITS)}")


def distill(teacher_dir: str | Path, student_dir: str | Path, data: str | Path | None = None, *,
            width: float = 0.5, epochs: int | None = None, time_budget: str | float | None = None,
            temperature: float = 2.0, alpha: float = 0.5, init: str = "prune", device: str | None = None,
            precision: str | None = None, seed: int = 0, progress: bool = True,
            lr: float | None = None, resume: bool = False) -> DistillResult:
    """Train a thinner student on a trained teacher's soft outputs and compare the two.

    Args:
        teacher_dir: a model directory written by ``medunet train``.
        student_dir: the new model directory (must not hold a run yet, unless ``resume``).
        data: the dataset folder; default: the one the teacher's directory records (an
            :class:`InputError` asks for it when none is recorded).
        width: channels of the student per level as a share of the teacher's, in (0, 1].
        epochs, time_budget: as for ``train`` (default: the plan's epochs).
        temperature, alpha: softening of both outputs; share of the distillation term.
        init: ``prune`` (L1-norm channel pruning of the teacher) or ``random``.
        lr: peak learning rate (default: the plan's).
        resume: continue the run in ``student_dir`` from ``checkpoint_last.pt`` (a larger
            ``epochs`` extends a finished one); width, temperature, alpha and the split are
            the recorded ones (``distill.json``).
    """
    teacher_dir, student_dir = Path(teacher_dir), Path(student_dir)
    _check_args(width, temperature, alpha, init)
    if not (teacher_dir / "plan.json").is_file():
        folds = sorted(p.name for p in teacher_dir.glob("fold_*") if (p / "plan.json").is_file())
        raise InputError("not a model directory (no plan.json)", teacher_dir,
                         f"distil one fold, e.g. {teacher_dir / folds[0]}" if folds
                         else "pass a directory written by 'medunet train'")
    if student_dir.resolve() == teacher_dir.resolve():
        raise InputError("the student directory is the teacher's", student_dir, "choose another -o")
    check_prunable(Plan.load(teacher_dir), init if not resume else "random", teacher_dir)
    last = student_dir / "checkpoint_last.pt"
    if resume and not (last.is_file() and (student_dir / "distill.json").is_file()):
        raise InputError("nothing to resume: no checkpoint_last.pt and distill.json", student_dir,
                         "run without --resume")
    if not resume and (last.is_file() or (student_dir / "distill.json").is_file()):
        raise InputError("the student directory already holds a run", student_dir,
                         "add --resume to continue or extend it, or choose another -o")
    recorded = json.loads((student_dir / "distill.json").read_text()) if resume else {}
    if resume:
        width, temperature, alpha = recorded["width"], recorded["temperature"], recorded["alpha"]
        data = data if data is not None else recorded.get("data")
    budget = parse_duration(time_budget) if time_budget is not None else None
    if data is None:
        data = recorded_data(teacher_dir)
        if data is None:
            raise InputError("the teacher's model directory does not record its dataset", teacher_dir,
                             "pass the dataset the teacher was trained on with --data DATA")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    with exclusive_lock(student_dir / ".train.lock", "another run is writing to this student directory",
                        "wait for it to finish, or choose another -o"), float_mode_kept():
        flush_denormals(dev)
        return _distill(teacher_dir, student_dir, Path(data), width, epochs, budget, temperature, alpha, init,
                        dev, prec, seed, progress, lr, recorded)


def _distill(teacher_dir: Path, student_dir: Path, data: Path, width: float, epochs: int | None,
             budget: float | None, temperature: float, alpha: float, init: str, dev: torch.device,
             prec: str, seed: int, progress: bool, lr: float | None, recorded: dict) -> DistillResult:
    """The run of :func:`distill` once its arguments are checked (``recorded``: a resumed run's
    ``distill.json``, empty for a new one)."""
    resume = bool(recorded)
    t_plan, teacher, _ = load_network(teacher_dir, "best")
    dataset = find_dataset(data)
    validate_dataset(dataset)
    if dataset.num_channels != t_plan.in_channels or list(dataset.label_values) != list(t_plan.label_values):
        raise InputError(f"the dataset ({dataset.num_channels} channels, labels {dataset.label_values}) "
                         f"does not match the teacher ({t_plan.in_channels} channels, labels "
                         f"{t_plan.label_values})",
                         Path(data), "pass the dataset the teacher was trained on with --data")
    if resume:
        split = json.loads((student_dir / "splits.json").read_text())
        s_plan = Plan.load(student_dir)
    else:
        split = _teacher_split(teacher_dir, dataset, t_plan, seed)
        s_plan = student_plan(t_plan, width, teacher_dir)
    if lr is not None:
        s_plan.training["lr"] = float(lr)

    own_cache = student_dir / "preprocessed"
    caches = [own_cache, teacher_dir / "preprocessed", teacher_dir.parent / "preprocessed"]
    cache_existed = own_cache.exists()
    written = [student_dir / n for n in ("plan.json", "splits.json", "distill.json", "log.csv", "curves.png",
                                         "selection.json")]
    try:
        by_id = {c.case_id: c for c in dataset.train}
        tr_img, tr_lab = _load_cases([by_id[i] for i in split["train"]], dataset, s_plan, caches)
        val_img, val_lab = _load_cases([by_id[i] for i in split["val"]], dataset, s_plan, caches)

        torch.manual_seed(seed)
        mf = memory_format(s_plan.dim)
        student = s_plan.build_network()
        init_used, notes = recorded.get("init_used", init), list(recorded.get("prune_notes", []))
        if init == "prune" and not resume:
            try:
                prune_unet(teacher, student, notes)
            except PruneError as exc:  # documented fall-back: a fresh student, said out loud
                init_used = f"random (pruning failed: {exc})"
                student = s_plan.build_network()
        teacher = teacher.to(dev).to(memory_format=mf).eval()
        student = student.to(dev).to(memory_format=mf)
        t = s_plan.training
        sampler = PatchSampler(tr_img, tr_lab, s_plan.patch_size, s_plan.batch_size, t["fg_oversample"],
                               np.random.default_rng(seed))
        if init_used == "prune" and width < 1 and not resume:
            batches = [torch.from_numpy(sampler.sample()[0]).to(dev).contiguous(memory_format=mf)
                       for _ in range(8)]
            if recalibrate_batchnorm(student, batches, dev, prec):
                notes.append("BatchNorm statistics re-estimated on 8 training batches after pruning")
        mode = DistillMode(s_plan, student, build_optimizer(student, t),
                           torch.amp.GradScaler(dev.type, enabled=prec == "fp16"), supervised_loss(s_plan),
                           sampler, torch.Generator().manual_seed(seed), dev, prec,
                           ema=ModelEMA(student, t["ema"], t.get("ema_every", 1)) if t.get("ema") else None,
                           teacher=teacher, temperature=temperature, alpha=alpha)
        val = ValidationSet(val_img, val_lab)
        loop = Loop(mode, s_plan, student_dir, val, dev, prec, epochs=epochs, budget=budget, seed=seed)
        if resume:
            loop.resume(student_dir / "checkpoint_last.pt")
            config = {**recorded, "epochs": epochs, "time_budget_seconds": budget}
        else:
            config = {
                "teacher": str(teacher_dir.resolve()), "data": str(Path(data).resolve()), "width": width,
                "teacher_features": t_plan.network["features"],
                "student_features": s_plan.network["features"],
                "init": init, "init_used": init_used, "prune_notes": notes, "temperature": temperature,
                "alpha": alpha, "seed": seed, "epochs": epochs, "time_budget_seconds": budget,
                "device": dev.type, "precision": prec, "lr": t["lr"],
            }
            config["student_val_dice_at_init"] = float(np.mean(val.dice(student, s_plan, dev, prec)))
            student_dir.mkdir(parents=True, exist_ok=True)
            s_plan.save(student_dir / "plan.json")
            write_json(student_dir / "splits.json", split)
            write_json(student_dir / "distill.json", config)
            # "epoch 0" is the initialised student: fine-tuning that only makes it worse (a wide
            # student, a high learning rate) then leaves checkpoint_best.pt at the pruned teacher
            loop.state.best_dice = config["student_val_dice_at_init"]
            loop.save(best=True)
        history = loop.run(
            f"distilling {t_plan.network['features']} -> {s_plan.network['features']} "
            f"(init {init_used}: val Dice {config['student_val_dice_at_init']:.4f}) on {len(tr_img)} "
            f"cases (val {len(val_img)}), {dev.type} {prec}"
            + (f", budget {budget:.0f}s" if budget else f", {loop.epochs} epochs"), progress=progress)
    except BaseException:
        # nothing half-written: a run stopped before its first checkpoint leaves no files behind
        # (the folder neither, if this run made it); one stopped later keeps a loadable student
        if not resume and not (student_dir / "checkpoint_last.pt").is_file():
            for p in written:
                p.unlink(missing_ok=True)
            if not cache_existed:
                shutil.rmtree(own_cache, ignore_errors=True)
        raise  # a folder the lock created is removed with the lock when nothing else is in it

    # compare the best student with the teacher on the same validation images and machine
    best = torch.load(student_dir / "checkpoint_best.pt", map_location=dev, weights_only=True)
    student = copy.deepcopy(mode.eval_net)
    student.load_state_dict(best["ema_model"] if best.get("ema_model") else best["model"])
    t_dice = val.dice(teacher, t_plan, dev, prec)
    s_dice = val.dice(student, s_plan, dev, prec)
    secs = time_per_image({"teacher": teacher, "student": student}, val_img[:TIMING_IMAGES],
                          {"teacher": t_plan, "student": s_plan}, dev, prec)
    if not cache_existed and own_cache.is_dir():  # the cache is rebuilt (from the teacher's) on resume
        shutil.rmtree(own_cache, ignore_errors=True)
    names = s_plan.label_names[1:]
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    state = loop.state
    summary = {
        **config,
        "teacher_params": t_params, "student_params": s_params,
        "param_ratio": round(s_params / t_params, 4),
        "val_cases": split["val"],
        "teacher_val_dice": float(np.mean(t_dice)), "student_val_dice": float(np.mean(s_dice)),
        "teacher_val_dice_per_class": dict(zip(names, t_dice, strict=True)),
        "student_val_dice_per_class": dict(zip(names, s_dice, strict=True)),
        "teacher_seconds_per_image": round(secs["teacher"], 6),
        "student_seconds_per_image": round(secs["student"], 6),
        "speedup": round(secs["teacher"] / max(secs["student"], 1e-12), 3),
        "timing": f"median of 3 interleaved whole-image sliding-window passes over the first "
                  f"{min(TIMING_IMAGES, len(val_img))} validation images",
        "epochs_done": state.epoch, "iterations": state.iteration,
        "seconds": round(loop.elapsed(), 1), "best_epoch_val_dice": state.best_dice,
    }
    write_json(student_dir / "distill.json", summary)
    return DistillResult(student_dir, summary["teacher_val_dice"], summary["student_val_dice"], t_params,
                         s_params, secs["teacher"], secs["student"], summary["speedup"], state.epoch,
                         state.iteration, loop.elapsed(), init_used, history)


class DistillMode(SupervisedMode):
    """Supervised training whose loss is mixed with the teacher's softened outputs
    (:func:`distillation_loss`); everything else (device-side augmentation, EMA, checkpoints,
    validation, early stopping, resume) is the loop's and the supervised mode's."""

    name = "distill"

    def __init__(self, *args, teacher: nn.Module, temperature: float, alpha: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.inference_mode():
            soft = self.teacher(x)
        soft = soft.clone()  # an inference tensor cannot take part in autograd; a clone can
        out = self.train_net(x)
        if isinstance(out, (list, tuple)):  # deep supervision: distil the full-resolution output
            out = out[0]
        loss, kd, sup = distillation_loss(out, soft, y, self.loss_fn, self.temperature, self.alpha)
        return loss, {"kd_loss": kd, "supervised_loss": sup}
