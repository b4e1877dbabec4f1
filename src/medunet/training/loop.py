"""The one training loop every way of training runs on.

A run is a :class:`Loop` driving a :class:`Mode`. The loop owns what all runs have in common:
the time budget and epoch/iteration accounting, the learning-rate progress, validation within
its share of the time and the full-set final choice, the ``log.csv`` row, early stopping,
``checkpoint_best.pt`` / ``checkpoint_last.pt`` with the full resume state, the live display,
``curves.png`` and TensorBoard. A mode supplies only its own parts: how a batch is drawn, one
optimisation step (batch -> named losses), the network validation scores, and what its
checkpoint holds. Supervised training (:mod:`medunet.training.trainer`) and distillation
(:mod:`medunet.training.distill`) are modes; a new way of training is a new mode, never a
second loop.
"""

from __future__ import annotations

import copy
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medunet.augment import augment_batch
from medunet.errors import InputError
from medunet.evaluation.metrics import case_dice, class_counts, paired_p, pooled_dice
from medunet.inference.network import sliding_window_inference
from medunet.planning import Plan
from medunet.runtime import autocast, memory_format
from medunet.training.callbacks import CsvLog, LiveDisplay, plot_curves, save_checkpoint, write_json
from medunet.training.distributed import SINGLE, Dist
from medunet.training.optim import ModelEMA, backward_and_step, load_optimizer_state, optimizer_state
from medunet.training.sampler import PatchSampler
from medunet.training.schedule import learning_rate

VAL_TIME_SHARE = 0.15  # plan default of training.val_time_share: validation's share of the time
VAL_MIN_CASES = 5  # plan default of training.val_min_cases: never score fewer cases than this
PATIENCE_AFTER = 0.5  # plan default of training.patience_after: share of the run before patience counts
# the best-by-validation weights replace the last ones at the end only when a one-sided paired
# t-test over the validation cases says they are better at this level (Loop.final_choice)
KEEP_BEST_P = 0.05
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


# --------------------------------------------------------------------------------------------
# validation


@torch.inference_mode()
def case_counts(net: nn.Module, image: np.ndarray, label: np.ndarray, plan: Plan, device: torch.device,
                precision: str) -> np.ndarray:
    """``(3, K)`` true positives, false positives and false negatives per class of one whole
    case (sliding window); summed over cases they give the pooled Dice."""
    net.eval()
    probs = sliding_window_inference(
        net, torch.from_numpy(np.array(image, dtype=np.float32)), plan.patch_size, plan.num_classes,
        overlap=plan.inference.get("overlap", 0.5), batch_size=plan.batch_size, precision=precision,
        device=device)
    return class_counts(probs.argmax(0).numpy(), label, plan.num_classes)


def validate(net: nn.Module, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], plan: Plan,
             device: torch.device, precision: str) -> list[float]:
    """Dice per foreground class on whole images (sliding window), pooled over the cases."""
    counts = np.zeros((3, plan.num_classes))
    for img, lab in zip(images, labels, strict=True):
        counts += case_counts(net, img, lab, plan, device, precision)
    return pooled_dice(counts)


@dataclass
class ValidationSet:
    """The whole validation cases a run scores (preprocessed arrays, as training sees them).

    ``counts`` is the one place a case is scored; a test replaces it to inject scores.
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.images)

    def counts(self, net: nn.Module, i: int, plan: Plan, device: torch.device, precision: str) -> np.ndarray:
        return case_counts(net, self.images[i], self.labels[i], plan, device, precision)

    def dice(self, net: nn.Module, plan: Plan, device: torch.device, precision: str,
             cases: Sequence[int] | None = None) -> list[float]:
        """Pooled Dice per foreground class over ``cases`` (default: all)."""
        counts = np.zeros((3, plan.num_classes))
        for i in range(len(self)) if cases is None else cases:
            counts += self.counts(net, i, plan, device, precision)
        return pooled_dice(counts)


# --------------------------------------------------------------------------------------------
# modes


class Mode(ABC):
    """What one way of training supplies to the :class:`Loop`.

    ``net`` is the network a model directory serves (checkpoint key ``model``); ``eval_net``
    what validation scores and ``checkpoint_best.pt`` is chosen by (an EMA, when kept).
    """

    name = "train"
    net: nn.Module

    @property
    def eval_net(self) -> nn.Module:
        return self.net

    def train(self) -> None:
        """Put the trained networks in training mode before an epoch's steps."""
        self.net.train()

    def lr_at(self, training: dict, progress: float) -> float:
        """The learning rate at the run's ``progress``: the plan's schedule over the whole run,
        unless the mode runs its own cycles (semi-supervised ``restart``)."""
        return learning_rate(training, progress)

    @abstractmethod
    def draw(self) -> Any:
        """One batch, on the training device."""

    @abstractmethod
    def step(self, batch: Any, lr: float) -> dict[str, float]:
        """One optimisation step at learning rate ``lr``: the named losses, ``"loss"`` the total."""

    @abstractmethod
    def checkpoint(self) -> dict:
        """Everything of the mode a resumed run needs (``model``, ``ema_model``, optimiser,
        random generators, extra networks); the loop adds its counters."""

    @abstractmethod
    def restore(self, ckpt: dict, source: str) -> None:
        """Load :meth:`checkpoint`'s dict back."""

    @abstractmethod
    def reseed(self, seed: int) -> None:
        """New random streams for batches and augmentation: a rank other than 0 resuming (the
        checkpoint holds rank 0's streams only), whatever the number of ranks that wrote it."""


