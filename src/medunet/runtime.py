"""Device and precision selection shared by training and inference.

On CPUs with native bf16 (avx512_bf16 / AMX), channels_last + bf16 autocast is 2-3x faster
than fp32 eager for these nets with the same masks (measured, see BENCHMARKS.md); on CUDA,
autocast (bf16 where supported, else fp16 with a grad scaler).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from medunet.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 natively (emulated bf16 is slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str | None = None) -> torch.device:
    """``auto``/None -> CUDA if available, else CPU; otherwise the named device, checked."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device '{device}'", fix="use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no GPU is available", fix="use --device cpu")
    return dev


def flush_denormals(device: torch.device) -> None:
    """Treat denormal floats as zero on a CPU (until :func:`float_mode_kept` restores the mode).

    Why: late in training many gradients and Adam moments fall below 1e-38, and x86 arithmetic on
    such numbers is tens of times slower; flushing them made 2D training steps ~20 % faster here
    (BENCHMARKS.md, training throughput) and changes nothing a network can tell apart.
    """
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def denormals_flushed() -> bool:
    """Whether this thread's CPU treats denormal floats as zero now."""
    return (torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() == 0.0


@contextlib.contextmanager
def float_mode_kept() -> Iterator[None]:
    """Restore the denormal mode on exit. ``train()`` and ``distill()`` flush denormals for
    their steps; the CPU flag is the thread's (numpy obeys it too), so a library call must not
    leave it changed for the caller's own arithmetic."""
    before = denormals_flushed()
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """Pick ``fp32``/``bf16``/``fp16`` for the device; refuse combinations that cannot run."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}'", fix=f"use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise InputError("fp16 is not supported on the CPU", fix="use --precision bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for the precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
