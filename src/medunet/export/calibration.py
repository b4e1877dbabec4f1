"""Calibration patches for static int8 quantisation.

The model directory does not record where its training data lives, so the images come from
``--calibration DIR`` or, by default, from the validation inputs that the training run scored
(``validation/scores.json`` names their folder, ``splits.json`` the validation case ids).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np

from medunet.errors import InputError
from medunet.inference.predictor import find_inputs
from medunet.io import read_image
from medunet.planning import Plan
from medunet.preprocessing import normalize

NO_SOURCE_FIX = "pass --calibration DIR, a folder of images like the training images"


def calibration_source(model_dir: Path, source: str | Path | None) -> tuple[Path, set[str] | None]:
    """The image folder (or file) to calibrate on and, by default, the validation case ids."""
    if source is not None:
        source = Path(source)
        if not source.exists():
            raise InputError("calibration images not found", source, NO_SOURCE_FIX)
        return source, None
    scores = model_dir / "validation" / "scores.json"
    try:
        folder = Path(json.loads(scores.read_text())["meta"]["images"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError("int8 quantisation needs calibration images and the model directory has no "
                         "validation/scores.json naming its validation inputs", model_dir,
                         NO_SOURCE_FIX) from exc
    if not folder.is_dir():
        raise InputError("the validation images this model was scored on are gone", folder, NO_SOURCE_FIX)
    ids = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        ids = set(json.loads((model_dir / "splits.json").read_text())["val"])
    return folder, ids


def calibration_patches(model_dir: Path, plan: Plan, source: str | Path | None = None,
                        n_patches: int = 16, max_cases: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Random patch-sized crops ``(1, C, *patch)`` (normalised as the plan says) of a few cases."""
    folder, ids = calibration_source(Path(model_dir), source)
    cases = find_inputs(folder, plan.in_channels)
    if ids:
        cases = [c for c in cases if c.case_id in ids] or cases
    rng = np.random.default_rng(seed)
    picked = [cases[i] for i in sorted(rng.choice(len(cases), min(max_cases, len(cases)), replace=False))]
    per_case = math.ceil(n_patches / len(picked))
    patch = [int(p) for p in plan.patch_size]
    out: list[np.ndarray] = []
    for case in picked:
        image = np.concatenate([read_image(p)[0] for p in case.paths], axis=0)
        if image.ndim - 1 != plan.dim or image.shape[0] != plan.in_channels:
            raise InputError(f"calibration image has shape {image.shape}, the model takes "
                             f"{plan.in_channels} channel(s) in {plan.dim}D", case.paths[0], NO_SOURCE_FIX)
        image = normalize(image, plan.normalization)
        pad = [(0, max(0, p - s)) for p, s in zip(patch, image.shape[1:], strict=True)]
        image = np.pad(image, [(0, 0), *pad])
        for _ in range(per_case):
            starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], patch, strict=True)]
            sl = tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
            out.append(np.ascontiguousarray(image[(slice(None), *sl)][None], dtype=np.float32))
    return out[:n_patches]
