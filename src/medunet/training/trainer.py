"""The training run: set-up, the loop (one short function), validation and checkpoints.

``train()`` is what ``medunet train`` calls. The loop itself is :func:`_fit`; everything it
needs is gathered in :class:`_Run` so each helper stays small.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medunet.augment import augment_batch, validate_augmentation
from medunet.datasets import Case, Dataset, find_dataset, validate_dataset
from medunet.errors import InputError
from medunet.files import exclusive_lock
from medunet.inference.cascade import is_cascade
from medunet.inference.sliding_window import sliding_window_inference
from medunet.planning import Plan, fingerprint_dataset, make_plan
from medunet.preprocessing.cache import preprocess_dataset
from medunet.runtime import autocast, flush_denormals, memory_format, resolve_device, resolve_precision
from medunet.training.callbacks import CsvLog, LiveDisplay, plot_curves, save_run, write_json
from medunet.training.cascade import train_cascade, wants_cascade
from medunet.training.losses import build_loss
from medunet.training.optim import (
    ModelEMA,
    backward_and_step,
    build_optimizer,
    load_optimizer_state,
    validate_ema,
)
from medunet.training.sampler import PatchSampler
from medunet.training.schedule import learning_rate

VAL_TIME_SHARE = 0.15  # plan default of training.val_time_share: validation's share of the time
VAL_MIN_CASES = 5  # plan default of training.val_min_cases: never score fewer cases than this
PATIENCE_AFTER = 0.5  # plan default of training.patience_after: share of the run before patience counts
_clock = time.perf_counter  # the validation share's clock (a test replaces it)
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str | float | int) -> float:
    """``"30m"``, ``"90s"``, ``"1h"``, ``"1h30m"`` or plain seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(text)
    if not text.strip() or not m or not any(m.groups()):
        raise InputError(f"cannot read the duration '{text}'", fix="write it like 90s, 30m, 1h or 1h30m")
    h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = 3600 * h + 60 * mnt + s
    if seconds <= 0:
        raise InputError(f"the duration '{text}' is not positive")
    return seconds


@dataclass
class TrainResult:
    """What a finished run reports."""

    model_dir: Path
    best_dice: float
    epochs: int
    iterations: int
    seconds: float
    history: list[dict] = field(default_factory=list)


@dataclass
class RunState:
    """Counters saved in every checkpoint so a run resumes where it stopped."""

    epoch: int = 0
    iteration: int = 0
    elapsed: float = 0.0
    best_dice: float = -1.0
    stale_epochs: int = 0
    stopped_early: bool = False
    val_cases: int = 0  # validation subset size (0: not chosen yet), fixed after the first one
    val_every: int = 1  # validate every this many epochs (> 1 only when few cases are slow)
    val_seconds_total: float = 0.0