class SupervisedMode(Mode):
    """Patches with labels, augmented on the training device, one loss on the network's
    output (every deep-supervision head); an optional EMA of the weights is what validation
    scores. Distillation and later modes extend it, replacing :meth:`losses`."""

    def __init__(self, plan: Plan, net: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, loss_fn: nn.Module, sampler: PatchSampler,
                 aug_gen: torch.Generator, device: torch.device, precision: str,
                 ema: ModelEMA | None = None, train_net: nn.Module | None = None) -> None:
        self.plan, self.net, self.optimizer, self.scaler = plan, net, optimizer, scaler
        self.loss_fn, self.sampler, self.aug_gen = loss_fn, sampler, aug_gen
        self.device, self.precision, self.ema = device, precision, ema
        self.train_net = train_net if train_net is not None else net  # a compiled net steps faster

    @property
    def eval_net(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A patch batch, augmented on the training device (one resampling for image and label)."""
        x, y = self.sampler.sample()
        xt = torch.from_numpy(x).to(self.device, non_blocking=True)
        yt = torch.from_numpy(y).to(self.device, non_blocking=True)
        xt, yt = augment_batch(xt, yt, self.plan.training.get("augment"), self.aug_gen)
        return xt.contiguous(memory_format=memory_format(self.plan.dim)), yt.long()

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise and any parts worth logging (the autocast region is the caller's)."""
        return self.loss_fn(self.train_net(x), y), {}

    def step(self, batch: tuple[torch.Tensor, ...], lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.precision):  # a mode's batch is the arguments of its losses()
            loss, parts = self.losses(*batch)
        backward_and_step(loss, self.net, self.optimizer, self.scaler, self.plan.training.get("grad_clip"))
        if self.ema is not None:
            self.ema.update(self.net)
        return {"loss": float(loss.detach()), **parts}

    def checkpoint(self) -> dict:
        ema_state = self.ema.state_dict() if self.ema is not None else None
        return {
            "model": self.net.state_dict(),
            "ema_model": ema_state["model"] if ema_state else None,
            "ema": {k: v for k, v in ema_state.items() if k != "model"} if ema_state else None,
            "optimizer": optimizer_state(self.optimizer),
            "scaler": self.scaler.state_dict(),
            "sampler_rng": self.sampler.rng.bit_generator.state,
            "aug_rng": self.aug_gen.get_state(),
        }

    def restore(self, ckpt: dict, source: str) -> None:
        self.net.load_state_dict(ckpt["model"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"], source)
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema_model") is not None:
            self.ema.load_state_dict({**ckpt["ema"], "model": ckpt["ema_model"]})
        self.sampler.rng.bit_generator.state = ckpt["sampler_rng"]
        self.aug_gen.set_state(ckpt["aug_rng"])

    def reseed(self, seed: int) -> None:
        self.sampler.rng = np.random.default_rng(seed)
        self.aug_gen.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# the loop


def validate_patience(training: dict) -> None:
    """Refuse a ``training.patience_smoothing`` early stopping cannot use, naming the field
    (called before a run writes anything)."""
    w = training.get("patience_smoothing", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < w <= 1.0:
        raise InputError(f"training.patience_smoothing = {w!r} is out of range", "plan.json",
                         "use a number in (0, 1]: the newest validation's weight, 1 for the raw scores")


@dataclass
class RunState:
    """Counters saved in every checkpoint so a run resumes where it stopped."""

    epoch: int = 0
    iteration: int = 0
    elapsed: float = 0.0
    best_dice: float = -1.0
    smoothed_dice: float | None = None  # what early stopping watches (see Loop.track_best)
    best_smoothed: float = -1.0
    stale_epochs: int = 0
    stopped_early: bool = False
    val_cases: int = 0  # validation subset size (0: not chosen yet), fixed after the first one
    val_every: int = 1  # validate every this many epochs (> 1 only when few cases are slow)
    val_seconds_total: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> RunState:
        """Known fields only: a checkpoint of another mode or version may carry more."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Loop:
    """Epochs of ``iterations_per_epoch`` steps of ``mode``, each followed by validation,
    until ``epochs`` or the time ``budget`` (seconds) is spent.

    ``clock`` is the loop's time source (a test replaces it to make budgets exact). Under
    torch.distributed (``dist``), every rank runs the loop in step: the budget is decided on rank
    0's clock, validation cases are split over the ranks and their counts summed, and only rank
    0 writes the log, curves, TensorBoard events, checkpoints and ``selection.json``.
    """

    mode: Mode
    plan: Plan
    run_dir: Path
    val: ValidationSet
    device: torch.device
    precision: str
    epochs: int | None = None
    budget: float | None = None
    seed: int = 0
    tensorboard: bool = False
    dist: Dist = SINGLE
    clock: Callable[[], float] = time.perf_counter
    state: RunState = field(default_factory=RunState)
    history: list[dict] = field(default_factory=list)
    selection: dict | None = None  # final_choice's result (selection.json), once the run ended
    val_seconds: float = 0.0
    step_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs is None and self.budget is None:
            self.epochs = int(self.plan.training["epochs"])
        self.log = CsvLog(self.run_dir / "log.csv")
        self.val_order = np.random.default_rng(self.seed).permutation(len(self.val)).tolist()
        self._elapsed_at_start = self.state.elapsed
        self._started = self.clock()
        self._writer = None
        self._lr = 0.0  # the last step's learning rate (logged)
        self._progress = self._elapsed_at_start / self.budget if self.budget else 0.0

    # ---- accounting

    @property
    def ipe(self) -> int:
        return int(self.plan.training["iterations_per_epoch"])

    def elapsed(self) -> float:
        return self._elapsed_at_start + self.clock() - self._started

    def progress(self) -> float:
        """Share of the run done: by time with a budget (as of the last :meth:`out_of_time`, so
        every rank uses rank 0's), by iterations otherwise."""
        if self.budget is not None:
            return self._progress
        return self.state.iteration / max(1, self.epochs * self.ipe)

    def out_of_time(self) -> bool:
        """With a budget: stop when the next step and a validation would overrun it. Read from
        rank 0's clock, which also fixes the progress (the learning rate) for the next step."""
        if self.budget is None:
            return False
        elapsed = self.elapsed()
        spent = elapsed + self.val_seconds + self.step_seconds + self.final_seconds() >= self.budget
        stop, self._progress = self.dist.share([float(spent), elapsed / self.budget])
        return bool(stop)

    def final_seconds(self) -> float:
        """Time the full-set scoring at the end (:meth:`final_choice`) will take: two passes
        over every validation case (the last and the best weights)."""
        n_all, n = len(self.val), self.state.val_cases
        if not n:
            return 0.0
        return 2 * n_all * self.val_seconds / n

    def finished(self) -> bool:
        if self.state.stopped_early:
            return True
        if self.budget is not None:
            return self.out_of_time()
        return self.state.epoch >= self.epochs

    def _completed(self) -> float:
        return self.elapsed() if self.budget is not None else self.state.iteration

    # ---- resume and checkpoints

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint: the mode's state, the counters and the random state.
        A finished run may be extended (``stopped_early`` is cleared; patience still counts)."""
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self.mode.restore(ckpt, str(path))
        self.state = RunState.from_dict(ckpt["state"])
        self.state.stopped_early = False
        torch.set_rng_state(ckpt["torch_rng"])
        if self.dist.rank:
            self.mode.reseed(self.seed + 7919 * self.dist.rank + self.state.iteration)
        self._elapsed_at_start = self.state.elapsed
        self._started = self.clock()

    def save(self, best: bool) -> None:
        """``checkpoint_last.pt`` (and ``checkpoint_best.pt``, written first: a kill between
        the two never leaves a best score whose weights were not saved)."""
        self.state.elapsed = self.elapsed()
        if not self.dist.main:
            return
        ckpt = {**self.mode.checkpoint(), "state": vars(self.state).copy(),
                "torch_rng": torch.get_rng_state()}
        if best:
            save_checkpoint(ckpt, self.run_dir / "checkpoint_best.pt")
        save_checkpoint(ckpt, self.run_dir / "checkpoint_last.pt")

    # ---- the run

    def run(self, header: str, progress: bool = True) -> list[dict]:
        """Train until done; returns the ``log.csv`` rows of this session."""
        if self.dist.main:
            self.log.truncate_after(self.state.epoch)
            if self.tensorboard:
                self._writer = _summary_writer(self.run_dir, self.state.epoch)
        total = self.budget if self.budget is not None else self.epochs * self.ipe
        try:
            with LiveDisplay(total, self.mode.name, enabled=progress and self.dist.main) as display:
                display.epoch_line(header)
                while not self.finished():
                    if not self._epoch(display):
                        break
                if self.history:
                    self.final_choice(display)
        finally:
            if self._writer is not None:
                self._writer.close()
        return self.history

    def _epoch(self, display: LiveDisplay) -> bool:
        """One epoch of steps, then validation, the log row and the checkpoints; False when
        the budget left no room for a single step."""
        self.mode.train()
        t_epoch, t_data = self.clock(), 0.0
        parts: dict[str, list[float]] = {}
        for _ in range(self.ipe):
            if self.out_of_time():
                break
            t0 = self.clock()
            batch = self.mode.draw()
            t1 = self.clock()
            self._lr = self.mode.lr_at(self.plan.training, self.progress())
            named = self.mode.step(batch, self._lr)
            self._check_finite(named["loss"])
            t2 = self.clock()
            t_data += t1 - t0
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * (t2 - t0) if self.step_seconds else t2 - t0
            self.state.iteration += 1
            for k, v in named.items():
                parts.setdefault(k, []).append(v)
            display.update(self._completed(), loss=float(np.mean(parts["loss"])))
        if not parts:
            return False
        self.state.epoch += 1
        dice, n_val = None, 0
        if self.state.epoch % max(1, self.state.val_every) == 0:
            t_val = self.clock()
            dice, n_val = self.validate_share()
            self.val_seconds = self.clock() - t_val
            self.state.val_seconds_total += self.val_seconds
        row = self._row(parts, dice, n_val, self.clock() - t_epoch, t_data)
        if self.dist.main:
            self.log.write(row)
            plot_curves(self.log.path, self.run_dir / "curves.png")
        self.history.append(row)
        self._tensorboard(row)
        improved = dice is not None and self.track_best(row["val_dice"], display)
        self.save(best=improved)
        shown = f"{row['val_dice']:.4f}" if dice is not None else "-"
        extra = ", ".join(f"{k} {row[k]:.4f}" for k in parts if k != "loss" and row[k] != "")
        extra = f" ({extra})" if extra else ""
        display.update(self._completed(), epoch=self.state.epoch, dice=shown)
        display.epoch_line(
            f"epoch {self.state.epoch:>3}  loss {row['train_loss']:.4f}{extra}"
            f"  val Dice {shown}{' *' if improved else ''}  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s")
        return True

    def _check_finite(self, value: float) -> None:
        if math.isfinite(value):
            return
        # the weights are ruined now: stop before anything is saved
        done = (f"checkpoint_last.pt (epoch {self.state.epoch}) is the last good state" if self.state.epoch
                else "no checkpoint was written")
        raise InputError(f"training loss is {value} at step {self.state.iteration + 1}; {done}", self.run_dir,
                         "lower the learning rate (--lr) or check the images for extreme values, then "
                         "train again")

    def track_best(self, score: float, display: LiveDisplay | None = None) -> bool:
        """Best score and early stopping, counted over validations; True when ``score`` improved.

        Validations without improvement count towards the patience only once the run is
        ``training.patience_after`` (0.5) of the way through: while the learning rate is high
        the scores swing from epoch to epoch (a plateau there is noise, and the gains of a
        decaying schedule come late), so an early best must not end a run with half its budget left.
        The patience watches the scores smoothed over validations (``patience_smoothing``, the
        newest one's weight: 0.3 in new plans), not the best raw one: with a few validation cases one lucky
        epoch sets a bar a slowly improving run may not pass again within the patience (a
        2-case Left Atrium run stopped at 85 % of its budget, before its schedule had annealed).
        """
        t = self.plan.training
        min_delta = float(t.get("min_delta", 0.0))
        improved = score > self.state.best_dice + min_delta
        if improved:
            self.state.best_dice = score
        # a plan written before the field watches the raw scores, as its runs were trained
        w, prev = float(t.get("patience_smoothing", 1.0)), self.state.smoothed_dice
        self.state.smoothed_dice = score if prev is None else (1.0 - w) * prev + w * score
        if self.state.smoothed_dice > self.state.best_smoothed + min_delta:
            self.state.best_smoothed = self.state.smoothed_dice
            self.state.stale_epochs = 0
        elif self.progress() >= float(t.get("patience_after", PATIENCE_AFTER)):
            self.state.stale_epochs += 1
        patience = int(t.get("patience", 0) or 0)
        if patience and self.state.stale_epochs >= patience:
            self.state.stopped_early = True
            if display is not None:
                display.epoch_line(f"early stop: no better validation Dice for {patience} validations")
        return improved

    def validate_share(self) -> tuple[list[float], int]:
        """Dice on the validation subset that keeps validation within its share of the time.

        Whole-image validation of every case each epoch can cost more than the training itself
        (hundreds of large 2D images). The first validation scores cases in a fixed seeded
        order until ``training.val_time_share`` of an epoch's training time is spent (at least
        ``training.val_min_cases``); that many cases, always the same ones so epochs compare,
        are scored from then on. When even the minimum costs more than the share, validation
        runs every ``val_every`` epochs instead. :meth:`final_choice` scores the full set.
        """
        t = self.plan.training
        net = self.mode.eval_net
        if self.state.val_cases:
            n = self.state.val_cases
            return pooled_dice(self._case_counts(net, self.val_order[:n]).sum(0)), n
        share = float(t.get("val_time_share", VAL_TIME_SHARE))
        n_all = len(self.val)
        n_min = min(n_all, int(t.get("val_min_cases", VAL_MIN_CASES)))
        train_seconds = max(self.step_seconds * self.ipe, 1e-6)
        counts = np.zeros((3, self.plan.num_classes))
        t0, n, world = self.clock(), 0, self.dist.world
        # in step over the ranks: each scores one case of a group of ``world``, rank 0 says when to stop
        while n < n_all and self.dist.decide(n < n_min or self.clock() - t0 < share * train_seconds):
            group = self.val_order[n: n + world]
            if self.dist.rank < len(group):
                counts += self.val.counts(net, group[self.dist.rank], self.plan, self.device, self.precision)
            n += len(group)
        counts = self.dist.all_sum(counts)
        spent = self.clock() - t0
        self.state.val_cases = n
        every = max(1, math.ceil(spent / (share * train_seconds) - 1e-9)) if n <= n_min else 1
        self.state.val_every = int(self.dist.all_sum(np.array([every if self.dist.main else 0]))[0])
        return pooled_dice(counts), n

    def _case_counts(self, net: nn.Module, cases: Sequence[int] | None = None) -> np.ndarray:
        """Counts ``(len(cases), 3, K)`` of ``cases`` (default: all), each rank scoring its share."""
        cases = list(range(len(self.val))) if cases is None else list(cases)
        counts = np.zeros((len(cases), 3, self.plan.num_classes))
        for j in range(self.dist.rank, len(cases), self.dist.world):
            counts[j] = self.val.counts(net, cases[j], self.plan, self.device, self.precision)
        return self.dist.all_sum(counts)

    def final_choice(self, display: LiveDisplay | None = None) -> dict | None:
        """Choose what ``checkpoint_best.pt`` serves: the best-by-validation weights or the last
        ones, both scored on the full validation set (``selection.json`` says which and why).

        The best epoch's score is the highest of many noisy validations, often of two or three
        cases, so it flatters its weights, while a decaying learning rate trains the last ones
        longest (and, in semi-supervised runs, most on the unlabelled term). The best weights are
        kept only when the validation cases show them better case by case: a one-sided paired
        t-test of their Dice against the last weights' at p < :data:`KEEP_BEST_P`. With fewer
        than two cases nothing can be shown, and the last weights are kept."""
        n_all = len(self.val)
        if not n_all:
            return None
        net = self.mode.eval_net
        best_path = self.run_dir / "checkpoint_best.pt"
        self.dist.barrier()  # rank 0 has written checkpoint_best.pt
        last = self._case_counts(net)
        choice = {"cases": n_all, "subset_cases": self.state.val_cases, "val_every": self.state.val_every,
                  "last_dice": float(np.mean(pooled_dice(last.sum(0)))), "last_epoch": self.state.epoch,
                  "rule": f"best only if better case by case (one-sided paired t-test, p < {KEEP_BEST_P:g})"}
        keep_last = True
        if best_path.is_file():
            ckpt = torch.load(best_path, map_location=self.device, weights_only=True)
            choice["best_epoch"] = int(ckpt["state"]["epoch"])
            if choice["best_epoch"] == self.state.epoch:  # the last weights are the best ones
                choice["best_dice"] = choice["last_dice"]
            else:
                best_net = copy.deepcopy(net)
                best_net.load_state_dict(ckpt["ema_model"] if ckpt.get("ema_model") else ckpt["model"])
                best = self._case_counts(best_net)
                choice["best_dice"] = float(np.mean(pooled_dice(best.sum(0))))
                choice["p_best_better"] = paired_p(case_dice(best), case_dice(last))
                keep_last = not choice["p_best_better"] < KEEP_BEST_P
        choice["chosen"] = "last" if keep_last else "best"
        # the run reports the full-set score of what checkpoint_best.pt now holds
        self.state.best_dice = choice["last_dice"] if keep_last else choice["best_dice"]
        if keep_last:
            self.save(best=True)
        self.selection = choice
        if self.dist.main:
            write_json(self.run_dir / "selection.json", choice)
        if display is not None and "p_best_better" in choice:
            display.epoch_line(f"full validation ({n_all} cases): last {choice['last_dice']:.4f}, best "
                               f"{choice['best_dice']:.4f} (epoch {choice['best_epoch']}, p = "
                               f"{choice['p_best_better']:.2g}): keeping {choice['chosen']}")
        return choice

    def _row(self, parts: dict[str, list[float]], dice: list[float] | None, n_val: int, seconds: float,
             data_s: float) -> dict:
        """The ``log.csv`` row; an epoch without validation has empty Dice cells."""
        nan = float("nan")
        row: dict = {
            "epoch": self.state.epoch,
            "iterations": self.state.iteration,
            "train_loss": round(float(np.mean(parts["loss"])), 6),
            "val_dice": round(float(np.mean(dice)), 6) if dice is not None else nan,
        }
        for i, name in enumerate(self.plan.label_names[1:]):
            row[f"val_dice_{name}"] = round(float(dice[i]), 6) if dice is not None else nan
        for key, values in parts.items():  # the mode's own loss terms; empty when unused (NaN)
            if key != "loss":
                row[key] = round(float(np.nanmean(values)), 6) if np.isfinite(values).any() else ""
        row.update({
            "lr": self._lr,
            "epoch_seconds": round(seconds, 3),
            "val_seconds": round(self.val_seconds, 3) if dice is not None else 0.0,
            "val_cases": n_val,
            "val_share": round(self.state.val_seconds_total / max(self.elapsed(), 1e-9), 4),
            "data_wait_share": round(data_s / max(seconds, 1e-9), 4),
            "elapsed_seconds": round(self.elapsed(), 2),
        })
        return row

    def _tensorboard(self, row: dict) -> None:
        """Every numeric column of the epoch row as a scalar, stepped by epoch."""
        if self._writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                group = "val" if key.startswith("val_") else "train"
                self._writer.add_scalar(f"{group}/{key}", value, row["epoch"])
        self._writer.flush()


def _summary_writer(run_dir: Path, epoch: int):
    """TensorBoard writer; events past ``epoch`` (a killed run's) are purged on resume."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise InputError("TensorBoard logging needs the tensorboard package",
                         fix="pip install tensorboard (or drop --tensorboard)") from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=epoch + 1)
