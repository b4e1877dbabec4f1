"""The Plan: everything training and inference need to agree on, as one JSON file.

A plan is derived from a dataset fingerprint with simple, explained rules (each choice has a
reason string in ``plan.reasons``), and any field can be overridden by the user (``--set``
or a JSON/YAML file, :func:`load_overrides`).

Rules, in the order :func:`make_plan` applies them:

- target spacing: the median spacing; for anisotropic 3D data (median spacing max/min > 3)
  the thick axis takes the 10th percentile of the cases' spacings on it (not below the
  in-plane spacing), so thin-slice cases are not thrown away; resampling only when some case
  is more than 1 % off the target.
- cropping to the non-zero region when it removes >= 10 % of the median case; z-score inside
  the non-zero region when it removes >= 25 % (nnU-Net's rule: the empty border would
  otherwise dominate the statistics).
- working resolution (:mod:`medunet.planning.scale`): the target spacing is coarsened where
  the labels' large objects would not fit the patch with context, unless thin structures
  forbid it; a conflict between the two offers the ``cascade`` configuration.
- configuration: ``2d`` for 2D data, ``3d`` for 3D data; very thick slices (target spacing
  max/min > 3) also offer ``2d``: the same dim-3 plan with one-slice patches and ``[1, 3, 3]``
  kernels, i.e. a 2D U-Net run slice by slice through the unchanged 3D pipeline.
- patch and batch from a voxel budget: a time-per-step budget on CPUs, a memory-driven one
  on GPUs (``device_memory_gb``); network depth from the patch.
- normalisation per channel from its name (CT, MR, RGB, noNorm), or a CT window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from medunet.augment import default_augmentation
from medunet.datasets import Dataset, load_case
from medunet.errors import InputError
from medunet.files import atomic_file
from medunet.planning.scale import (
    case_scale,
    image_relative_scale,
    label_scales,
    rescale_case,
    summarize_scales,
    working_factor,
)
from medunet.preprocessing.crop import nonzero_bbox
from medunet.preprocessing.pipeline import needs_resampling
from medunet.preprocessing.resample import target_shape

PLAN_VERSION = 2
RGB_NAMES = {"r", "g", "b", "red", "green", "blue"}
CT_NAMES = {"ct"}
MR_NAMES = {"mr", "mri", "t1", "t1w", "t1c", "t1ce", "t1gd", "t2", "t2w", "flair", "adc", "dwi",
            "pd", "pdw", "swi", "dce", "bold"}
NONORM_NAMES = {"nonorm", "none"}

# CPU-oriented sizes: about 0.3-0.5 s per training step on 2 cores with bf16 (see BENCHMARKS.md)
MAX_PATCH_VOXELS = {2: 256 * 256, 3: 96 * 96 * 48}
VOXELS_PER_STEP = {2: 4 * 256 * 256, 3: 2 * 96 * 96 * 48}
MAX_BATCH = 16
# GPU sizes at the reference memory (a 40 GB card), as nnU-Net-like plans use; below it the
# patch budget shrinks with the square root of the memory and the step budget linearly, so
# both patch and batch get smaller; above it the patch stays and the batch grows
GPU_REFERENCE_GB = 40.0
GPU_PATCH_VOXELS = {2: 512 * 512, 3: 128 * 128 * 128}
GPU_VOXELS_PER_STEP = {2: 12 * 512 * 512, 3: 2 * 128 * 128 * 128}
GPU_MAX_BATCH = 32
# on a GPU a batch may cover at most this share of the dataset's voxels (nnU-Net's cap): a
# large card and a small dataset would otherwise see every case several times per step
GPU_MAX_DATASET_SHARE = 0.05

ANISOTROPY = 3.0  # max/min spacing above which data counts as anisotropic (thick slices)
RESAMPLE_TOLERANCE = 0.01  # a case within 1 % of the target spacing is left as it is
CROP_MIN_REMOVED = 0.10  # crop to the non-zero region when it removes at least this share
NONZERO_NORM_MIN_REMOVED = 0.25  # z-score inside the non-zero region from this share on
CONFIGS = ("auto", "2d", "3d", "cascade")
# Named CT windows as (level, width) in Hounsfield units: the usual radiology presets
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


def window_scheme(level: float, width: float) -> dict:
    """The ``window`` normalisation for a level/width: clip to ``level -+ width / 2``, map to [0, 1]."""
    return {"scheme": "window", "lower": float(level - width / 2), "upper": float(level + width / 2)}


@dataclass
class Plan:
    """What training and inference use; saved as ``plan.json`` in the model directory.

    ``spacing`` is the target spacing and ``median_shape`` the median case after cropping and
    resampling (what the network sees). ``preprocessing`` holds ``crop_nonzero``,
    ``resample``, ``image_order``, ``label_mode`` and ``separate_z`` (missing keys mean: no
    crop, no resampling, order 3, nearest, None: how plans before version 2 behaved).
    ``configuration`` is the chosen one of ``configurations`` ("2d", "3d").
    """

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
    preprocessing: dict = field(default_factory=dict)
    configuration: str = ""
    configurations: list[str] = field(default_factory=list)
    resolution: dict = field(default_factory=dict)
    cascade: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # plans written before configurations existed were what their dimension says
        if not self.configuration:
            self.configuration = f"{self.dim}d"
        if not self.configurations:
            self.configurations = [self.configuration]

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
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
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
        """The plan's network (untrained): ``network.arch`` (``unet`` when absent) built by
        :func:`medunet.nets.create_model` from the other ``network`` fields. The one place a plan
        becomes a network, so training, inference and export agree; an unknown arch, a bad preset
        or option is a one-line error on plan.json."""
        from medunet.nets import DEFAULT_ARCH, create_model

        net = dict(self.network)
        arch = net.pop("arch", None) or DEFAULT_ARCH
        try:
            return create_model(arch, self.dim, self.in_channels, self.num_classes, **net)
        except (ValueError, TypeError) as exc:
            raise InputError(f"invalid network settings ({exc})", "plan.json",
                             "fix the 'network' fields (or --set network.*)") from exc

    def override(self, assignments: dict[str, object]) -> Plan:
        """Set fields by dotted name (``patch_size``, ``training.lr``, ``network.features``).

        A name the plan does not know (``training.patiense``) is an error naming the closest
        known one: a silently stored typo would be ignored by every reader."""
        d = self.to_dict()
        for key, value in assignments.items():
            _check_field(d, key)
            why = "set by the user"
            if key == "network.arch":  # refused now, not when a run builds the network
                from medunet.nets import get_arch

                why += f": {get_arch(str(value)).summary}"
            target = d
            parts = key.split(".")
            for p in parts[:-1]:
                if target.get(p) is None:  # an optional nested setting not written yet
                    target[p] = {}
                if not isinstance(target[p], dict):
                    raise InputError(f"unknown plan field '{key}': '{p}' holds a value, not settings",
                                     fix=f"set '{key.rsplit('.', 1)[0]}' itself")
                target = target[p]
            target[parts[-1]] = value
            d.setdefault("reasons", {})[key] = why
        d["reasons"].update(value_reasons(d.get("training") or {}, d.get("inference") or {}))
        return Plan.from_dict(d)


# What the planner sets for training: the schedule measured best for short CPU runs
# (BENCHMARKS.md). value_reasons compares a plan against these to say what was changed.
DEFAULT_SCHEDULE = {"loss": "dice_ce", "optimizer": "adamw", "schedule": "cosine", "lr": 3e-3,
                    "min_lr": 1e-6}
_LOSS_NAMES = {"dice_ce": "Dice+CE", "dice": "Dice", "ce": "cross-entropy"}


def value_reasons(training: dict, inference: dict) -> dict[str, str]:
    """The ``reasons`` texts that describe setting values, written from the values themselves so
    they cannot go stale when ``--set`` or a plan file changes them (the planner and
    :meth:`Plan.override` both call this)."""
    t = training
    out: dict[str, str] = {}
    if t:
        sched = t.get("schedule", "cosine")
        text = (f"{_LOSS_NAMES.get(t.get('loss', 'dice_ce'), t.get('loss'))}; "
                f"{t.get('optimizer', 'adamw')}, lr {t.get('lr', 3e-3):g}"
                + (f" with {100 * t['warmup_fraction']:g}% warm-up" if t.get("warmup_fraction") else "")
                + (", constant" if sched == "constant" else f" and {sched} decay"
                   + (f" to {t['min_lr']:g}" if "min_lr" in t else "")))
        changed = [k for k, v in DEFAULT_SCHEDULE.items() if k in t and t[k] != v]
        text += (f" (changed from the measured default: {', '.join(changed)})" if changed
                 else " (measured best for short CPU runs, see BENCHMARKS.md)")
        if t.get("ema"):
            every = t.get("ema_every", 1)
            text += (f"; EMA of the weights ({t['ema']:g}, folded in "
                     + ("every step" if every == 1 else f"every {every} steps") + ") is validated and saved")
        if t.get("patience"):
            w = t.get("patience_smoothing", 1)
            text += (f"; early stop after {t['patience']} validations without a better "
                     + ("Dice" if w == 1 else f"smoothed Dice (newest weighted {w:g})")
                     + f" once {100 * t.get('patience_after', 0):g}% of the run is done")
        if "fg_oversample" in t:
            text += f"; {100 * t['fg_oversample']:.0f}% of patches centred on foreground"
        out["training"] = text
    tta, choice = inference.get("tta"), inference.get("tta_choice")
    if tta is not None and choice and tta in ("none", "flip"):
        chosen = "flip" if choice["flip"] - choice["none"] >= choice["min_gain"] else "none"
        out["inference.tta"] = (
            f"chosen on {choice['cases']} validation cases: mean Dice {choice['flip']:.4f} with mirroring, "
            f"{choice['none']:.4f} without; mirroring is kept when it gains >= "
            f"{100 * choice['min_gain']:g} points" + ("" if tta == chosen else " (then changed by the user)"))
    elif tta is not None:
        out["inference.tta"] = (
            "mirroring TTA (every combination of axis flips; the 3D default: +1 Dice point on a Left "
            "Atrium volume, still > 10x faster than nnU-Net's default prediction, BENCHMARKS.md)"
            if tta == "flip"
            else f"TTA '{tta}'" if tta != "none"
            else "no TTA until training's validation shows that mirroring gains >= 0.5 Dice points (it "
            "then sets 'flip'; 2^dims passes); predict --tta flip to use it")
    return out


# The settings each typed section of a plan may hold; the plan a planner writes holds a subset
# (the others have defaults where they are read). Nested values (``training.augment``,
# ``training.loss_options``) are checked by their own readers.
TYPED_SECTIONS: dict[str, frozenset[str]] = {
    "training": frozenset({
        "augment", "ema", "ema_every", "epochs", "fg_oversample", "grad_clip", "iterations_per_epoch",
        "loss", "loss_options", "lr", "min_delta", "min_lr", "momentum", "optimizer", "patience",
        "patience_after", "patience_smoothing", "poly_exponent", "schedule", "semi", "step_gamma",
        "step_milestones", "val_fraction", "val_min_cases", "val_time_share", "warmup_fraction",
        "weight_decay"}),
    # semi-supervised training (written when it is used; defaults in medunet.training.semi.SEMI_DEFAULTS)
    "training.semi": frozenset({
        "bcp_box", "confidence", "consistency", "dropout", "ema_decay", "method", "mix", "noise",
        "pseudo_class_share", "pseudo_rounds", "pseudo_threshold", "pseudo_tta", "ramp_up", "restart",
        "restart_lr", "temperature", "uncertainty_passes", "unlabeled_on_top", "unlabeled_patch",
        "unlabeled_ratio", "unlabeled_start"}),
    # average, window_weights, pad, mirror_axes: how imported nnU-Net models predict (nnunet/)
    "inference": frozenset({"average", "mirror_axes", "overlap", "pad", "postprocessing", "sigma_scale",
                            "tta", "tta_choice", "window_weights"}),
    "preprocessing": frozenset({"clip_resampled", "crop_nonzero", "image_order", "image_size",
                                "keep_spacing_axes", "label_mode", "normalize_first", "resample",
                                "separate_z"}),
    "network": frozenset(),  # the registered networks' options (nets.network_option_names), see _section_keys
}


def _section_keys(section: str) -> frozenset[str]:
    if section == "network":  # every option of the registered networks, the preset and the arch
        from medunet.nets import network_option_names

        return network_option_names()
    return TYPED_SECTIONS[section]


def _check_field(d: dict, key: str) -> None:
    """Refuse a dotted plan field that does not exist, suggesting the closest one."""
    import difflib

    parts = key.split(".")
    fix = "see 'medunet plan DATA' for the fields"
    if parts[0] not in d:
        close = difflib.get_close_matches(parts[0], [k for k in d if k != "reasons"], n=1)
        raise InputError(f"unknown plan field '{key}'", fix=f"did you mean '{close[0]}'?" if close else fix)
    if len(parts) == 1:
        return
    section = parts[0]
    if section in TYPED_SECTIONS:
        known = _section_keys(section) | set(d.get(section) or {})
        if parts[1] not in known:
            close = difflib.get_close_matches(parts[1], sorted(known), n=1)
            raise InputError(f"unknown plan field '{key}'",
                             fix=f"did you mean '{section}.{close[0]}'?" if close else fix)
        sub = ".".join(parts[:2])
        if len(parts) > 2 and sub in TYPED_SECTIONS and parts[2] not in TYPED_SECTIONS[sub]:
            close = difflib.get_close_matches(parts[2], sorted(TYPED_SECTIONS[sub]), n=1)
            raise InputError(f"unknown plan field '{key}'",
                             fix=f"did you mean '{sub}.{close[0]}'?" if close else fix)
        return
    target = d
    for p in parts[:-1]:
        if not isinstance(target, dict) or p not in target or not isinstance(target[p], dict):
            raise InputError(f"unknown plan field '{key}'", fix=fix)
        target = target[p]


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_overrides(path: str | Path) -> dict[str, object]:
    """Plan overrides from a JSON or YAML file, as dotted keys for :meth:`Plan.override`.

    Nested mappings flatten (``{"training": {"lr": 0.01}}`` -> ``{"training.lr": 0.01}``), so
    a file can hold a few fields or a whole edited ``plan.json`` (its ``reasons`` are
    explanations, not settings, and are skipped: overridden fields get "set by the user").
    ``.yaml``/``.yml`` files are read with PyYAML (safe loader); anything else as JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("plan overrides file not found", path, "pass a JSON or YAML file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read plan overrides ({exc})", path) from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - PyYAML is a dependency
            raise InputError("reading YAML needs PyYAML", path, "pip install pyyaml, or use JSON") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"invalid YAML ({exc})".replace("\n", " "), path) from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON ({exc})", path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError("plan overrides must be a mapping of field names to values", path,
                         'write e.g. {"training": {"lr": 0.001}} or training.lr: 0.001')
    data.pop("reasons", None)
    return _flatten(data)


