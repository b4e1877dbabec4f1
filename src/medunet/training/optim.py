"""Optimisers from the plan, and an exponential moving average of the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from medunet.errors import InputError

OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(net: nn.Module, training: dict) -> torch.optim.Optimizer:
    """``adamw`` (our default: robust at the short runs a CPU affords) or ``sgd`` (Nesterov,
    momentum 0.99: nnU-Net's choice, pair it with the ``poly`` schedule and lr 1e-2)."""
    kind = training.get("optimizer", "adamw")
    lr, wd = float(training["lr"]), float(training.get("weight_decay", 0.0))
    if kind == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    if kind == "sgd":
        return torch.optim.SGD(net.parameters(), lr=lr, weight_decay=wd,
                               momentum=float(training.get("momentum", 0.99)), nesterov=True)
    raise InputError(f"unknown optimizer '{kind}'", "plan.json",
                     f"set training.optimizer to one of {', '.join(OPTIMIZERS)}")


def backward_and_step(loss: torch.Tensor, net: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, clip: float | None) -> None:
    """One optimiser step from a loss: scaled backward (fp16), gradient-norm clipping, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()


class ModelEMA:
    """Exponential moving average of a network's weights, used for validation and saved.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so the average is not dominated
    by the random initial weights in short runs; buffers (batch-norm statistics) are copied,
    not averaged, so they match the averaged weights' training network.
    """

    def __init__(self, net: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 < decay < 1.0:
            raise InputError(f"EMA decay {decay} is out of range", "plan.json",
                             "set training.ema to a value in (0, 1), e.g. 0.99, or 0 to turn it off")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(net).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), net.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), net.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.module.load_state_dict(state["model"])
