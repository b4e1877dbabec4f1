"""Data-parallel training on torch.distributed: the same run on one process or N.

``torchrun --nproc-per-node N -m medunet train ...`` (or ``medunet train ... --nproc N``,
which starts the same through torch's elastic launcher) sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on CUDA, Gloo on a CPU) and
every rank trains a ``DistributedDataParallel`` copy of the network on its own patches. The
global batch is ``N x plan.batch_size``; the learning rate is the plan's, unscaled (AdamW at
these batch sizes does not need the linear scaling rule; set ``training.lr`` to change it).
Without those variables everything here is a no-op for the single process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from medunet.errors import InputError

TIMEOUT_S = 300  # a collective waiting this long for a dead rank ends the run with an error


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the logs, checkpoints, curves and reports; the others only train."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over the ranks (validation counts)."""
        if not self.active:
            return array
        t = torch.as_tensor(np.asarray(array, dtype=np.float64), device=_collective_device())
        torch.distributed.all_reduce(t)
        return t.cpu().numpy()

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank: a decision taken from one clock (the time budget),
        so all ranks stop at the same step."""
        return bool(self.share([1.0 if flag else 0.0])[0])

    def share(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (the budget's progress: one learning rate for all)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        torch.distributed.broadcast(t, src=0)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


SINGLE = Dist()


def _collective_device() -> torch.device:
    """Where the small tensors of :class:`Dist`'s collectives live: NCCL reduces only CUDA
    tensors (a CPU tensor is an error there), Gloo those on the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_environment() -> Dist:
    """The place torchrun gave this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise InputError(f"cannot read torchrun's environment ({exc})",
                         fix="start distributed runs with torchrun or medunet train --nproc N") from exc
    return Dist(rank, world, local) if world > 1 else SINGLE


def setup(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (no-op otherwise); on CUDA each rank
    takes the GPU of its local rank."""
    dist = from_environment()
    if not dist.active or torch.distributed.is_initialized():
        return dist
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise InputError(f"rank {dist.rank} needs GPU {dist.local_rank}, but this node has "
                             f"{torch.cuda.device_count()} visible", fix=ONE_RANK_PER_GPU)
        torch.cuda.set_device(dist.local_rank)
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    atexit.register(_teardown)  # one group for the process (folds train one after the other in it)
    return dist


# NCCL cannot put two ranks on one GPU, so every rank on a node needs its own
ONE_RANK_PER_GPU = ("start at most one process per GPU (--nproc / --nproc-per-node), "
                    "or train on the CPU with --device cpu")


def check_gpus(nproc: int, device: torch.device) -> None:
    """Refuse ``nproc`` processes on this node when they would train on fewer GPUs (before any
    is started, so the launcher is not left waiting for ranks that cannot join)."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise InputError(f"{nproc} processes need {nproc} GPUs, but this node has "
                         f"{torch.cuda.device_count()} visible", fix=ONE_RANK_PER_GPU)


def _teardown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """Rank ``r``'s device: ``cuda:<local rank>`` on CUDA, the CPU otherwise."""
    if dist.active and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def wrap(net: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(net)`` for the training steps (the plain ``net`` stays what is
    validated and saved). Batch norm becomes SyncBatchNorm on CUDA; on a CPU, where torch has
    no SyncBatchNorm kernel, each rank keeps its own batch statistics (the default instance
    norm has none)."""
    if not dist.active:
        return net
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)


def sync_batchnorm(net: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """Batch-norm layers shared over the ranks (CUDA only; call before the optimiser is built)."""
    if dist.active and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def rank_seed(seed: int, dist: Dist) -> int:
    """Rank 0 keeps ``seed`` (a 1-process run and rank 0 draw alike); rank r gets its own."""
    return seed if dist.rank == 0 else seed + 7919 * dist.rank