def modality(name: str) -> str:
    """The modality a channel name says: ``ct``, ``mr``, ``rgb``, ``none`` (noNorm) or ``other``."""
    low = name.strip().lower()
    if low in CT_NAMES:
        return "ct"
    if low in MR_NAMES:
        return "mr"
    if low in RGB_NAMES:
        return "rgb"
    if low in NONORM_NAMES:
        return "none"
    return "other"


def fingerprint_dataset(dataset: Dataset, facts: list[dict], max_samples: int = 20000,
                        seed: int = 0) -> dict:
    """What the plan rules need to know about a dataset, read once from every training case.

    Shapes and spacings (from ``facts``, :func:`medunet.datasets.validate_dataset`'s output),
    per-channel intensity statistics inside the foreground (mean, std, 0.5 and 99.5
    percentiles, from up to ``max_samples`` voxels per case and channel), class frequencies
    (share of voxels, share of cases containing the class), the per-case share of voxels kept
    by cropping to the non-zero region and the shape after it, each channel's modality, and
    per foreground class the scale of its structures (:mod:`medunet.planning.scale`).
    """
    rng = np.random.default_rng(seed)
    per_channel: list[list[np.ndarray]] = [[] for _ in range(dataset.num_channels)]
    class_voxels = np.zeros(dataset.num_classes, dtype=np.int64)
    class_cases = np.zeros(dataset.num_classes, dtype=np.int64)
    crop_kept, cropped_shapes, scales = [], [], []
    for case in dataset.train:
        image, label, geom = load_case(case, dataset)
        box = nonzero_bbox(image)
        cshape = [b - a for a, b in box]
        cropped_shapes.append(cshape)
        crop_kept.append(float(np.prod(cshape) / np.prod(image.shape[1:])))
        if label is None:
            continue
        scales.append(label_scales(label, geom.spacing[-label.ndim:], dataset.num_classes))
        counts = np.bincount(label.ravel(), minlength=dataset.num_classes)[: dataset.num_classes]
        class_voxels += counts
        class_cases += counts > 0
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
    n_labelled = max(1, sum(c.label_path is not None for c in dataset.train))
    image_size, image_why = _image_size(shapes, spacings, scales)
    if image_size is not None:  # every image gets the pixel size that brings it to the median size
        sizes = np.sqrt(np.prod(shapes, axis=1).astype(float))
        factors = image_size / sizes
        spacings = spacings * factors[:, None]
        scales = [rescale_case(c, float(f), shapes.shape[1]) for c, f in zip(scales, factors, strict=True)]
    return {
        "num_cases": len(facts),
        "shapes": shapes.tolist(),
        "spacings": spacings.tolist(),
        "median_shape": np.median(shapes, axis=0).astype(int).tolist(),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "intensity": stats,
        "modalities": [modality(n) for n in dataset.channel_names],
        "class_fraction": (class_voxels / max(class_voxels.sum(), 1)).tolist(),
        "class_case_fraction": (class_cases / n_labelled).tolist(),
        "crop_kept": crop_kept,
        "cropped_shapes": cropped_shapes,
        "scales": summarize_scales(scales),
        "image_size": image_size,
        "image_size_why": image_why,
    }


