"""Supervised training: the set-up of a run (plan, split, cached data, network) and its end
(validation report, cross-validation post-processing).

``train()`` is what ``medunet train`` calls. It builds a
:class:`~medunet.training.loop.SupervisedMode` and runs it on the one
:class:`~medunet.training.loop.Loop`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import medunet.training.distributed as distributed
from medunet.augment import validate_augmentation
from medunet.datasets import Case, Dataset, check_unlabeled, find_dataset, find_unlabeled, validate_dataset
from medunet.errors import InputError
from medunet.files import exclusive_lock
from medunet.modeldir import is_cascade
from medunet.planning import Plan, prepare_plan
from medunet.planning.plan import value_reasons
from medunet.preprocessing.cache import preprocess_dataset
from medunet.runtime import float_mode_kept, flush_denormals, memory_format, resolve_device, resolve_precision
from medunet.training.callbacks import write_json
from medunet.training.cascade import train_cascade, wants_cascade
from medunet.training.loop import Loop, SupervisedMode, ValidationSet, parse_duration, validate_patience
from medunet.training.losses import build_loss
from medunet.training.optim import ModelEMA, build_optimizer, validate_ema
from medunet.training.sampler import PatchSampler
from medunet.training.semi import build_semi_mode, semi_reason, semi_settings, unlabeled_source


@dataclass
class TrainResult:
    """What a finished run reports."""

    model_dir: Path
    best_dice: float
    epochs: int
    iterations: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    served: str = ""  # what checkpoint_best.pt holds ("last weights, epoch 34"); "": no validation

    @property
    def summary(self) -> str:
        """One line for people: the validation score of the weights the model directory serves."""
        which = f" ({self.served})" if self.served else ""
        return f"validation Dice {self.best_dice:.4f}{which} after {self.epochs} epochs"


def _served(choice: dict | None) -> str:
    """:meth:`Loop.final_choice`'s choice in words ("" when the run had no validation cases)."""
    if choice is None:
        return ""
    epoch = choice["best_epoch"] if choice["chosen"] == "best" else choice["last_epoch"]
    return f"{choice['chosen']} weights, epoch {epoch}"


def _split(model_dir: Path, cases: list[Case], val_fraction: float, seed: int) -> dict:
    """A fixed train/validation split, written once to ``splits.json`` and reused on resume."""
    path = model_dir / "splits.json"
    if path.is_file():
        split = json.loads(path.read_text())
        _check_known(split["train"] + split["val"], cases, path)
        return split
    ids = sorted(c.case_id for c in cases)
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    split = {"seed": seed, "val": sorted(ids[:n_val]), "train": sorted(ids[n_val:]), "data": data_root(cases)}
    if not split["val"]:  # a single case: validate on it (the user sees it in splits.json)
        split["val"] = list(split["train"])
    write_json(path, split)
    return split


def data_root(cases: list[Case]) -> str | None:
    """The dataset folder, recorded in ``splits.json`` so ``distill`` can find the data again."""
    if not cases:
        return None
    label = cases[0].label_path or cases[0].image_paths[0]
    return str(label.resolve().parent.parent)


def _check_known(ids: list[str], cases: list[Case], path: Path) -> None:
    known = {c.case_id for c in cases}
    missing = [c for c in ids if c not in known]
    if missing:
        raise InputError(f"splits.json names cases that are not in the dataset: {missing[:3]}", path,
                         "restore the missing cases or delete splits.json to draw new folds")


