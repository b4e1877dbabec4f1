"""Small helpers the training loop calls: CSV log, checkpoints, live display."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medunet.files import publish
from medunet.training.optim import optimizer_state


class CsvLog:
    """Appends one row per epoch to ``log.csv`` (the header is written once)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def truncate_after(self, epoch: int) -> None:
        """Drop rows past ``epoch``: a run killed after logging but before its checkpoint
        repeats that epoch on resume, and its row must not appear twice."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["epoch"]) <= epoch]
        if len(keep) == len(rows):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(keep)
        os.replace(tmp, self.path)


def write_json(path: Path, obj: dict) -> None:
    """JSON to a temporary file, then rename: a kill never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    publish(tmp, path)


def save_run(model_dir: Path, best: bool, *, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, state: dict, sampler_rng, aug_gen: torch.Generator,
             ema=None) -> None:
    """``checkpoint_last.pt`` (and ``checkpoint_best.pt``): everything a resumed run needs, in
    the one layout ``load_network`` and ``train(resume=True)`` read (trainer and distill alike)."""
    ema_state = ema.state_dict() if ema is not None else None
    ckpt = {
        "model": net.state_dict(),
        "ema_model": ema_state["model"] if ema_state else None,
        "ema": {k: v for k, v in ema_state.items() if k != "model"} if ema_state else None,
        "optimizer": optimizer_state(optimizer),
        "scaler": scaler.state_dict(),
        "state": dict(state),
        "sampler_rng": sampler_rng.bit_generator.state,
        "aug_rng": aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    # best first: a kill between the two never leaves a best score whose weights were not saved
    if best:
        save_checkpoint(ckpt, model_dir / "checkpoint_best.pt")
    save_checkpoint(ckpt, model_dir / "checkpoint_last.pt")


def save_checkpoint(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves a broken file, and
    the fsyncs of the file and its folder (``publish(durable=True)``) mean a power loss neither."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        publish(tmp, path, durable=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class LiveDisplay:
    """A rich progress bar with loss, Dice and ETA, plus one printed line per epoch."""

    def __init__(self, total: float, unit: str, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val Dice {task.fields[dice]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(unit, total=total, epoch=0, loss=float("nan"), dice="-")

    def __enter__(self) -> LiveDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, completed: float, **fields) -> None:
        self.progress.update(self.task, completed=completed, **fields)

    def epoch_line(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)


def plot_curves(log_path: Path, out_path: Path) -> None:
    """Draw ``curves.png`` from ``log.csv``: training loss and validation Dice per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with log_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for key in [k for k in rows[0] if k.startswith("val_dice")]:
        # epochs without validation have no score: draw the validated ones, joined
        points = [(e, float(r[key])) for e, r in zip(epochs, rows, strict=True)
                  if r.get(key) not in (None, "") and math.isfinite(float(r[key]))]
        if points:
            ax_dice.plot(*zip(*points, strict=True), marker=".", label=key.replace("val_dice_", ""))
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation Dice (whole images)")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend(fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".curves.", suffix=".png", dir=out_path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        publish(tmp, out_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