def _image_size(shapes: np.ndarray, spacings: np.ndarray, scales: list[list[dict]],
                ) -> tuple[float | None, str]:
    """The common image size (edge, pixels) when the images carry no pixel size (all spacings
    1, as PNG/JPG) and their objects scale with them (:func:`scale.image_relative_scale`)."""
    if shapes.shape[1] != 2 or not np.allclose(spacings, 1.0, rtol=0, atol=1e-9):
        return None, "the images have a physical pixel size: objects are compared in physical units"
    if len(scales) != len(shapes):
        return None, "not every case is labelled"
    sizes = np.sqrt(np.prod(shapes, axis=1).astype(float))
    chosen, why = image_relative_scale(sizes.tolist(), [case_scale(c) for c in scales])
    return (float(np.median(sizes)) if chosen else None), why


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def _target_spacing(fp: dict, dim: int) -> tuple[np.ndarray, int | None, str]:
    """Median spacing; the thick axis of anisotropic 3D data gets its 10th percentile."""
    spacings = np.array(fp["spacings"], dtype=float).reshape(-1, dim)
    median = np.median(spacings, axis=0)
    target = median.copy()
    if dim == 3 and median.max() / median.min() > ANISOTROPY:
        thick = int(np.argmax(median))
        in_plane = max(median[a] for a in range(dim) if a != thick)
        # thin-slice cases keep their resolution; never finer than in-plane (nnU-Net's guard)
        target[thick] = max(float(np.percentile(spacings[:, thick], 10)), in_plane)
        why = (f"median spacing {_fmt(median)} is anisotropic (max/min "
               f"{median.max() / median.min():.1f} > {ANISOTROPY:g}): the thick axis {thick} takes the "
               f"10th percentile of its spacings, {target[thick]:.3g}; the others the median")
        return target, thick, why
    return target, None, "median spacing of the training cases"