def cv_folds(model_dir: Path, cases: list[Case], n_folds: int, seed: int) -> dict:
    """``n_folds`` cross-validation folds, drawn once (seeded) and kept in ``splits.json`` of the
    parent model directory; every ``fold_k/`` then trains on the same partition."""
    path = model_dir / "splits.json"
    if path.is_file():
        folds = json.loads(path.read_text())
        if "folds" not in folds:
            raise InputError("splits.json holds a single split, not folds", path,
                             "train folds into a new model directory")
        _check_known([i for f in folds["folds"] for i in f["val"]], cases, path)
        return folds
    if n_folds < 2 or n_folds > len(cases):
        raise InputError(f"cannot make {n_folds} folds from {len(cases)} cases",
                         fix="use --folds between 2 and the number of training cases")
    ids = sorted(c.case_id for c in cases)
    np.random.default_rng(seed).shuffle(ids)
    parts = [sorted(ids[k::n_folds]) for k in range(n_folds)]
    folds = {"seed": seed, "n_folds": n_folds, "folds": [
        {"train": sorted(i for j, p in enumerate(parts) if j != k for i in p), "val": parts[k]}
        for k in range(n_folds)]}
    model_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, folds)
    return folds


def _fold_split(parent: Path, run_dir: Path, cases: list[Case], fold: int | str, n_folds: int,
                seed: int) -> dict:
    """The split of one fold (``all``: train and validate on every case, as nnU-Net does),
    also written as the fold directory's own ``splits.json`` so it is self-describing."""
    path = run_dir / "splits.json"
    if path.is_file():
        return _split(run_dir, cases, 0.0, seed)
    if fold == "all":
        ids = sorted(c.case_id for c in cases)
        split = {"seed": seed, "fold": "all", "train": ids, "val": ids, "data": data_root(cases)}
    else:
        folds = cv_folds(parent, cases, n_folds, seed)
        if not 0 <= int(fold) < len(folds["folds"]):
            raise InputError(f"fold {fold} does not exist ({len(folds['folds'])} folds)",
                             parent / "splits.json", f"use --fold 0..{len(folds['folds']) - 1} or all")
        split = {"seed": folds["seed"], "fold": int(fold), **folds["folds"][int(fold)],
                 "data": data_root(cases)}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, split)
    return split


