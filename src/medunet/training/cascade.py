"""A two-stage cascade for datasets that one working resolution cannot serve.

:mod:`medunet.planning.scale` reports a conflict when large objects need a coarse grid to be
seen with their surroundings while a thin class needs the fine one. Then:

1. **lowres** trains at the coarse resolution the large objects ask for
   (``plan.resolution.lowres_factor``), an ordinary run in ``MODEL/lowres/``.
2. It predicts every training case on the case's own grid. The predictions become one 0/1
   map per foreground class, written as extra ``noNorm`` channel files of a derived dataset
   (``MODEL/fullres_data/``: links to the original images and labels, plus the maps).
3. **fullres** trains on that dataset at the resolution the thin structures allow
   (``plan.resolution.factor``), an ordinary run in ``MODEL/fullres/``, with the same split.
   Its training cases carry stage 1's predictions of cases stage 1 learned from (better
   than on new cases: nnU-Net uses cross-validation predictions for this; a time budget on a
   CPU does not allow five extra trainings), its validation cases honest ones.
4. Both the cascade and lowres alone predict the validation cases, scored against the raw
   labels on their own grid; ``plan.cascade.use`` keeps the better, ``cascade.json`` says by
   how much. :class:`medunet.inference.predictor.CascadePredictor` predicts with it.

A time budget is shared: stage 1 gets :data:`LOWRES_SHARE` of it, stage 2 what is left after
the priors are written.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medunet.datasets import Dataset, find_dataset, load_case
from medunet.errors import InputError
from medunet.evaluation.metrics import class_counts, pooled_dice
from medunet.files import publish
from medunet.io import split_suffix, write_image
from medunet.planning import Plan
from medunet.training.callbacks import write_json

LOWRES_SHARE = 0.45  # of a time budget: the coarse stage converges faster on its smaller images
MIN_BUDGET_SECONDS = 600.0  # below this an automatic choice keeps one stage (each would get too little)
PRIOR_CHANNEL = "noNorm"  # the prior maps are 0/1 and must not be normalised


def wants_cascade(plan: Plan, config: str, budget: float | None) -> bool:
    """Whether ``train`` should run a cascade: asked for, or offered by the plan (a resolution
    conflict) with enough budget for two stages."""
    if config == "cascade":
        return True
    offered = "cascade" in plan.configurations
    return config == "auto" and offered and (budget is None or budget >= MIN_BUDGET_SECONDS)


def train_cascade(data: str | Path, model_dir: str | Path, plan: Plan, *, epochs: int | None,
                  budget: float | None, resume: bool, seed: int, preset: str, overrides: dict | None,
                  plan_options: dict, train: Callable[..., Any], **train_kwargs) -> Any:
    """Train both stages into ``model_dir`` and choose between cascade and stage 1 alone.

    ``plan`` is the planner's (base) plan of the dataset; ``train`` trains one stage (the
    trainer passes :func:`medunet.training.train`, which calls this function in turn), with
    ``train_kwargs`` (device, precision, progress, report, ...). Returns the final stage's
    :class:`TrainResult`.
    """
    root = Path(model_dir)
    if not resume and (root / "plan.json").is_file():
        raise InputError("the model directory already holds a run", root,
                         "add --resume to continue or extend it, or choose another -o")
    lo_f, hi_f = plan.resolution.get("lowres_factor"), plan.resolution.get("factor")
    if not lo_f or not hi_f or lo_f <= hi_f:
        raise InputError("configuration 'cascade' is not offered for this dataset (one working "
                         "resolution serves all its classes)", Path(data), "use --config auto")
    t0 = time.perf_counter()
    base = {**(overrides or {})}
    options = {**plan_options, "config": plan.configuration}
    stage = dict(epochs=epochs, seed=seed, preset=preset, plan_options=options, **train_kwargs)
    root.mkdir(parents=True, exist_ok=True)
    top = Plan.from_dict({**plan.to_dict(), "configuration": "cascade",
                          "cascade": {"stages": {"lowres": "lowres", "fullres": "fullres"}, "use": "cascade",
                                      "factors": {"lowres": lo_f, "fullres": hi_f}}})
    top.save(root / "plan.json")

    lo_dir, hi_dir, data_dir = root / "lowres", root / "fullres", root / "fullres_data"
    lo_budget = None if budget is None else LOWRES_SHARE * budget
    train(data, lo_dir, time_budget=lo_budget, resume=resume and (lo_dir / "checkpoint_last.pt").is_file(),
          overrides={**base, "resolution.factor": lo_f}, **stage)
    dataset = find_dataset(data)
    derived = write_prior_dataset(dataset, lo_dir, data_dir, stage.get("device"), stage.get("precision"))
    hi_budget = None if budget is None else max(60.0, budget - (time.perf_counter() - t0))
    result = train(derived, hi_dir, time_budget=hi_budget,
                   resume=resume and (hi_dir / "checkpoint_last.pt").is_file(),
                   overrides={**base, "resolution.factor": hi_f}, **stage)
    choice = compare_on_validation(root, dataset, stage.get("device"), stage.get("precision"))
    top.cascade["use"] = choice["use"]
    top.cascade["validation"] = {k: v for k, v in choice.items() if k != "cases"}
    top.save(root / "plan.json")
    write_json(root / "cascade.json", choice)
    shutil.copyfile(lo_dir / "splits.json", root / "splits.json")
    return result


def write_prior_dataset(dataset: Dataset, lowres_dir: Path, out: Path, device: str | None = None,
                        precision: str | None = None) -> Path:
    """The derived dataset stage 2 trains on: links to every training case's files plus one
    0/1 channel file per foreground class of stage 1's prediction (on the case's grid)."""
    from medunet.inference import Predictor

    predictor = Predictor.load(lowres_dir, device=device, precision=precision)
    k = dataset.num_classes
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir(parents=True)
    for case in dataset.train:
        image, _, geom = load_case(case, dataset)
        spacing = geom.spacing[-(image.ndim - 1):]
        idx, _ = predictor._predict_indices(image, "none", False, spacing)
        idx = np.asarray(idx)
        for c, path in enumerate(case.image_paths):
            _link(path, tmp / "imagesTr" / f"{case.case_id}_{c:04d}{split_suffix(path)[1]}")
        first = len(case.image_paths)
        _, suffix = split_suffix(case.image_paths[0])
        suffix = ".png" if suffix.lower() in (".jpg", ".jpeg") else suffix  # 0/1 maps must stay exact
        for cls in range(1, k):
            name = f"{case.case_id}_{first + cls - 1:04d}{suffix}"
            write_image(tmp / "imagesTr" / name, (idx == cls).astype(np.uint8), geom)
        if case.label_path is not None:
            _link(case.label_path, tmp / "labelsTr" / f"{case.case_id}{split_suffix(case.label_path)[1]}")
    channels = list(dataset.channel_names) + [PRIOR_CHANNEL] * (k - 1)
    meta = {"name": f"{dataset.name}_cascade", "channel_names": {str(i): n for i, n in enumerate(channels)},
            "labels": dict(zip(dataset.label_names, (int(v) for v in dataset.label_values), strict=True)),
            "numTraining": len(dataset.train),
            "description": f"images of {dataset.root} with stage 1's predictions as channels"}
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    publish(tmp, out)
    return out


def _link(src: Path, dst: Path) -> None:
    """A symbolic link to the original file (a copy where links are not allowed)."""
    try:
        dst.symlink_to(Path(src).resolve())
    except OSError:
        shutil.copyfile(src, dst)


def compare_on_validation(root: Path, dataset: Dataset, device: str | None = None,
                          precision: str | None = None) -> dict:
    """Pooled Dice per foreground class of the cascade and of stage 1 alone on the validation
    cases, each predicted on the case's own grid; the cascade is kept unless it is worse."""
    from medunet.inference import Predictor
    from medunet.inference.predictor import CascadePredictor

    val = json.loads((root / "lowres" / "splits.json").read_text())["val"]
    by_id = {c.case_id: c for c in dataset.train}
    lowres = Predictor.load(root / "lowres", device=device, precision=precision)
    cascade = CascadePredictor(Plan.load(root), lowres,
                               Predictor.load(root / "fullres", device=device, precision=precision))
    k = dataset.num_classes
    counts = {"lowres": np.zeros((3, k)), "cascade": np.zeros((3, k))}
    for cid in val:
        image, label, geom = load_case(by_id[cid], dataset)
        spacing = geom.spacing[-(image.ndim - 1):]
        for name, pred in (("lowres", lowres), ("cascade", cascade)):
            labels, _ = pred.predict_array(image, probabilities=False, spacing=spacing)
            counts[name] += class_counts(np.searchsorted(np.asarray(dataset.label_values), labels), label, k)
    dice = {name: pooled_dice(c) for name, c in counts.items()}
    mean = {name: float(np.mean(d)) for name, d in dice.items()}
    use = "cascade" if mean["cascade"] >= mean["lowres"] else "lowres"
    return {"use": use, "dice_mean": mean, "dice_per_class": dice, "cases": val,
            "why": f"validation Dice (pooled, on each case's own grid): cascade {mean['cascade']:.4f}, "
                   f"lowres alone {mean['lowres']:.4f}"}