def _working_resolution(fp: dict, dim: int, target: np.ndarray, thick: int | None,
                        slice_axis: int | None, crop: bool, patch_voxels: int,
                        label_names: Sequence[str], spacing: Sequence[float] | None,
                        factor: float | None, receptive_field: int | None = None
                        ) -> tuple[np.ndarray, dict, str]:
    """The target spacing coarsened where objects need context (:mod:`medunet.planning.scale`).

    Only in-plane axes are coarsened for anisotropic data and for the slice-wise ``2d``
    configuration. ``spacing`` (user-set) or ``factor`` replace the measured choice.
    """
    if spacing is not None:
        sp = np.array([float(v) for v in spacing], dtype=float)
        if sp.shape != target.shape or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise InputError(f"spacing must be {dim} positive numbers, got {list(spacing)}",
                             fix=f"e.g. --set spacing={','.join(['1'] * dim)}")
        return sp, {"factor": None, "set_by": "user"}, "spacing set by the user"
    skip = {a for a in (thick, slice_axis) if a is not None}
    axes = [a for a in range(dim) if a not in skip]
    shapes = _shape_after(fp, dim, target, crop)
    median = np.median(np.array(shapes), axis=0)
    if slice_axis is not None:
        median[slice_axis] = 1  # one-slice patches: the slice axis takes none of the budget
    scales = fp.get("scales") or []
    wr = working_factor(scales, target, median.tolist(), patch_voxels, axes, list(label_names)[1:],
                        receptive_field)
    chosen, why = wr.factor, wr.reason
    if factor is not None:
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise InputError(f"resolution.factor must be a positive number, got {factor!r}",
                             fix="e.g. --set resolution.factor=1 (the data's own resolution)")
        chosen = float(factor)
        why = f"factor {chosen:g} set by the user (measured choice: {wr.reason})"
    out = target.copy()
    for a in axes:
        out[a] = target[a] * chosen
    if thick is not None:  # never coarser in-plane than across slices
        out[axes] = np.minimum(out[axes], target[thick])
    record = {"factor": chosen, "axes": axes, "lowres_factor": wr.lowres_factor,
              "context_factor": round(wr.context_factor, 3),
              "fit_factor": round(wr.fit_factor, 3), "field_factor": round(wr.field_factor, 3),
              "receptive_field": receptive_field,
              "thin_factor": round(wr.thin_factor, 3) if math.isfinite(wr.thin_factor) else None,
              "conflict": wr.conflict, "scales": scales}
    return out, record, why


