"""Small helpers the training loop calls: CSV log, checkpoints, live display."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medunet.files import atomic_file


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
        with atomic_file(self.path) as tmp, tmp.open("w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(keep)


def write_json(path: Path, obj: dict) -> None:
    """JSON to a temporary file, then rename: a kill never leaves a half-written file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def save_checkpoint(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves a broken file, and
    the fsyncs of the file and its folder (``publish(durable=True)``) mean a power loss neither."""
    with atomic_file(path, durable=True) as tmp:
        torch.save(state, tmp)


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
    try:
        with atomic_file(out_path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