@dataclass
class _Run:
    plan: Plan
    model_dir: Path
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    sampler: PatchSampler
    aug_gen: torch.Generator
    val_images: list[np.ndarray]
    val_labels: list[np.ndarray]
    device: torch.device
    precision: str
    epochs: int | None
    budget: float | None
    state: RunState
    log: CsvLog
    ema: ModelEMA | None = None
    train_net: torch.nn.Module | None = None
    writer: object | None = None
    val_order: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    elapsed_at_start: float = 0.0
    val_seconds: float = 0.0
    step_seconds: float = 0.0

    @property
    def ipe(self) -> int:
        return int(self.plan.training["iterations_per_epoch"])

    def elapsed(self) -> float:
        return self.elapsed_at_start + time.perf_counter() - self.started

    def progress(self) -> float:
        """Share of the run done: by time with a budget, by iterations otherwise."""
        if self.budget is not None:
            return self.elapsed() / self.budget
        return self.state.iteration / max(1, self.epochs * self.ipe)

    def out_of_time(self) -> bool:
        """With a budget: stop when the next step and a validation would overrun it."""
        if self.budget is None:
            return False
        return self.elapsed() + self.val_seconds + self.step_seconds + self.final_seconds() >= self.budget

    def final_seconds(self) -> float:
        """Time the full-set scoring at the end (:func:`_final_choice`) will take: two passes
        over every validation case when epochs score a subset, else nothing."""
        n_all, n = len(self.val_images), self.state.val_cases
        if not n or (n >= n_all and self.state.val_every == 1):
            return 0.0
        return 2 * n_all * self.val_seconds / n

    def finished(self) -> bool:
        if self.state.stopped_early:
            return True
        if self.budget is not None:
            return self.out_of_time()
        return self.state.epoch >= self.epochs

    def lr(self) -> float:
        return learning_rate(self.plan.training, self.progress())

    @property
    def eval_net(self) -> torch.nn.Module:
        """The network validation scores and ``checkpoint_best.pt`` serves: the EMA when on."""
        return self.ema.module if self.ema is not None else self.net

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A patch batch, augmented on the training device (one resampling for image and label)."""
        x, y = self.sampler.sample()
        xt = torch.from_numpy(x).to(self.device, non_blocking=True)
        yt = torch.from_numpy(y).to(self.device, non_blocking=True)
        xt, yt = augment_batch(xt, yt, self.plan.training.get("augment"), self.aug_gen)
        return xt.contiguous(memory_format=memory_format(self.plan.dim)), yt.long()


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor) -> float:
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr()
    with autocast(run.device, run.precision):
        loss = run.loss_fn((run.net if run.train_net is None else run.train_net)(x), y)
    backward_and_step(loss, run.net, run.optimizer, run.scaler, run.plan.training.get("grad_clip"))
    if run.ema is not None:
        run.ema.update(run.net)
    value = float(loss.detach())
    if not math.isfinite(value):  # the weights are ruined now: stop before anything is saved
        done = f"checkpoint_last.pt (epoch {run.state.epoch}) is the last good state" if run.state.epoch \
            else "no checkpoint was written"
        raise InputError(f"training loss is {value} at step {run.state.iteration + 1}; {done}",
                         run.model_dir, "lower the learning rate (--lr) or check the images for extreme "
                         "values, then train again")
    return value


def _fit(run: _Run, display: LiveDisplay) -> list[dict]:
    """The training loop: epochs of patch steps, each followed by whole-image validation."""
    history = []
    while not run.finished():
        run.net.train()
        t_epoch, t_data, losses = time.perf_counter(), 0.0, []
        for _ in range(run.ipe):
            if run.out_of_time():
                break
            t0 = time.perf_counter()
            x, y = run.batch()
            t1 = time.perf_counter()
            losses.append(_train_step(run, x, y))
            t2 = time.perf_counter()
            t_data += t1 - t0
            run.step_seconds = 0.9 * run.step_seconds + 0.1 * (t2 - t0) if run.step_seconds else t2 - t0
            run.state.iteration += 1
            display.update(_completed(run), loss=float(np.mean(losses)))
        if not losses:
            break
        run.state.epoch += 1
        dice, n_val = None, 0
        if run.state.epoch % max(1, run.state.val_every) == 0:
            t_val = time.perf_counter()
            dice, n_val = _validate_share(run)
            run.val_seconds = time.perf_counter() - t_val
            run.state.val_seconds_total += run.val_seconds
        row = _epoch_row(run, losses, dice, n_val, time.perf_counter() - t_epoch, t_data)
        run.log.write(row)
        plot_curves(run.log.path, run.model_dir / "curves.png")
        history.append(row)
        _tensorboard(run, row)
        improved = dice is not None and _track_best(run, row["val_dice"], display)
        run.state.elapsed = run.elapsed()
        _save(run, best=improved)
        shown = f"{row['val_dice']:.4f}" if dice is not None else "-"
        display.update(_completed(run), epoch=run.state.epoch, dice=shown)
        display.epoch_line(
            f"epoch {run.state.epoch:>3}  loss {row['train_loss']:.4f}  val Dice {shown}"
            f"{' *' if improved else ''}  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s"
        )
    if history:
        _final_choice(run, display)
    return history


def _track_best(run: _Run, score: float, display: LiveDisplay) -> bool:
    """Best score and early stopping, counted over validations; True when ``score`` improved.

    Validations without improvement count towards the patience only once the run is
    ``training.patience_after`` (0.5) of the way through: while the learning rate is high the
    scores swing from epoch to epoch (a plateau there is noise, and the gains of a decaying
    schedule come late), so an early best must not end a run that has half its budget left.
    """
    improved = score > run.state.best_dice + float(run.plan.training.get("min_delta", 0.0))
    if improved:
        run.state.best_dice = score
        run.state.stale_epochs = 0
    elif run.progress() >= float(run.plan.training.get("patience_after", PATIENCE_AFTER)):
        run.state.stale_epochs += 1
    patience = int(run.plan.training.get("patience", 0) or 0)
    if patience and run.state.stale_epochs >= patience:
        run.state.stopped_early = True
        display.epoch_line(f"early stop: no better validation Dice for {patience} validations")
    return improved


def _validate_share(run: _Run) -> tuple[list[float], int]:
    """Dice on the validation subset that keeps validation within its share of the time.

    Whole-image validation of every case each epoch can cost more than the training itself
    (hundreds of large 2D images). The first validation scores cases in a fixed seeded order
    until ``training.val_time_share`` of an epoch's training time is spent (at least
    ``training.val_min_cases``); that many cases, always the same ones so epochs compare, are
    scored from then on. When even the minimum costs more than the share, validation runs
    every ``val_every`` epochs instead. :func:`_final_choice` scores the full set at the end.
    """
    t = run.plan.training
    share = float(t.get("val_time_share", VAL_TIME_SHARE))
    n_all = len(run.val_images)
    n_min = min(n_all, int(t.get("val_min_cases", VAL_MIN_CASES)))
    train_seconds = max(run.step_seconds * run.ipe, 1e-6)
    counts = np.zeros((3, run.plan.num_classes))
    if run.state.val_cases:
        for i in run.val_order[: run.state.val_cases]:
            counts += _dice_counts(run, i)
        return _dice(counts), run.state.val_cases
    t0, n = _clock(), 0
    while n < n_all and (n < n_min or _clock() - t0 < share * train_seconds):
        counts += _dice_counts(run, run.val_order[n])
        n += 1
    spent = _clock() - t0
    run.state.val_cases = n
    run.state.val_every = max(1, math.ceil(spent / (share * train_seconds) - 1e-9)) if n <= n_min else 1
    return _dice(counts), n


def _dice_counts(run: _Run, i: int) -> np.ndarray:
    return case_counts(run.eval_net, run.val_images[i], run.val_labels[i], run.plan, run.device,
                       run.precision)


def _final_choice(run: _Run, display: LiveDisplay) -> None:
    """Score the full validation set for the best-by-subset checkpoint and the last weights,
    and keep the better as ``checkpoint_best.pt`` (``selection.json`` says which and why).
    Nothing to do when every epoch already scored every case."""
    n_all = len(run.val_images)
    if run.state.val_cases >= n_all and run.state.val_every == 1:
        return
    best_path = run.model_dir / "checkpoint_best.pt"
    last = validate(run.eval_net, run.val_images, run.val_labels, run.plan, run.device, run.precision)
    choice = {"cases": n_all, "subset_cases": run.state.val_cases, "val_every": run.state.val_every,
              "last_dice": float(np.mean(last)), "last_epoch": run.state.epoch}
    if best_path.is_file():
        ckpt = torch.load(best_path, map_location=run.device, weights_only=True)
        choice["best_epoch"] = int(ckpt["state"]["epoch"])
        if choice["best_epoch"] == run.state.epoch:  # the last weights are the best ones
            choice["best_dice"] = choice["last_dice"]
        else:
            net = copy.deepcopy(run.eval_net)
            net.load_state_dict(ckpt["ema_model"] if ckpt.get("ema_model") else ckpt["model"])
            best = validate(net, run.val_images, run.val_labels, run.plan, run.device, run.precision)
            choice["best_dice"] = float(np.mean(best))
        keep_last = choice["last_dice"] > choice["best_dice"]
    else:
        keep_last = True
    choice["chosen"] = "last" if keep_last else "best"
    # the run reports the full-set score of what checkpoint_best.pt now holds
    run.state.best_dice = choice["last_dice"] if keep_last else choice["best_dice"]
    if keep_last:
        _save(run, best=True)
    write_json(run.model_dir / "selection.json", choice)
    best_text = (f", best-by-subset {choice['best_dice']:.4f} (epoch {choice['best_epoch']})"
                 if "best_dice" in choice else "")
    display.epoch_line(f"full validation ({n_all} cases): last {choice['last_dice']:.4f}{best_text}: "
                       f"keeping {choice['chosen']}")


def _tensorboard(run: _Run, row: dict) -> None:
    """Every numeric column of the epoch row as a scalar, stepped by epoch."""
    if run.writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)):
            group = "val" if key.startswith("val_") else "train"
            run.writer.add_scalar(f"{group}/{key}", value, row["epoch"])
    run.writer.flush()


def _completed(run: _Run) -> float:
    return run.elapsed() if run.budget is not None else run.state.iteration


def _epoch_row(run: _Run, losses: list[float], dice: list[float] | None, n_val: int, seconds: float,
               data_s: float) -> dict:
    """The ``log.csv`` row; an epoch without validation has empty Dice cells."""
    nan = float("nan")
    row = {
        "epoch": run.state.epoch,
        "iterations": run.state.iteration,
        "train_loss": round(float(np.mean(losses)), 6),
        "val_dice": round(float(np.mean(dice)), 6) if dice is not None else nan,
    }
    for i, name in enumerate(run.plan.label_names[1:]):
        row[f"val_dice_{name}"] = round(float(dice[i]), 6) if dice is not None else nan
    row.update({
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_seconds": round(seconds, 3),
        "val_seconds": round(run.val_seconds, 3) if dice is not None else 0.0,
        "val_cases": n_val,
        "val_share": round(run.state.val_seconds_total / max(run.elapsed(), 1e-9), 4),
        "data_wait_share": round(data_s / max(seconds, 1e-9), 4),
        "elapsed_seconds": round(run.elapsed(), 2),
    })
    return row


@torch.inference_mode()
def case_counts(net: torch.nn.Module, image: np.ndarray, label: np.ndarray, plan: Plan,
                device: torch.device, precision: str) -> np.ndarray:
    """``(3, K)`` true positives, false positives and false negatives per class of one whole
    case (sliding window); summed over cases they give the pooled Dice."""
    net.eval()
    k = plan.num_classes
    probs = sliding_window_inference(
        net, torch.from_numpy(np.array(image, dtype=np.float32)), plan.patch_size, k,
        overlap=plan.inference.get("overlap", 0.5), batch_size=plan.batch_size, precision=precision,
        device=device)
    pred = probs.argmax(0).numpy()
    counts = np.zeros((3, k))
    for c in range(1, k):
        p, g = pred == c, label == c
        counts[:, c] = (np.logical_and(p, g).sum(), np.logical_and(p, ~g).sum(), np.logical_and(~p, g).sum())
    return counts


def _dice(counts: np.ndarray) -> list[float]:
    tp, fp, fn = counts
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)[1:].tolist()


def validate(net: torch.nn.Module, images: list[np.ndarray], labels: list[np.ndarray], plan: Plan,
             device: torch.device, precision: str) -> list[float]:
    """Dice per foreground class on whole images (sliding window), pooled over the cases."""
    counts = np.zeros((3, plan.num_classes))
    for img, lab in zip(images, labels, strict=True):
        counts += case_counts(net, img, lab, plan, device, precision)
    return _dice(counts)


def _save(run: _Run, best: bool) -> None:
    save_run(run.model_dir, best, net=run.net, optimizer=run.optimizer, scaler=run.scaler,
             state=vars(run.state), sampler_rng=run.sampler.rng, aug_gen=run.aug_gen, ema=run.ema)


def _split(model_dir: Path, cases: list[Case], val_fraction: float, seed: int) -> dict:
    """A fixed train/validation split, written once to ``splits.json`` and reused on resume."""
    path = model_dir / "splits.json"
    if path.is_file():
        split = json.loads(path.read_text())
        _check_known(split["train"] + split["val"], cases, path)
        return split
    ids = sorted(c.case_id for c in cases)
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    split = {"seed": seed, "val": sorted(ids[:n_val]), "train": sorted(ids[n_val:]), "data": data_root(cases)}
    if not split["val"]:  # a single case: validate on it (the user sees it in splits.json)
        split["val"] = list(split["train"])
    write_json(path, split)
    return split


def data_root(cases: list[Case]) -> str | None:
    """The dataset folder, recorded in ``splits.json`` so ``distill`` can find the data again."""
    if not cases:
        return None
    label = cases[0].label_path or cases[0].image_paths[0]
    return str(label.resolve().parent.parent)


def _check_known(ids: list[str], cases: list[Case], path: Path) -> None:
    known = {c.case_id for c in cases}
    missing = [c for c in ids if c not in known]
    if missing:
        raise InputError(f"splits.json names cases that are not in the dataset: {missing[:3]}", path,
                         "restore the missing cases or delete splits.json to draw new folds")


def cv_folds(model_dir: Path, cases: list[Case], n_folds: int, seed: int) -> dict:
    """``n_folds`` cross-validation folds, drawn once (seeded) and kept in ``splits.json`` of the
    parent model directory; every ``fold_k/`` then trains on the same partition."""
    path = model_dir / "splits.json"
    if path.is_file():
        folds = json.loads(path.read_text())
        if "folds" not in folds:
            raise InputError("splits.json holds a single split, not folds", path,
                             "train folds into a new model directory")
        _check_known([i for f in folds["folds"] for i in f["val"]], cases, path)
        return folds
    if n_folds < 2 or n_folds > len(cases):
        raise InputError(f"cannot make {n_folds} folds from {len(cases)} cases",
                         fix="use --folds between 2 and the number of training cases")
    ids = sorted(c.case_id for c in cases)
    np.random.default_rng(seed).shuffle(ids)
    parts = [sorted(ids[k::n_folds]) for k in range(n_folds)]
    folds = {"seed": seed, "n_folds": n_folds, "folds": [
        {"train": sorted(i for j, p in enumerate(parts) if j != k for i in p), "val": parts[k]}
        for k in range(n_folds)]}
    model_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, folds)
    return folds


def _fold_split(parent: Path, run_dir: Path, cases: list[Case], fold: int | str, n_folds: int,
                seed: int) -> dict:
    """The split of one fold (``all``: train and validate on every case, as nnU-Net does),
    also written as the fold directory's own ``splits.json`` so it is self-describing."""
    path = run_dir / "splits.json"
    if path.is_file():
        return _split(run_dir, cases, 0.0, seed)
    if fold == "all":
        ids = sorted(c.case_id for c in cases)
        split = {"seed": seed, "fold": "all", "train": ids, "val": ids, "data": data_root(cases)}
    else:
        folds = cv_folds(parent, cases, n_folds, seed)
        if not 0 <= int(fold) < len(folds["folds"]):
            raise InputError(f"fold {fold} does not exist ({len(folds['folds'])} folds)",
                             parent / "splits.json", f"use --fold 0..{len(folds['folds']) - 1} or all")
        split = {"seed": folds["seed"], "fold": int(fold), **folds["folds"][int(fold)],
                 "data": data_root(cases)}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, split)
    return split