def _shape_after(fp: dict, dim: int, target: np.ndarray, crop: bool) -> list[list[int]]:
    """Each case's shape after cropping (if planned) and resampling to the target spacing."""
    shapes = fp.get("cropped_shapes") if crop else None
    shapes = shapes or fp["shapes"]
    out = []
    for shape, sp in zip(shapes, fp["spacings"], strict=True):
        resample = needs_resampling(sp, target.tolist(), RESAMPLE_TOLERANCE)
        out.append(target_shape(shape, sp, target.tolist()) if resample else [int(n) for n in shape])
    return out


def _normalization(channel_names: list[str], stats: list[dict], nonzero_mask: bool,
                   window: dict | None) -> tuple[list[dict], str]:
    kinds = [modality(n) for n in channel_names]
    # noNorm channels (e.g. a cascade's prior maps) are not intensities: the rules look past them
    image_kinds = [k for k in kinds if k != "none"]
    rgb = len(image_kinds) == 3 and all(k == "rgb" for k in image_kinds)
    out = []
    for kind, st in zip(kinds, stats, strict=True):
        if rgb and kind == "rgb":
            out.append({"scheme": "rgb", "mean": st["mean"] / 255.0, "std": max(st["std"] / 255.0, 1e-3)})
        elif window is not None and (kind == "ct" or (kind != "none" and "ct" not in kinds
                                                      and len(image_kinds) == 1)):
            out.append(dict(window))
        elif kind == "ct":
            out.append({"scheme": "ct", "lower": st["p00_5"], "upper": st["p99_5"],
                        "mean": st["mean"], "std": max(st["std"], 1e-3)})
        elif kind == "none":
            out.append({"scheme": "none"})
        else:
            out.append({"scheme": "zscore", "nonzero_mask": True} if nonzero_mask else {"scheme": "zscore"})
    why = []
    if rgb:
        why.append("RGB channels: /255, then standardised with the dataset's per-channel statistics")
    if any(o["scheme"] == "window" for o in out):
        why.append(f"HU window [{window['lower']:g}, {window['upper']:g}] "  # type: ignore[index]
                   "(clipped, then scaled to [0, 1])")
    if any(o["scheme"] == "ct" for o in out):
        why.append("CT: clipped to the foreground 0.5-99.5 percentiles, z-scored with foreground statistics")
    if any(o["scheme"] == "zscore" for o in out):
        why.append("z-score per image (MR and other non-quantitative intensities)"
                   + (", inside the non-zero region (cropping removed >= 25 % of the median case)"
                      if nonzero_mask else ""))
    if any(o["scheme"] == "none" for o in out):
        why.append("noNorm channels unchanged")
    return out, "; ".join(why)


