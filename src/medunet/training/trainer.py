"""The training run: set-up, the loop (one short function), validation and checkpoints.

``train()`` is what ``medunet train`` calls. The loop itself is :func:`_fit`; everything it
needs is gathered in :class:`_Run` so each helper stays small.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medunet.augment import flip_rot90
from medunet.datasets import Case, Dataset, find_dataset, load_case, validate_dataset
from medunet.errors import InputError
from medunet.inference.sliding_window import sliding_window_inference
from medunet.planning import Plan, fingerprint_dataset, make_plan
from medunet.preprocessing import normalize
from medunet.runtime import autocast, memory_format, resolve_device, resolve_precision
from medunet.training.callbacks import CsvLog, LiveDisplay, plot_curves, save_checkpoint
from medunet.training.losses import build_loss
from medunet.training.sampler import PatchSampler
from medunet.training.schedule import cosine_with_warmup

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
        return self.elapsed() + self.val_seconds + self.step_seconds >= self.budget

    def finished(self) -> bool:
        if self.budget is not None:
            return self.out_of_time()
        return self.state.epoch >= self.epochs

    def lr(self) -> float:
        t = self.plan.training
        return cosine_with_warmup(self.progress(), t["lr"], t["min_lr"], t.get("warmup_fraction", 0.02))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.sample()
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        aug = self.plan.training.get("augment", {})
        xt, yt = flip_rot90(xt, yt, aug.get("flip", 0.0), aug.get("rot90", 0.0), self.aug_gen)
        xt = xt.to(self.device, non_blocking=True).contiguous(memory_format=memory_format(self.plan.dim))
        return xt, yt.to(self.device, non_blocking=True).long()


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor) -> float:
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr()
    with autocast(run.device, run.precision):
        loss = run.loss_fn(run.net(x), y)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    clip = run.plan.training.get("grad_clip")
    if clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return float(loss.detach())


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
        t_val = time.perf_counter()
        dice = validate(run.net, run.val_images, run.val_labels, run.plan, run.device, run.precision)
        run.val_seconds = time.perf_counter() - t_val
        run.state.epoch += 1
        row = _epoch_row(run, losses, dice, time.perf_counter() - t_epoch, t_data)
        run.log.write(row)
        plot_curves(run.log.path, run.model_dir / "curves.png")
        history.append(row)
        improved = row["val_dice"] > run.state.best_dice
        if improved:
            run.state.best_dice = row["val_dice"]
        run.state.elapsed = run.elapsed()
        _save(run, best=improved)
        display.update(_completed(run), epoch=run.state.epoch, dice=f"{row['val_dice']:.4f}")
        display.epoch_line(
            f"epoch {run.state.epoch:>3}  loss {row['train_loss']:.4f}  val Dice {row['val_dice']:.4f}"
            f"{' *' if improved else ''}  lr {row['lr']:.2e}  {row['epoch_seconds']:.1f}s"
        )
    return history


def _completed(run: _Run) -> float:
    return run.elapsed() if run.budget is not None else run.state.iteration


def _epoch_row(run: _Run, losses: list[float], dice: list[float], seconds: float, data_s: float) -> dict:
    row = {
        "epoch": run.state.epoch,
        "iterations": run.state.iteration,
        "train_loss": round(float(np.mean(losses)), 6),
        "val_dice": round(float(np.mean(dice)), 6),
    }
    for name, d in zip(run.plan.label_names[1:], dice, strict=True):
        row[f"val_dice_{name}"] = round(float(d), 6)
    row.update({
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_seconds": round(seconds, 3),
        "data_wait_share": round(data_s / max(seconds, 1e-9), 4),
        "elapsed_seconds": round(run.elapsed(), 2),
    })
    return row


@torch.inference_mode()
def validate(net: torch.nn.Module, images: list[np.ndarray], labels: list[np.ndarray], plan: Plan,
             device: torch.device, precision: str) -> list[float]:
    """Dice per foreground class on whole images (sliding window), pooled over the cases."""
    net.eval()
    k = plan.num_classes
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    for img, lab in zip(images, labels, strict=True):
        probs = sliding_window_inference(
            net, torch.from_numpy(img), plan.patch_size, k, overlap=plan.inference.get("overlap", 0.5),
            batch_size=plan.batch_size, precision=precision, device=device)
        pred = probs.argmax(0).numpy()
        for c in range(1, k):
            p, g = pred == c, lab == c
            tp[c] += np.logical_and(p, g).sum()
            fp[c] += np.logical_and(p, ~g).sum()
            fn[c] += np.logical_and(~p, g).sum()
    denom = 2 * tp + fp + fn
    dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)
    return dice[1:].tolist()


def _save(run: _Run, best: bool) -> None:
    state = {
        "model": run.net.state_dict(),
        "ema_model": None,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "state": vars(run.state).copy(),
        "sampler_rng": run.sampler.rng.bit_generator.state,
        "aug_rng": run.aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    save_checkpoint(state, run.model_dir / "checkpoint_last.pt")
    if best:
        save_checkpoint(state, run.model_dir / "checkpoint_best.pt")


def _split(model_dir: Path, cases: list[Case], val_fraction: float, seed: int) -> dict:
    """A fixed train/validation split, written once to ``splits.json`` and reused on resume."""
    path = model_dir / "splits.json"
    if path.is_file():
        split = json.loads(path.read_text())
        known = {c.case_id for c in cases}
        missing = [c for c in split["train"] + split["val"] if c not in known]
        if missing:
            raise InputError(f"splits.json names cases that are not in the dataset: {missing[:3]}", path)
        return split
    ids = sorted(c.case_id for c in cases)
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    split = {"seed": seed, "val": sorted(ids[:n_val]), "train": sorted(ids[n_val:])}
    if not split["val"]:  # a single case: validate on it (the user sees it in splits.json)
        split["val"] = list(split["train"])
    path.write_text(json.dumps(split, indent=2))
    return split


def _load(cases: list[Case], dataset: Dataset, plan: Plan) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, labels = [], []
    for c in cases:
        img, lab, _ = load_case(c, dataset)
        images.append(normalize(img, plan.normalization))
        labels.append(lab)
    return images, labels


def prepare_plan(data: str | Path, preset: str = "default",
                 overrides: dict | None = None) -> tuple[Dataset, Plan]:
    """Find and validate the dataset, fingerprint it and derive the (overridden) plan."""
    dataset = find_dataset(data)
    facts = validate_dataset(dataset)
    plan = make_plan(dataset, fingerprint_dataset(dataset, facts), preset=preset)
    if overrides:
        plan = plan.override(overrides)
    return dataset, plan


def train(data: str | Path, model_dir: str | Path, *, epochs: int | None = None,
          time_budget: str | float | None = None, resume: bool = False, device: str | None = None,
          precision: str | None = None, seed: int = 0, preset: str = "default",
          overrides: dict | None = None, progress: bool = True, report: bool = True) -> TrainResult:
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
    """
    model_dir = Path(model_dir)
    last = model_dir / "checkpoint_last.pt"
    if resume and not last.is_file():
        raise InputError("nothing to resume: no checkpoint_last.pt", model_dir, "run without --resume")
    if not resume and last.is_file():
        raise InputError("the model directory already holds a run", model_dir,
                         "add --resume to continue or extend it, or choose another -o")
    budget = parse_duration(time_budget) if time_budget is not None else None
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if resume:
        dataset = find_dataset(data)
        validate_dataset(dataset)
        plan = Plan.load(model_dir)
        if overrides:
            plan = plan.override(overrides)
    else:
        dataset, plan = prepare_plan(data, preset, overrides)
    if epochs is None and budget is None:
        epochs = int(plan.training["epochs"])
    model_dir.mkdir(parents=True, exist_ok=True)
    plan.save(model_dir / "plan.json")

    split = _split(model_dir, dataset.train, plan.training.get("val_fraction", 0.2), seed)
    by_id = {c.case_id: c for c in dataset.train}
    tr_img, tr_lab = _load([by_id[i] for i in split["train"]], dataset, plan)
    val_img, val_lab = _load([by_id[i] for i in split["val"]], dataset, plan)

    torch.manual_seed(seed)
    net = plan.build_network().to(dev).to(memory_format=memory_format(plan.dim))
    t = plan.training
    optimizer = torch.optim.AdamW(net.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    aug_gen = torch.Generator().manual_seed(seed)
    sampler = PatchSampler(tr_img, tr_lab, plan.patch_size, plan.batch_size, t["fg_oversample"],
                           np.random.default_rng(seed))
    scaler = torch.amp.GradScaler(dev.type, enabled=prec == "fp16")
    state = RunState()
    if resume:
        ckpt = torch.load(last, map_location=dev, weights_only=True)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state = RunState(**ckpt["state"])
        sampler.rng.bit_generator.state = ckpt["sampler_rng"]
        aug_gen.set_state(ckpt["aug_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
    run = _Run(plan=plan, model_dir=model_dir, net=net, optimizer=optimizer, scaler=scaler,
               loss_fn=build_loss(t["loss"]), sampler=sampler, aug_gen=aug_gen, val_images=val_img,
               val_labels=val_lab, device=dev, precision=prec, epochs=epochs, budget=budget,
               state=state, log=CsvLog(model_dir / "log.csv"), elapsed_at_start=state.elapsed)
    run.log.truncate_after(state.epoch)
    total = budget if budget is not None else epochs * run.ipe
    with LiveDisplay(total, "train", enabled=progress) as display:
        display.epoch_line(
            f"training {plan.dim}D U-Net on {len(tr_img)} cases (val {len(val_img)}), patch "
            f"{plan.patch_size} x batch {plan.batch_size}, {dev.type} {prec}"
            + (f", budget {budget:.0f}s" if budget else f", {epochs} epochs"))
        history = _fit(run, display)
    if not (model_dir / "checkpoint_last.pt").is_file():
        raise InputError("the time budget ended before one epoch finished", model_dir,
                         "give a larger --time-budget")
    if report:
        validation_report(model_dir, dataset, split["val"], device=device, precision=precision)
    return TrainResult(model_dir, state.best_dice if math.isfinite(state.best_dice) else float("nan"),
                       state.epoch, state.iteration, run.elapsed(), history)


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
        for path, pred in zip(written, preds, strict=True):
            _, geom = read_image(path)
            write_image(path, apply_postprocessing(pred, choice, background), geom)
    first = by_id[case_ids[0]]
    evaluate(out, first.label_path.parent, labels=[v for v in dataset.label_values if v != 0],
             json_path=out / "scores.json", report=out / "report.html", model_dir=model_dir,
             images=first.image_paths[0].parent, workers=1, progress=False)
    return out / "report.html"