def _load(dataset: Dataset, plan: Plan, cache_dir: Path, split: dict, progress: bool,
          ) -> tuple[tuple[list[np.ndarray], list[np.ndarray]], tuple[list[np.ndarray], list[np.ndarray]]]:
    """Preprocess (crop, resample, normalise) into the ``.npy`` cache, reusing cases whose source
    and plan did not change, and open them memory-mapped: training never holds every case."""
    ids = list(dict.fromkeys(split["train"] + split["val"]))
    cached = preprocess_dataset(dataset, plan, cache_dir, case_ids=ids, workers=min(2, os.cpu_count() or 1),
                                progress=progress)

    def arrays(which: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        pairs = [cached[i].load() for i in which]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    return arrays(split["train"]), arrays(split["val"])


def prepare_plan(data: str | Path, preset: str = "default", overrides: dict | None = None,
                 **plan_options) -> tuple[Dataset, Plan]:
    """Find and validate the dataset, fingerprint it and derive the (overridden) plan.

    ``plan_options`` go to :func:`medunet.planning.make_plan` (e.g. ``config``, ``ct_window``).
    """
    dataset = find_dataset(data)
    facts = validate_dataset(dataset)
    overrides = dict(overrides or {})
    # the working resolution drives the patch, batch and network: plan from it, not after it
    derived = {"spacing": "spacing", "resolution.factor": "resolution_factor"}
    for key, option in derived.items():
        if key in overrides:
            plan_options[option] = overrides.pop(key)
    plan = make_plan(dataset, fingerprint_dataset(dataset, facts), preset=preset, **plan_options)
    if overrides:
        plan = plan.override(overrides)
    return dataset, plan


def _parse_fold(fold: int | str | None) -> int | str | None:
    if fold is None or isinstance(fold, int):
        return fold
    if str(fold).strip().lower() == "all":
        return "all"
    if str(fold).strip().isdigit():
        return int(fold)
    raise InputError(f"cannot read the fold '{fold}'", fix="use a number (0, 1, ...) or all")


def _one_run_per_dir(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Hold ``RUN_DIR/.train.lock`` while ``train`` runs: a second run into the same directory
    (``-o`` and fold) would interleave checkpoints and logs, so it is refused. A crashed run's
    lock is free (flock ends with its process)."""

    @functools.wraps(fn)
    def locked(data: str | Path, model_dir: str | Path, **kwargs) -> TrainResult:
        fold = _parse_fold(kwargs.get("fold"))
        run_dir = Path(model_dir) if fold is None else Path(model_dir) / f"fold_{fold}"
        with exclusive_lock(run_dir / ".train.lock", "another training run is writing to this directory",
                            "wait for it to finish, or choose another -o"):
            return fn(data, model_dir, **kwargs)

    return locked


@_one_run_per_dir
def train(data: str | Path, model_dir: str | Path, *, epochs: int | None = None,
          time_budget: str | float | None = None, resume: bool = False, device: str | None = None,
          precision: str | None = None, seed: int = 0, preset: str = "default",
          overrides: dict | None = None, progress: bool = True, report: bool = True,
          fold: int | str | None = None, n_folds: int = 5, tensorboard: bool = False,
          compile: bool = False, plan_options: dict | None = None) -> TrainResult:
    """Train a U-Net on a dataset folder and write a self-describing model directory.

    Args:
        data: dataset folder (nnU-Net v2 raw layout or images/ + masks/).
        model_dir: output folder: plan.json, splits.json, checkpoints, log.csv.
        epochs: number of epochs (of ``plan.training.iterations_per_epoch`` steps).
        time_budget: wall-clock budget (``"30m"``); the LR schedule is stretched to fit it.
        resume: continue from ``checkpoint_last.pt``; with a larger ``epochs`` it extends a
            finished run.
        device, precision: ``auto`` by default (bf16 + channels_last on capable CPUs).
        seed: seeds the split, the sampler and the augmentation.
        preset: network preset (``default``, ``classic``, ``large``).
        overrides: plan fields to set, e.g. ``{"patch_size": [128, 128]}``.
        report: at the end, predict the validation cases with the best checkpoint into
            ``validation/`` and write ``validation/report.html`` and ``validation/scores.json``.
        fold: train one cross-validation fold (``0..n_folds-1``) or ``"all"`` into
            ``model_dir/fold_<k>/``; the folds are kept in ``model_dir/splits.json`` and the
            shared plan in ``model_dir/plan.json``. ``None``: one 80/20 split in ``model_dir``.
        tensorboard: also write TensorBoard event files into ``tensorboard/``.
        compile: ``torch.compile`` the training network (faster steps after 20-60 s of
            compilation; validation and checkpoints use the plain network).
        plan_options: passed to ``make_plan`` (``config``, ``ct_window``, ``window``).
    """
    parent = Path(model_dir)
    fold = _parse_fold(fold)
    run_dir = parent if fold is None else parent / f"fold_{fold}"
    last = run_dir / "checkpoint_last.pt"
    if not resume and last.is_file():
        raise InputError("the model directory already holds a run", run_dir,
                         "add --resume to continue or extend it, or choose another -o")
    budget = parse_duration(time_budget) if time_budget is not None else None
    dev = resolve_device(device)
    flush_denormals(dev)
    prec = resolve_precision(precision, dev)
    opts = dict(plan_options or {})
    if dev.type == "cuda":  # plan the patch and batch for this GPU's memory
        opts.setdefault("device_memory_gb", torch.cuda.get_device_properties(dev).total_memory / 2**30)
    if fold is None and is_cascade(run_dir):  # a cascade resumes as one
        plan = Plan.load(run_dir)
        return train_cascade(data, run_dir, plan, epochs=epochs, budget=budget, resume=resume, seed=seed,
                             preset=preset, overrides=overrides, plan_options=opts, device=device,
                             precision=precision, progress=progress, report=report, tensorboard=tensorboard,
                             compile=compile)
    if resume and not last.is_file():
        raise InputError("nothing to resume: no checkpoint_last.pt", run_dir, "run without --resume")
    dataset, plan = _run_plan(data, parent, run_dir, resume, fold is not None, preset, overrides, opts)
    if fold is None and not resume and wants_cascade(plan, opts.get("config", "auto"), budget):
        return train_cascade(data, run_dir, plan, epochs=epochs, budget=budget, resume=False, seed=seed,
                             preset=preset, overrides=overrides, plan_options=opts, device=device,
                             precision=precision, progress=progress, report=report, tensorboard=tensorboard,
                             compile=compile)
    validate_augmentation(plan.training.get("augment"))  # a bad --set fails before data loads
    if plan.training.get("ema"):
        validate_ema(plan.training["ema"], plan.training.get("ema_every", 1))
    if epochs is None and budget is None:
        epochs = int(plan.training["epochs"])
    run_dir.mkdir(parents=True, exist_ok=True)
    plan.save(run_dir / "plan.json")

    if fold is None:
        split = _split(run_dir, dataset.train, plan.training.get("val_fraction", 0.2), seed)
    else:
        split = _fold_split(parent, run_dir, dataset.train, fold, n_folds, seed)
    (tr_img, tr_lab), (val_img, val_lab) = _load(dataset, plan, parent / "preprocessed", split, progress)

    torch.manual_seed(seed)
    net = plan.build_network().to(dev).to(memory_format=memory_format(plan.dim))
    t = plan.training
    optimizer = build_optimizer(net, t)
    ema = ModelEMA(net, t["ema"], t.get("ema_every", 1)) if t.get("ema") else None
    aug_gen = torch.Generator().manual_seed(seed)
    sampler = PatchSampler(tr_img, tr_lab, plan.patch_size, plan.batch_size, t["fg_oversample"],
                           np.random.default_rng(seed))
    scaler = torch.amp.GradScaler(dev.type, enabled=prec == "fp16")
    state = RunState()
    if resume:
        ckpt = torch.load(last, map_location=dev, weights_only=True)
        net.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"], str(last))
        scaler.load_state_dict(ckpt["scaler"])
        state = RunState(**ckpt["state"])
        state.stopped_early = False  # a resumed (extended) run may go on; patience still counts
        if ema is not None and ckpt.get("ema_model") is not None:
            ema.load_state_dict({**ckpt["ema"], "model": ckpt["ema_model"]})
        sampler.rng.bit_generator.state = ckpt["sampler_rng"]
        aug_gen.set_state(ckpt["aug_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
    run = _Run(plan=plan, model_dir=run_dir, net=net, optimizer=optimizer, scaler=scaler,
               loss_fn=_loss(plan, net), sampler=sampler, aug_gen=aug_gen, val_images=val_img,
               val_labels=val_lab, device=dev, precision=prec, epochs=epochs, budget=budget,
               state=state, log=CsvLog(run_dir / "log.csv"), elapsed_at_start=state.elapsed, ema=ema,
               train_net=torch.compile(net) if compile else None,
               writer=_summary_writer(run_dir, state.epoch) if tensorboard else None,
               val_order=np.random.default_rng(seed).permutation(len(val_img)).tolist())
    run.log.truncate_after(state.epoch)
    total = budget if budget is not None else epochs * run.ipe
    try:
        with LiveDisplay(total, "train", enabled=progress) as display:
            display.epoch_line(
                f"training {plan.dim}D U-Net on {len(tr_img)} cases (val {len(val_img)}), patch "
                f"{plan.patch_size} x batch {plan.batch_size}, {dev.type} {prec}"
                + (f", fold {fold}" if fold is not None else "")
                + (f", budget {budget:.0f}s" if budget else f", {epochs} epochs"))
            history = _fit(run, display)
    finally:
        if run.writer is not None:
            run.writer.close()
    if not last.is_file():
        raise InputError("the time budget ended before one epoch finished", run_dir,
                         "give a larger --time-budget")
    if report:
        validation_report(run_dir, dataset, split["val"], device=device, precision=precision)
    return TrainResult(run_dir, state.best_dice if math.isfinite(state.best_dice) else float("nan"),
                       state.epoch, state.iteration, run.elapsed(), history)


def _loss(plan: Plan, net: torch.nn.Module) -> torch.nn.Module:
    """The plan's loss; with deep supervision it weighs every decoder head's output."""
    t = plan.training
    heads = len(net.heads) if getattr(net, "deep_supervision", False) else 0
    return build_loss(t["loss"], plan.num_classes, t.get("loss_options"), deep_supervision=heads)


def _run_plan(data: str | Path, parent: Path, run_dir: Path, resume: bool, folds: bool, preset: str,
              overrides: dict | None, plan_options: dict) -> tuple[Dataset, Plan]:
    """The run's plan: reloaded on resume; for folds, the parent's shared plan (made once)."""
    if resume or (folds and (parent / "plan.json").is_file()):
        dataset = find_dataset(data)
        validate_dataset(dataset)
        plan = Plan.load(run_dir if resume else parent)
        return dataset, plan.override(overrides) if overrides else plan
    dataset, plan = prepare_plan(data, preset, overrides, **plan_options)
    if folds:
        plan.save(parent / "plan.json")
    return dataset, plan


def _summary_writer(run_dir: Path, epoch: int):
    """TensorBoard writer; events past ``epoch`` (a killed run's) are purged on resume."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise InputError("TensorBoard logging needs the tensorboard package",
                         fix="pip install tensorboard (or drop --tensorboard)") from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=epoch + 1)


def train_folds(data: str | Path, model_dir: str | Path, n_folds: int = 5, *, resume: bool = False,
                report: bool = True, **kwargs) -> list[TrainResult]:
    """Train every fold into ``model_dir/fold_<k>/`` (one after the other), then choose the
    post-processing on the pooled out-of-fold predictions (cross-validation, like nnU-Net) and
    store it in ``model_dir/plan.json``, which the fold ensemble uses at inference."""
    parent = Path(model_dir)
    results = []
    for k in range(n_folds):
        done = (parent / f"fold_{k}" / "checkpoint_last.pt").is_file()
        if done and not resume:
            raise InputError("the model directory already holds folds", parent,
                             "add --resume to continue, or choose another -o")
        results.append(train(data, parent, fold=k, n_folds=n_folds, resume=done, report=report,
                             **kwargs))
    if report:
        choose_cv_postprocessing(parent, find_dataset(data))
    return results


def choose_cv_postprocessing(parent: Path, dataset: Dataset) -> dict:
    """Post-processing chosen on every fold's validation predictions together (before each
    fold's own choice was applied: those are kept in ``validation/raw/``)."""
    from medunet.inference import choose_postprocessing
    from medunet.io import read_label

    by_id = {c.case_id: c for c in dataset.train}
    preds, refs = [], []
    for fold_dir in sorted(parent.glob("fold_*")):
        split = fold_dir / "splits.json"
        val = fold_dir / "validation"
        if not split.is_file() or not val.is_dir():
            continue
        for cid in json.loads(split.read_text())["val"]:
            found = [p for d in (val / "raw", val) for p in d.glob(f"{cid}.*")
                     if p.name[len(cid):] not in (".json", ".npz")]
            if found and cid in by_id:
                preds.append(read_label(found[0])[0])
                refs.append(read_label(by_id[cid].label_path)[0])
    plan = Plan.load(parent)
    choice = choose_postprocessing(preds, refs, plan.label_values) if preds else {"classes": {}}
    plan.inference["postprocessing"] = choice
    plan.save(parent / "plan.json")
    return choice


def validation_report(model_dir: Path, dataset: Dataset, case_ids: list[str],
                      device: str | None = None, precision: str | None = None) -> Path:
    """Predict the validation cases with the best checkpoint and score them with a report.

    Post-processing is chosen here, on these predictions against their labels (a step is kept
    for a class only where it raised the validation Dice), stored in ``plan.json`` under
    ``inference.postprocessing`` for ``predict`` to apply, and applied before scoring.
    """
    from medunet.evaluation import evaluate
    from medunet.inference import Predictor, apply_postprocessing, choose_postprocessing
    from medunet.inference.predictor import InputCase
    from medunet.io import read_image, read_label, write_image

    out = model_dir / "validation"
    out.mkdir(exist_ok=True)
    predictor = Predictor.load(model_dir, device=device, precision=precision, postprocess="none")
    by_id = {c.case_id: c for c in dataset.train}
    written = [predictor.predict_case(InputCase(cid, by_id[cid].image_paths), out) for cid in case_ids]
    preds = [read_label(p)[0] for p in written]
    refs = [read_label(by_id[cid].label_path)[0] for cid in case_ids]
    choice = choose_postprocessing(preds, refs, predictor.plan.label_values)
    plan = Plan.load(model_dir)
    plan.inference["postprocessing"] = choice
    plan.save(model_dir / "plan.json")
    if choice["classes"]:
        background = int(plan.label_values[0])
        (out / "raw").mkdir(exist_ok=True)
        for path, pred in zip(written, preds, strict=True):
            _, geom = read_image(path)
            write_image(out / "raw" / path.name, pred, geom)  # kept for a cross-validation choice
            write_image(path, apply_postprocessing(pred, choice, background), geom)
    first = by_id[case_ids[0]]
    evaluate(out, first.label_path.parent, labels=[v for v in dataset.label_values if v != 0],
             json_path=out / "scores.json", report=out / "report.html", model_dir=model_dir,
             images=first.image_paths[0].parent, workers=1, progress=False)
    return out / "report.html"