def _ct_window(ct_window: str | None, window: tuple[float, float] | None) -> dict | None:
    if ct_window is not None and window is not None:
        raise InputError("give either a named CT window or an explicit window, not both",
                         fix="drop --ct-window or --window")
    if ct_window is not None:
        key = ct_window.strip().lower()
        if key not in CT_WINDOWS:
            raise InputError(f"unknown CT window '{ct_window}'",
                             fix=f"use one of {', '.join(CT_WINDOWS)} or --window LEVEL,WIDTH")
        return window_scheme(*CT_WINDOWS[key])
    if window is not None:
        try:
            level, width = (float(v) for v in window)
        except (TypeError, ValueError) as exc:
            raise InputError(f"window must be two numbers (level, width), got {window!r}",
                             fix="e.g. --window 40,400") from exc
        if not width > 0:
            raise InputError(f"window width must be positive, got {width:g}", fix="e.g. --window 40,400")
        return window_scheme(level, width)
    return None


def _budgets(dim: int, device_memory_gb: float | None) -> tuple[int, int, int, str]:
    """(max patch voxels, voxels per step, max batch, why) for a CPU or a GPU of that memory."""
    if device_memory_gb is None:
        return MAX_PATCH_VOXELS[dim], VOXELS_PER_STEP[dim], MAX_BATCH, "for CPU speed"
    if not device_memory_gb > 0:
        raise InputError(f"device memory must be positive, got {device_memory_gb}")
    f = device_memory_gb / GPU_REFERENCE_GB
    patch = int(GPU_PATCH_VOXELS[dim] * min(1.0, math.sqrt(f)))
    step = int(GPU_VOXELS_PER_STEP[dim] * f)
    return patch, step, GPU_MAX_BATCH, f"for a GPU with {device_memory_gb:g} GB"


def _patch_and_strides(median_shape: Sequence[int], spacing: Sequence[float], dim: int,
                       max_levels: int, budget: int) -> tuple[list[int], list[list[int]]]:
    """Largest patch (in physical proportions of the data) within the voxel budget, and strides."""
    shape = np.array(median_shape, dtype=float)
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


def default_tta(dim: int, configuration: str) -> str:
    """The test-time augmentation ``predict --tta auto`` uses: ``flip`` for 3D models, where a
    volume's eight mirrored passes still run in seconds on a CPU, ``none`` for 2D ones."""
    return "flip" if dim == 3 and configuration == "3d" else "none"


def default_training(dim: int, patch: Sequence[int]) -> dict:
    """The measured training defaults (loss, AdamW + cosine, EMA, early stopping, sampling,
    augmentation for ``dim``-D patches): every plan starts from them, imported ones included."""
    return {
        "loss": "dice_ce",
        "loss_options": {},
        "optimizer": "adamw",
        "schedule": "cosine",
        "lr": 3e-3,
        "min_lr": 1e-6,
        "weight_decay": 1e-4,
        "warmup_fraction": 0.02,
        "grad_clip": 12.0,
        "ema": 0.99,
        "ema_every": 4,
        "patience": 15,
        "patience_after": 0.5,
        "patience_smoothing": 0.3,
        "min_delta": 0.0,
        "iterations_per_epoch": 100,
        "epochs": 50,
        "fg_oversample": 1 / 3,
        "val_fraction": 0.2,
        "val_time_share": 0.15,
        "val_min_cases": 5,
        "augment": default_augmentation(dim, list(patch)),
    }