def _load(dataset: Dataset, plan: Plan, cache_dir: Path, split: dict, progress: bool,
          ) -> tuple[tuple[list[np.ndarray], list[np.ndarray]], tuple[list[np.ndarray], list[np.ndarray]]]:
    """Preprocess (crop, resample, normalise) into the ``.npy`` cache, reusing cases whose source
    and plan did not change, and open them memory-mapped: training never holds every case."""
    ids = list(dict.fromkeys(split["train"] + split["val"]))
    cached = preprocess_dataset(dataset, plan, cache_dir, case_ids=ids, workers=min(2, os.cpu_count() or 1),
                                progress=progress)

    def arrays(which: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        pairs = [cached[i].load() for i in which]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    return arrays(split["train"]), arrays(split["val"])


def _parse_fold(fold: int | str | None) -> int | str | None:
    if fold is None or isinstance(fold, int):
        return fold
    if str(fold).strip().lower() == "all":
        return "all"
    if str(fold).strip().isdigit():
        return int(fold)
    raise InputError(f"cannot read the fold '{fold}'", fix="use a number (0, 1, ...) or all")


def _one_run_per_dir(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Hold ``RUN_DIR/.train.lock`` while ``train`` runs: a second run into the same directory
    (``-o`` and fold) would interleave checkpoints and logs, so it is refused. A crashed run's
    lock is free (flock ends with its process). Under torch.distributed rank 0 holds it."""

    @functools.wraps(fn)
    def locked(data: str | Path, model_dir: str | Path, **kwargs) -> TrainResult:
        if not distributed.from_environment().main:
            with float_mode_kept():
                return fn(data, model_dir, **kwargs)
        fold = _parse_fold(kwargs.get("fold"))
        run_dir = Path(model_dir) if fold is None else Path(model_dir) / f"fold_{fold}"
        with exclusive_lock(run_dir / ".train.lock", "another training run is writing to this directory",
                            "wait for it to finish, or choose another -o"), float_mode_kept():
            return fn(data, model_dir, **kwargs)

    return locked


@_one_run_per_dir
def train(data: str | Path, model_dir: str | Path, *, epochs: int | None = None,
          time_budget: str | float | None = None, resume: bool = False, device: str | None = None,
          precision: str | None = None, seed: int = 0, preset: str = "default",
          overrides: dict | None = None, progress: bool = True, report: bool = True,
          fold: int | str | None = None, n_folds: int = 5, tensorboard: bool = False,
          compile: bool = False, plan_options: dict | None = None,
          unlabeled: str | Path | bool | None = None, semi: str | None = None,
          pseudo_threshold: float | None = None) -> TrainResult:
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
        fold: train one cross-validation fold (``0..n_folds-1``) or ``"all"`` into
            ``model_dir/fold_<k>/``; the folds are kept in ``model_dir/splits.json`` and the
            shared plan in ``model_dir/plan.json``. ``None``: one 80/20 split in ``model_dir``.
        tensorboard: also write TensorBoard event files into ``tensorboard/``.
        compile: ``torch.compile`` the training network (faster steps after 20-60 s of
            compilation; validation and checkpoints use the plain network).
        plan_options: passed to ``make_plan`` (``config``, ``ct_window``, ``window``).
        unlabeled: semi-supervised training (:mod:`medunet.training.semi`) with unlabelled
            images: a folder laid out like the training images, or ``True`` for the training
            images that have no label. A resumed run reuses the recorded ones.
        semi: the method (``mean-teacher`` default, ``uamt``, ``cps``, ``bcp``, ``pseudo``);
            the other settings are the plan's ``training.semi``.
        pseudo_threshold: ``pseudo``: the probability above which a prediction is a target.
    """
    parent = Path(model_dir)
    fold = _parse_fold(fold)
    run_dir = parent if fold is None else parent / f"fold_{fold}"
    last = run_dir / "checkpoint_last.pt"
    if not resume and last.is_file():
        raise InputError("the model directory already holds a run", run_dir,
                         "add --resume to continue or extend it, or choose another -o")
    budget = parse_duration(time_budget) if time_budget is not None else None
    dist = distributed.setup(resolve_device(device))
    return _train(data, parent, run_dir, fold, dist, epochs=epochs, budget=budget, resume=resume,
                  device=device, precision=precision, seed=seed, preset=preset, overrides=overrides,
                  progress=progress, report=report, n_folds=n_folds, tensorboard=tensorboard,
                  compile=compile, plan_options=plan_options, unlabeled=unlabeled, semi=semi,
                  pseudo_threshold=pseudo_threshold)


def _train(data: str | Path, parent: Path, run_dir: Path, fold: int | str | None, dist: distributed.Dist, *,
           epochs: int | None, budget: float | None, resume: bool, device: str | None, precision: str | None,
           seed: int, preset: str, overrides: dict | None, progress: bool, report: bool, n_folds: int,
           tensorboard: bool, compile: bool, plan_options: dict | None,
           unlabeled: str | Path | bool | None = None, semi: str | None = None,
           pseudo_threshold: float | None = None) -> TrainResult:
    """:func:`train` once its arguments are read, on this process's rank."""
    last = run_dir / "checkpoint_last.pt"
    unlabeled = _unlabeled_request(run_dir, resume, unlabeled, semi, pseudo_threshold)
    dev = distributed.device_for(dist, resolve_device(device))
    flush_denormals(dev)
    prec = resolve_precision(precision, dev)
    opts = dict(plan_options or {})
    if dev.type == "cuda":  # plan the patch and batch for this GPU's memory
        opts.setdefault("device_memory_gb", torch.cuda.get_device_properties(dev).total_memory / 2**30)
    if unlabeled is not None and (dist.active or opts.get("config") == "cascade" or is_cascade(run_dir)):
        raise InputError("semi-supervised training runs one network in one process", run_dir,
                         "drop --nproc (torchrun) and --config cascade when training with --unlabeled")
    if dist.active and (is_cascade(run_dir) or opts.get("config") == "cascade"):
        raise InputError("a cascade trains in one process", run_dir,
                         "drop --nproc (or torchrun), or choose --config 2d or 3d")
    if fold is None and is_cascade(run_dir):  # a cascade resumes as one
        plan = Plan.load(run_dir)
        return train_cascade(data, run_dir, plan, epochs=epochs, budget=budget, resume=resume, seed=seed,
                             preset=preset, overrides=overrides, plan_options=opts, device=device,
                             precision=precision, progress=progress, report=report, tensorboard=tensorboard,
                             compile=compile, train=train)
    if resume and not last.is_file():
        raise InputError("nothing to resume: no checkpoint_last.pt", run_dir, "run without --resume")
    in_train = unlabeled is True
    dataset, plan, unl = _run_plan(data, parent, run_dir, resume, fold is not None, preset, overrides, opts,
                                   write=dist.main, unlabeled_in_train=in_train)
    settings, folder = None, None
    if unlabeled is not None:
        if resume:  # refused before anything is rewritten: the run keeps its own way of training
            _check_resumed_semi(run_dir, semi)
        folder = None if in_train else Path(unlabeled)
        if unl is None:
            unl = find_unlabeled(dataset, folder)
        check_unlabeled(unl, plan.in_channels, plan.dim)
        settings = semi_settings(plan.training.get("semi"), semi, pseudo_threshold)
        if pseudo_threshold is not None and settings["method"] != "pseudo":
            raise InputError(f"--pseudo-threshold is for --semi pseudo, not {settings['method']}",
                             fix="drop --pseudo-threshold or use --semi pseudo")
        plan.training["semi"] = settings
        plan.reasons["training.semi"] = semi_reason(settings, len(unl), unlabeled_source(folder))
    if fold is None and not resume and settings is None and wants_cascade(plan, opts.get("config", "auto"),
                                                                          budget):
        return train_cascade(data, run_dir, plan, epochs=epochs, budget=budget, resume=False, seed=seed,
                             preset=preset, overrides=overrides, plan_options=opts, device=device,
                             precision=precision, progress=progress, report=report, tensorboard=tensorboard,
                             compile=compile, train=train)
    validate_augmentation(plan.training.get("augment"))  # a bad --set fails before data loads
    if plan.training.get("ema"):
        validate_ema(plan.training["ema"], plan.training.get("ema_every", 1))
    validate_patience(plan.training)

    def prepare() -> tuple[dict, tuple]:
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            plan.save(run_dir / "plan.json")
        if fold is None:
            split = _split(run_dir, dataset.train, plan.training.get("val_fraction", 0.2), seed)
        else:
            split = _fold_split(parent, run_dir, dataset.train, fold, n_folds, seed)
        if unl is not None:
            split = _record_unlabeled(run_dir, split, unl, folder)
        return split, _load(dataset, plan, parent / "preprocessed", split, progress and dist.main)

    # rank 0 writes the split and the cache; the other ranks then read them
    if dist.main:
        split, arrays = prepare()
    dist.barrier()
    if not dist.main:
        split, arrays = prepare()
    (tr_img, tr_lab), (val_img, val_lab) = arrays
    unl_img = _load_unlabeled(dataset, unl, plan, parent, progress) if unl is not None else []

    torch.manual_seed(seed)  # the same initial weights on every rank
    net = plan.build_network().to(dev).to(memory_format=memory_format(plan.dim))
    net = distributed.sync_batchnorm(net, dist, dev)
    t = plan.training
    own = distributed.rank_seed(seed, dist)  # each rank draws its own patches
    train_net = distributed.wrap(net, dist, dev)
    if settings is not None:
        mode = build_semi_mode(plan, net, torch.compile(train_net) if compile else train_net,
                               _loss(plan, net), (tr_img, tr_lab), unl_img, dev, prec, own, settings)
    else:
        mode = SupervisedMode(
            plan, net, build_optimizer(net, t, dense_views=not dist.active),
            torch.amp.GradScaler(dev.type, enabled=prec == "fp16"), _loss(plan, net),
            PatchSampler(tr_img, tr_lab, plan.patch_size, plan.batch_size, t["fg_oversample"],
                         np.random.default_rng(own)),
            torch.Generator().manual_seed(own), dev, prec,
            ema=ModelEMA(net, t["ema"], t.get("ema_every", 1)) if t.get("ema") else None,
            train_net=torch.compile(train_net) if compile else train_net)
    loop = Loop(mode, plan, run_dir, ValidationSet(val_img, val_lab), dev, prec, epochs=epochs, budget=budget,
                seed=seed, tensorboard=tensorboard, dist=dist)
    if settings is not None:
        mode.progress = loop.progress  # the ramp and the pseudo-label rounds follow the run
    if resume:
        loop.resume(last)
    where = f", {dist.world} processes (global batch {dist.world * plan.batch_size})" if dist.active else ""
    try:
        loop.run(f"training {plan.dim}D U-Net on {len(tr_img)} cases (val {len(val_img)}), patch "
                 f"{plan.patch_size} x batch {plan.batch_size}, {dev.type} {prec}{where}"
                 + (f", fold {fold}" if fold is not None else "")
                 + (f", semi-supervised {settings['method']} with {len(unl_img)} unlabelled cases"
                    if settings is not None else "")
                 + (f", budget {budget:.0f}s" if budget else f", {loop.epochs} epochs"), progress=progress)
    except (RuntimeError, torch.distributed.DistError) as exc:
        if not dist.active:
            raise
        raise InputError(f"rank {dist.rank} of {dist.world}: the distributed run failed "
                         f"({str(exc).splitlines()[0][:200]})", run_dir,
                         "a rank died or lost contact; see its output, then continue with --resume") from exc
    dist.barrier()
    if not dist.main:
        s = loop.state
        return TrainResult(run_dir, s.best_dice, s.epoch, s.iteration, loop.elapsed(), loop.history)
    if not last.is_file():
        raise InputError("the time budget ended before one epoch finished", run_dir,
                         "give a larger --time-budget")
    if report:
        validation_report(run_dir, dataset, split["val"], device=device, precision=precision)
    state = loop.state
    return TrainResult(run_dir, state.best_dice if math.isfinite(state.best_dice) else float("nan"),
                       state.epoch, state.iteration, loop.elapsed(), loop.history, _served(loop.selection))


def _loss(plan: Plan, net: torch.nn.Module) -> torch.nn.Module:
    """The plan's loss; with deep supervision it weighs every decoder head's output."""
    t = plan.training
    heads = len(net.heads) if getattr(net, "deep_supervision", False) else 0
    return build_loss(t["loss"], plan.num_classes, t.get("loss_options"), deep_supervision=heads)


def _run_plan(data: str | Path, parent: Path, run_dir: Path, resume: bool, folds: bool, preset: str,
              overrides: dict | None, plan_options: dict, write: bool = True,
              unlabeled_in_train: bool = False) -> tuple[Dataset, Plan, list[Case] | None]:
    """The run's plan: reloaded on resume; for folds, the parent's shared plan (made once and
    written there when ``write``). With ``unlabeled_in_train`` the training images without a
    label are taken out of the dataset first and returned as the unlabelled cases."""
    dataset = find_dataset(data)
    unl = find_unlabeled(dataset) if unlabeled_in_train else None
    if resume or (folds and (parent / "plan.json").is_file()):
        validate_dataset(dataset)
        plan = Plan.load(run_dir if resume else parent)
        return dataset, plan.override(overrides) if overrides else plan, unl
    dataset, plan = prepare_plan(dataset, preset, overrides, **plan_options)
    if folds and write:
        plan.save(parent / "plan.json")
    return dataset, plan, unl


def _unlabeled_request(run_dir: Path, resume: bool, unlabeled: str | Path | bool | None, semi: str | None,
                       pseudo_threshold: float | None) -> Path | bool | None:
    """The unlabelled data asked for: a folder, ``True`` (imagesTr's images without a label) or
    None; a resumed semi-supervised run reuses what its ``splits.json`` records. ``--semi`` or
    ``--pseudo-threshold`` without unlabelled data is an error."""
    if unlabeled is None and resume and (run_dir / "splits.json").is_file():
        recorded = json.loads((run_dir / "splits.json").read_text()).get("unlabeled")
        if recorded is not None:
            unlabeled = Path(recorded["folder"]) if recorded.get("folder") else True
    if unlabeled is None or unlabeled is False:
        if semi is not None or pseudo_threshold is not None:
            raise InputError(f"--{'semi' if semi is not None else 'pseudo-threshold'} needs unlabelled data",
                             fix="add --unlabeled DIR (images laid out like imagesTr), or --unlabeled alone "
                                 "for the images in imagesTr that have no label")
        return None
    if unlabeled is True or str(unlabeled) == "":
        return True
    return Path(unlabeled)


def _check_resumed_semi(run_dir: Path, semi: str | None) -> None:
    """A resumed run continues the way it was trained: unlabelled data only for a
    semi-supervised run, and with its own method."""
    recorded = Plan.load(run_dir).training.get("semi")
    if not recorded:
        raise InputError("the run in this directory was trained without unlabelled data", run_dir,
                         "resume it without --unlabeled and --semi, or train into another -o")
    method = recorded.get("method")
    if semi is not None and semi != method:
        raise InputError(f"the run in this directory was trained with --semi {method}", run_dir,
                         f"resume it with --semi {method} (or without --semi)")


def _record_unlabeled(run_dir: Path, split: dict, cases: list[Case], folder: Path | None) -> dict:
    """Name the unlabelled cases (and their folder; None: imagesTr) in ``splits.json``, so the
    run is described and a resume finds them again."""
    record = {"folder": str(folder.resolve()) if folder is not None else None,
              "cases": sorted(c.case_id for c in cases)}
    if split.get("unlabeled") != record:
        split = {**split, "unlabeled": record}
        write_json(run_dir / "splits.json", split)
    return split


def _load_unlabeled(dataset: Dataset, cases: list[Case], plan: Plan, parent: Path,
                    progress: bool) -> list[np.ndarray]:
    """Unlabelled images through the same preprocessing and cache as the labelled ones (crop,
    resample, normalise), in ``preprocessed/unlabeled/`` (their ids may repeat labelled ones)."""
    cached = preprocess_dataset(replace(dataset, train=list(cases), test=[]), plan,
                                parent / "preprocessed" / "unlabeled", workers=min(2, os.cpu_count() or 1),
                                progress=progress)
    return [cached[c.case_id].load()[0] for c in cases]


def train_folds(data: str | Path, model_dir: str | Path, n_folds: int = 5, *, resume: bool = False,
                report: bool = True, **kwargs) -> list[TrainResult]:
    """Train every fold into ``model_dir/fold_<k>/`` (one after the other), then choose the
    post-processing on the pooled out-of-fold predictions (cross-validation, like nnU-Net) and
    store it in ``model_dir/plan.json``, which the fold ensemble uses at inference."""
    parent = Path(model_dir)
    results = []
    for k in range(n_folds):
        done = (parent / f"fold_{k}" / "checkpoint_last.pt").is_file()
        if done and not resume:
            raise InputError("the model directory already holds folds", parent,
                             "add --resume to continue, or choose another -o")
        results.append(train(data, parent, fold=k, n_folds=n_folds, resume=done, report=report,
                             **kwargs))
    if report:
        choose_cv_postprocessing(parent, find_dataset(data))
    return results


def choose_cv_postprocessing(parent: Path, dataset: Dataset) -> dict:
    """Post-processing chosen on every fold's validation predictions together (before each
    fold's own choice was applied: those are kept in ``validation/raw/``)."""
    from medunet.inference import choose_postprocessing
    from medunet.io import read_label

    by_id = {c.case_id: c for c in dataset.train}
    preds, refs = [], []
    for fold_dir in sorted(parent.glob("fold_*")):
        split = fold_dir / "splits.json"
        val = fold_dir / "validation"
        if not split.is_file() or not val.is_dir():
            continue
        for cid in json.loads(split.read_text())["val"]:
            found = [p for d in (val / "raw", val) for p in d.glob(f"{cid}.*")
                     if p.name[len(cid):] not in (".json", ".npz")]
            if found and cid in by_id:
                preds.append(read_label(found[0])[0])
                refs.append(read_label(by_id[cid].label_path)[0])
    plan = Plan.load(parent)
    choice = choose_postprocessing(preds, refs, plan.label_values) if preds else {"classes": {}}
    plan.inference["postprocessing"] = choice
    plan.save(parent / "plan.json")
    return choice


def validation_report(model_dir: Path, dataset: Dataset, case_ids: list[str],
                      device: str | None = None, precision: str | None = None) -> Path:
    """Predict the validation cases with the best checkpoint and score them with a report.

    Two choices are made here, on these predictions against their labels, and stored in
    ``plan.json`` for ``predict`` to apply. Test-time mirroring (``inference.tta``), when the
    plan does not use it yet: kept only where it raised the mean validation Dice by at least
    :data:`~medunet.inference.tta.TTA_MIN_GAIN` (it costs 2^dims passes). Then post-processing
    (a step is kept for a class only where it raised the validation Dice), applied before scoring.
    """
    import shutil

    from medunet.evaluation import evaluate
    from medunet.inference import Predictor, apply_postprocessing, choose_postprocessing
    from medunet.inference.predictor import InputCase
    from medunet.inference.tta import TTA_MIN_GAIN, mean_dice
    from medunet.io import read_image, read_label, write_image

    out = model_dir / "validation"
    out.mkdir(exist_ok=True)
    predictor = Predictor.load(model_dir, device=device, precision=precision, postprocess="none")
    by_id = {c.case_id: c for c in dataset.train}
    refs = [read_label(by_id[cid].label_path)[0] for cid in case_ids]
    values = predictor.plan.label_values
    planned = predictor.plan.inference.get("tta", "none")
    options = [planned] if planned != "none" else ["none", "flip"]
    runs: dict[str, tuple[list[Path], list[np.ndarray], float]] = {}
    for tta in options:
        folder = out if len(options) == 1 else out / f".tta-{tta}"
        folder.mkdir(exist_ok=True)
        written = [predictor.predict_case(InputCase(cid, by_id[cid].image_paths), folder, tta=tta)
                   for cid in case_ids]
        preds = [read_label(p)[0] for p in written]
        runs[tta] = (written, preds, mean_dice(preds, refs, values))
    plan = Plan.load(model_dir)
    chosen = planned
    if len(options) > 1:
        gain = runs["flip"][2] - runs["none"][2]
        chosen = "flip" if gain >= TTA_MIN_GAIN else "none"
        plan.inference["tta"] = chosen
        plan.inference["tta_choice"] = {"none": round(runs["none"][2], 6), "flip": round(runs["flip"][2], 6),
                                        "cases": len(case_ids), "min_gain": TTA_MIN_GAIN}
        plan.reasons.update(value_reasons(plan.training, plan.inference))
        for path in runs[chosen][0]:
            os.replace(path, out / path.name)
        for tta in options:
            shutil.rmtree(out / f".tta-{tta}", ignore_errors=True)
    written = [out / p.name for p in runs[chosen][0]]
    preds = runs[chosen][1]
    choice = choose_postprocessing(preds, refs, values)
    plan.inference["postprocessing"] = choice
    plan.save(model_dir / "plan.json")
    if choice["classes"]:
        background = int(plan.label_values[0])
        (out / "raw").mkdir(exist_ok=True)
        for path, pred in zip(written, preds, strict=True):
            _, geom = read_image(path)
            write_image(out / "raw" / path.name, pred, geom)  # kept for a cross-validation choice
            write_image(path, apply_postprocessing(pred, choice, background), geom)
    first = by_id[case_ids[0]]
    evaluate(out, first.label_path.parent, labels=[v for v in dataset.label_values if v != 0],
             json_path=out / "scores.json", report=out / "report.html", model_dir=model_dir,
             images=first.image_paths[0].parent, workers=1, progress=False)
    return out / "report.html"
