"""The Plan: everything training and inference need to agree on, as one JSON file.

A plan is derived from a dataset fingerprint with simple, explained rules (each choice has a
reason string), and any field can be overridden by the user.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from medunet.datasets import Dataset, load_case
from medunet.errors import InputError

PLAN_VERSION = 1
RGB_NAMES = {"r", "g", "b", "red", "green", "blue"}
CT_NAMES = {"ct"}
NONORM_NAMES = {"nonorm", "none"}

# CPU-oriented sizes: about 0.3-0.5 s per training step on 2 cores with bf16 (see BENCHMARKS.md)
MAX_PATCH_VOXELS = {2: 256 * 256, 3: 96 * 96 * 48}
VOXELS_PER_STEP = {2: 4 * 256 * 256, 3: 2 * 96 * 96 * 48}
MAX_BATCH = 16


@dataclass
class Plan:
    """What training and inference use; saved as ``plan.json`` in the model directory."""

    dataset_name: str
    dim: int
    in_channels: int
    channel_names: list[str]
    label_names: list[str]
    label_values: list[int]
    spacing: list[float]
    median_shape: list[int]
    normalization: list[dict]
    patch_size: list[int]
    batch_size: int
    network: dict
    training: dict = field(default_factory=dict)
    inference: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash never leaves a half-written plan.json."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".plan.", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise InputError("plan.json not found", path, "pass a model directory made by 'medunet train'")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"invalid plan ({exc})", path) from exc

    def build_network(self):
        """The plan's U-Net (untrained). The one place a plan becomes a network, so training,
        inference and export agree; a bad preset or option is a one-line error on plan.json."""
        from medunet.nets import build_network

        net = dict(self.network)
        preset = net.pop("preset", "default")
        try:
            return build_network(self.dim, self.in_channels, self.num_classes, preset=preset, **net)
        except (ValueError, TypeError) as exc:
            raise InputError(f"invalid network settings ({exc})", "plan.json",
                             "fix the 'network' fields (or --set network.*)") from exc

    def override(self, assignments: dict[str, object]) -> Plan:
        """Set fields by dotted name (``patch_size``, ``training.lr``, ``network.features``)."""
        d = self.to_dict()
        for key, value in assignments.items():
            target = d
            parts = key.split(".")
            for p in parts[:-1]:
                if p not in target or not isinstance(target[p], dict):
                    raise InputError(f"unknown plan field '{key}'",
                                     fix="see 'medunet plan DATA' for the fields")
                target = target[p]
            if parts[-1] not in target and len(parts) == 1:
                raise InputError(f"unknown plan field '{key}'", fix="see 'medunet plan DATA' for the fields")
            target[parts[-1]] = value
            d.setdefault("reasons", {})[key] = "set by the user"
        return Plan.from_dict(d)


def fingerprint_dataset(dataset: Dataset, facts: list[dict], max_samples: int = 20000,
                        seed: int = 0) -> dict:
    """Shapes, spacings and per-channel intensity statistics (inside the foreground) of a dataset."""
    rng = np.random.default_rng(seed)
    per_channel: list[list[np.ndarray]] = [[] for _ in range(dataset.num_channels)]
    class_voxels = np.zeros(dataset.num_classes, dtype=np.int64)
    for case in dataset.train:
        image, label, _ = load_case(case, dataset)
        if label is None:
            continue
        class_voxels += np.bincount(label.ravel(), minlength=dataset.num_classes)[: dataset.num_classes]
        fg = label > 0
        for c in range(image.shape[0]):
            vals = image[c][fg] if fg.any() else image[c].ravel()
            if vals.size > max_samples:
                vals = rng.choice(vals, max_samples, replace=False)
            per_channel[c].append(vals)
    stats = []
    for vals in per_channel:
        v = np.concatenate(vals) if vals else np.zeros(1, np.float32)
        stats.append({
            "mean": float(v.mean()), "std": float(v.std()),
            "p00_5": float(np.percentile(v, 0.5)), "p99_5": float(np.percentile(v, 99.5)),
        })
    shapes = np.array([f["shape"] for f in facts])
    spacings = np.array([f["spacing"] for f in facts], dtype=float)
    return {
        "num_cases": len(facts),
        "shapes": shapes.tolist(),
        "spacings": spacings.tolist(),
        "median_shape": np.median(shapes, axis=0).astype(int).tolist(),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "intensity": stats,
        "class_fraction": (class_voxels / max(class_voxels.sum(), 1)).tolist(),
    }


def _normalization(channel_names: list[str], stats: list[dict]) -> tuple[list[dict], str]:
    rgb = len(channel_names) == 3 and all(n.lower() in RGB_NAMES for n in channel_names)
    out = []
    for name, st in zip(channel_names, stats, strict=True):
        low = name.lower()
        if rgb:
            out.append({"scheme": "rgb", "mean": st["mean"] / 255.0, "std": max(st["std"] / 255.0, 1e-3)})
        elif low in CT_NAMES:
            out.append({"scheme": "ct", "lower": st["p00_5"], "upper": st["p99_5"],
                        "mean": st["mean"], "std": max(st["std"], 1e-3)})
        elif low in NONORM_NAMES:
            out.append({"scheme": "none"})
        else:
            out.append({"scheme": "zscore"})
    if rgb:
        why = "RGB channels: /255, then standardised with the dataset's per-channel statistics"
    elif any(o["scheme"] == "ct" for o in out):
        why = "CT: clipped to the foreground 0.5-99.5 percentiles, z-scored with foreground statistics"
    else:
        why = "z-score per image (MR and other non-quantitative intensities)"
    return out, why


def _patch_and_strides(median_shape: list[int], spacing: list[float], dim: int,
                       max_levels: int) -> tuple[list[int], list[list[int]]]:
    """Largest patch (in physical proportions of the data) within the voxel budget, and strides."""
    shape = np.array(median_shape, dtype=float)
    budget = MAX_PATCH_VOXELS[dim]
    patch = shape.copy()
    if patch.prod() > budget:
        # shrink the physically longest axes first, so the patch tends towards isotropic extent
        sp = np.array(spacing, dtype=float)
        while patch.prod() > budget:
            extent = patch * sp
            i = int(np.argmax(extent))
            patch[i] = max(8, math.floor(patch[i] * 0.9))
    patch = patch.astype(int)
    strides: list[list[int]] = []
    size = patch.copy()
    for _ in range(max_levels):
        s = [2 if n // 2 >= 4 else 1 for n in size]
        if not any(x == 2 for x in s):
            break
        strides.append(s)
        size = size // np.array(s)
    div = np.prod(np.array(strides), axis=0) if strides else np.ones(dim, int)
    # round to the network's divisor: an axis that holds the whole image rounds up (padding a
    # few voxels beats a second window); a shrunk axis rounds down to stay within the budget
    rounded = []
    for n, d, full in zip(patch, div, shape, strict=True):
        if n >= full:
            rounded.append(int(math.ceil(n / d) * d))
        else:
            rounded.append(int(max(d, (n // d) * d)))
    return rounded, strides


def make_plan(dataset: Dataset, fingerprint: dict, preset: str = "default") -> Plan:
    """Derive the plan from the fingerprint with explained rules."""
    from medunet.nets import PRESETS

    dim = len(fingerprint["median_shape"])
    if preset not in PRESETS:
        raise InputError(f"unknown network preset '{preset}'", fix=f"use one of {', '.join(PRESETS)}")
    net = dict(PRESETS[preset])
    max_levels = len(net["features"]) - 1
    patch, strides = _patch_and_strides(fingerprint["median_shape"], fingerprint["median_spacing"],
                                        dim, max_levels)
    net["features"] = net["features"][: len(strides) + 1]
    net["strides"] = strides
    net["preset"] = preset
    batch = int(min(MAX_BATCH, max(2, VOXELS_PER_STEP[dim] // int(np.prod(patch)))))
    norm, norm_why = _normalization(dataset.channel_names, fingerprint["intensity"])
    fg_fraction = 1.0 - fingerprint["class_fraction"][0]
    training = {
        "loss": "dice_ce",
        "optimizer": "adamw",
        "lr": 3e-3,
        "min_lr": 1e-6,
        "weight_decay": 1e-4,
        "warmup_fraction": 0.02,
        "grad_clip": 12.0,
        "iterations_per_epoch": 100,
        "epochs": 50,
        "fg_oversample": 1 / 3,
        "val_fraction": 0.2,
        "augment": {"flip": 0.5, "rot90": 0.5},
    }
    reasons = {
        "dim": f"{dim}D data",
        "patch_size": (
            f"the median image {fingerprint['median_shape']} fits within {MAX_PATCH_VOXELS[dim]} voxels"
            if np.prod(fingerprint["median_shape"]) <= MAX_PATCH_VOXELS[dim]
            else f"median image {fingerprint['median_shape']} shrunk (longest physical axis first) "
            f"to at most {MAX_PATCH_VOXELS[dim]} voxels for CPU speed"
        ) + ", rounded to multiples of the down-sampling factor",
        "batch_size": f"{VOXELS_PER_STEP[dim]} voxels per step / patch voxels, within [2, {MAX_BATCH}]",
        "network": f"preset '{preset}'; {len(strides)} down-samplings, "
        "an axis pools while its edge stays >= 4",
        "normalization": norm_why,
        "training": f"Dice+CE, AdamW with cosine decay; 1/3 of patches centred on foreground "
        f"(foreground is {100 * fg_fraction:.1f}% of voxels)",
        "spacing": "median spacing of the training cases",
    }
    return Plan(
        dataset_name=dataset.name,
        dim=dim,
        in_channels=dataset.num_channels,
        channel_names=list(dataset.channel_names),
        label_names=list(dataset.label_names),
        label_values=[int(v) for v in dataset.label_values],
        spacing=[float(s) for s in fingerprint["median_spacing"]],
        median_shape=[int(s) for s in fingerprint["median_shape"]],
        normalization=norm,
        patch_size=[int(p) for p in patch],
        batch_size=batch,
        network=net,
        training=training,
        inference={"overlap": 0.5, "sigma_scale": 0.125},
        reasons=reasons,
    )