def make_plan(dataset: Dataset, fingerprint: dict, preset: str = "default", *, config: str = "auto",
              device_memory_gb: float | None = None, ct_window: str | None = None,
              window: tuple[float, float] | None = None, spacing: Sequence[float] | None = None,
              resolution_factor: float | None = None) -> Plan:
    """Derive the plan from the fingerprint with explained rules (see the module docstring).

    Args:
        dataset: the dataset (names, labels).
        fingerprint: :func:`fingerprint_dataset`'s output.
        preset: network preset (``default``, ``classic``, ``large``).
        config: ``auto`` (``3d`` for 3D data, ``2d`` for 2D), ``2d`` or ``3d``; ``2d`` on 3D
            data needs thick slices (``plan.configurations`` lists what is offered).
        device_memory_gb: None plans for a CPU (a time budget per step); a GPU's memory in GB
            plans larger patches and batches for it.
        ct_window: a named HU window (``lung``, ``mediastinum``, ``abdomen``, ``bone``,
            ``brain``) for the CT channels (or the only channel) instead of the percentile clip.
        window: an explicit ``(level, width)`` HU window instead.
        spacing: the working spacing, chosen by the user (``--set spacing=...``); the patch,
            batch and network follow from it.
        resolution_factor: the coarsening factor of the working resolution instead of the one
            derived from the labels' scales (``--set resolution.factor=1``: the data's own).
    """
    from medunet.nets import PRESETS, encoder_receptive_field

    dim = len(fingerprint["median_shape"])
    if preset not in PRESETS:
        raise InputError(f"unknown network preset '{preset}'", fix=f"use one of {', '.join(PRESETS)}")
    if config not in CONFIGS:
        raise InputError(f"unknown configuration '{config}'", fix=f"use one of {', '.join(CONFIGS)}")
    win = _ct_window(ct_window, window)
    kinds = [modality(n) for n in dataset.channel_names]
    if win is not None and "ct" not in kinds and len([k for k in kinds if k != "none"]) != 1:
        raise InputError(f"a CT window needs a CT channel; channels are {', '.join(dataset.channel_names)}",
                         dataset.root / "dataset.json", "name the CT channel 'CT' in channel_names")
    reasons: dict[str, str] = {"dim": f"{dim}D data"}

    # spacing, cropping
    target, thick, reasons["spacing"] = _target_spacing(fingerprint, dim)
    kept = fingerprint.get("crop_kept") or [1.0]
    removed = 1.0 - float(np.median(kept))
    crop = removed >= CROP_MIN_REMOVED - 1e-9
    nonzero_norm = removed >= NONZERO_NORM_MIN_REMOVED - 1e-9
    reasons["preprocessing.crop_nonzero"] = (
        f"cropping to the non-zero region removes {100 * removed:.0f} % of the median case "
        + (f"(>= {100 * CROP_MIN_REMOVED:.0f} %)" if crop
           else f"(< {100 * CROP_MIN_REMOVED:.0f} %: nothing to gain)"))

    # configuration
    ratio = float(target.max() / target.min())
    offered = ["2d"] if dim == 2 else (["3d", "2d"] if ratio > ANISOTROPY else ["3d"])
    chosen = offered[0] if config in ("auto", "cascade") else config
    if chosen not in offered:
        fix = f"use --config {' or '.join(offered)}" if dim == 3 else "2D data has only the 2d configuration"
        raise InputError(f"configuration '{config}' is not offered for this dataset "
                         f"(offered: {', '.join(offered)})", dataset.root, fix)
    if dim == 2:
        reasons["configuration"] = "2D data"
    elif len(offered) > 1:
        reasons["configuration"] = (
            f"3D data with thick slices (target spacing {_fmt(target)}, max/min {ratio:.1f} > "
            f"{ANISOTROPY:g}) offers '3d' and '2d' (a 2D U-Net slice by slice: one-slice patches, "
            f"[1, 3, 3] kernels); '{chosen}' "
            + ("chosen by default; pick the other with config='2d' (--config 2d)" if config == "auto"
               else "chosen by the user"))
    else:
        reasons["configuration"] = "3D data"
    slice_axis = int(np.argmax(target)) if (dim == 3 and chosen == "2d") else None
    pdim = 2 if slice_axis is not None else dim
    max_voxels, step_voxels, max_batch, device_why = _budgets(pdim, device_memory_gb)

    # working resolution: coarser than the data where large objects need context (planning.scale)
    target, resolution, reasons["resolution"] = _working_resolution(
        fingerprint, dim, target, thick, slice_axis, crop, max_voxels, dataset.label_names,
        spacing, resolution_factor,
        encoder_receptive_field(len(PRESETS[preset]["features"]) - 1, PRESETS[preset]["n_convs"]))

    if resolution.get("conflict") and resolution.get("set_by") != "user":
        offered = [*offered, "cascade"]
        reasons["configuration"] += (
            f"; 'cascade' offered: a U-Net at {resolution['lowres_factor']:g}x coarser for the large "
            f"objects, then one at {resolution['factor']:g}x that refines its prediction")
    if config == "cascade" and "cascade" not in offered:
        raise InputError("configuration 'cascade' is not offered for this dataset (one working resolution "
                         "serves all its classes)", dataset.root, f"use --config {offered[0]} or auto")
    if resolution.get("factor") not in (None, 1.0):
        reasons["spacing"] += f"; x{resolution['factor']:g} on axes {resolution['axes']} (see resolution)"
    elif resolution.get("set_by") == "user":
        reasons["spacing"] = "set by the user"

    # resampling
    off = sum(needs_resampling(sp, target.tolist(), RESAMPLE_TOLERANCE) for sp in fingerprint["spacings"])
    resample = off > 0
    preprocessing = {"crop_nonzero": bool(crop), "resample": bool(resample), "image_order": 3,
                     "label_mode": "nearest", "separate_z": thick,
                     "image_size": fingerprint.get("image_size")}
    reasons["preprocessing.image_size"] = fingerprint.get("image_size_why") or "not measured"
    reasons["preprocessing.resample"] = (
        f"{off} of {len(fingerprint['spacings'])} cases differ from the target spacing by > 1 %"
        if resample else "every case is at the target spacing (within 1 %)")
    reasons["preprocessing.separate_z"] = (
        f"anisotropic: axis {thick} is resampled on its own (nearest/linear across slices)"
        if thick is not None else "not anisotropic")
    reasons["preprocessing.image_order"] = "cubic spline for images, nearest neighbour for labels"
    shapes = _shape_after(fingerprint, dim, target, crop)
    median_shape = np.median(np.array(shapes), axis=0).astype(int).tolist()

    # patch, strides, kernels, batch
    net = dict(PRESETS[preset])
    # depth: the preset's. A deeper encoder whose receptive field covered BUSI's lesions (5
    # down-samplings, 284 voxels) scored lower on its test set, 0.693 vs 0.714 (BENCHMARKS.md)
    max_levels = len(net["features"]) - 1
    if slice_axis is None:
        fit_shape = median_shape
        patch, strides = _patch_and_strides(median_shape, target, dim, max_levels, max_voxels)
        kernels = [[3] * dim for _ in range(len(strides) + 1)]
    else:
        axes = [a for a in range(dim) if a != slice_axis]
        fit_shape = [median_shape[a] for a in axes]
        p2, s2 = _patch_and_strides(fit_shape, [target[a] for a in axes], 2, max_levels, max_voxels)
        patch = list(p2)
        patch.insert(slice_axis, 1)
        strides = [s[:slice_axis] + [1] + s[slice_axis:] for s in s2]
        kernels = [[1 if a == slice_axis else 3 for a in range(dim)] for _ in range(len(s2) + 1)]
    net["features"] = net["features"][: len(strides) + 1]
    net["strides"] = strides
    net["kernel_sizes"] = kernels
    net["preset"] = preset
    net["arch"] = "unet"  # a variant by name: medunet train --arch / --set network.arch (medunet archs)
    # Why only volumes: with a 30-minute budget on Left Atrium, supervising every decoder level
    # raised the test Dice from 0.902 to 0.905 and the best validation Dice from 0.907 to 0.914,
    # at the same step speed (BENCHMARKS.md); the 2D configurations meet their targets without it.
    net["deep_supervision"] = pdim == 3
    batch = int(min(max_batch, max(2, step_voxels // int(np.prod(patch)))))
    batch_why = f"{step_voxels} voxels per step / patch voxels, within [2, {max_batch}] {device_why}"
    if device_memory_gb is not None:
        cap = int(GPU_MAX_DATASET_SHARE * sum(int(np.prod(s)) for s in shapes) // int(np.prod(patch)))
        if cap < batch:
            batch = max(2, cap)
            batch_why += f"; at most {100 * GPU_MAX_DATASET_SHARE:g} % of the dataset's voxels per batch"
    fits = int(np.prod(fit_shape)) <= max_voxels
    reasons["patch_size"] = (
        (f"the median case {fit_shape} (after cropping and resampling) fits within {max_voxels} voxels"
         if fits else f"the median case {fit_shape} (after cropping and resampling) shrunk (longest "
         f"physical axis first) to at most {max_voxels} voxels {device_why}")
        + ", rounded to multiples of the down-sampling factor"
        + ("; one slice thick (2d configuration)" if slice_axis is not None else ""))
    reasons["batch_size"] = batch_why
    reasons["network"] = (f"preset '{preset}'; {len(strides)} down-samplings, an axis pools while its "
                          "edge stays >= 4"
                          + (f"; kernels and strides 1 on the slice axis {slice_axis}"
                             if slice_axis is not None else "")
                          + ("; deep supervision (a loss at every decoder level, weights halving) for "
                             "volume patches" if pdim == 3 else ""))

    norm, reasons["normalization"] = _normalization(dataset.channel_names, fingerprint["intensity"],
                                                    nonzero_norm, win)
    fg_fraction = 1.0 - fingerprint["class_fraction"][0]
    training = default_training(dim, patch)
    reasons["training.fg_oversample"] = (f"share of patches centred on foreground (foreground: "
                                         f"{100 * fg_fraction:.1f}% of the voxels)")
    inference = {"overlap": 0.5, "sigma_scale": 0.125, "tta": default_tta(dim, chosen)}
    reasons.update(value_reasons(training, inference))
    return Plan(
        dataset_name=dataset.name,
        dim=dim,
        in_channels=dataset.num_channels,
        channel_names=list(dataset.channel_names),
        label_names=list(dataset.label_names),
        label_values=[int(v) for v in dataset.label_values],
        spacing=[float(s) for s in target],
        median_shape=[int(s) for s in median_shape],
        normalization=norm,
        patch_size=[int(p) for p in patch],
        batch_size=batch,
        network=net,
        training=training,
        inference=inference,
        reasons=reasons,
        preprocessing=preprocessing,
        configuration=chosen,
        configurations=offered,
        resolution=resolution,
    )
