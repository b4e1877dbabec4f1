"""Existing nnU-Net v2 models as medunet model directories (``medunet import-nnunet``).

An nnU-Net result folder (``.../TRAINER__PLANS__CONFIGURATION/`` with ``dataset.json``,
``plans.json`` and ``fold_k/checkpoint_final.pth``) becomes a model directory whose plan
reproduces nnU-Net's preprocessing and prediction (:mod:`medunet.nnunet.plans`) and whose
network is nnU-Net's own architecture built by medunet (:class:`medunet.nets.nnunet.NnUNet`),
so ``predict``, ``evaluate``, ``export``, ``serve`` and ``distill`` work on it unchanged. Several
folds become ``fold_<k>/`` model directories: an ensemble, averaged as nnU-Net averages them.
nnU-Net itself is not needed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from medunet.errors import InputError
from medunet.files import atomic_file, publish
from medunet.modeldir import PLAN, checkpoint_file
from medunet.nnunet.checkpoint import load_checkpoint, map_state_dict
from medunet.nnunet.plans import make_plan

__all__ = ["CHECKPOINTS", "find_folds", "import_nnunet", "is_nnunet_folder"]

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
# where the source's plans.json / dataset.json are kept, for provenance
SOURCE_DIR = "nnunet"


def is_nnunet_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like an nnU-Net v2 trained-model folder."""
    p = Path(path)
    return (p / "plans.json").is_file() and (p / "dataset.json").is_file() and any(p.glob("fold_*/*.pth"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path.name} not found", path, "pass an nnU-Net v2 trained-model folder "
                         "(nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path.name} ({exc})", path) from exc
    if not isinstance(data, dict):
        raise InputError(f"{path.name} is not a JSON object", path)
    return data


def find_folds(folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[tuple[str, Path]]:
    """``(fold name, checkpoint file)`` for the requested folds (None: every numbered fold that
    has the checkpoint, else ``fold_all``); a requested fold without it is an error naming the file."""
    name = CHECKPOINTS.get(checkpoint)
    if name is None:
        raise InputError(f"unknown checkpoint '{checkpoint}'", fix="use final or best")
    if folds is None:
        numbered = sorted((d for d in folder.glob("fold_*") if d.name[5:].isdigit() and (d / name).is_file()),
                          key=lambda d: int(d.name[5:]))
        found = numbered or [d for d in folder.glob("fold_all") if (d / name).is_file()]
        if not found:
            raise InputError(f"no fold_*/{name} found", folder,
                             "train nnU-Net first, or pass --checkpoint best")
        return [(d.name[5:], d / name) for d in found]
    out = []
    for f in folds:
        f = str(f)
        if not (f == "all" or f.isdigit()):
            raise InputError(f"fold '{f}' is neither a number nor 'all'",
                             fix="use e.g. --folds 0 1 2 3 4, or all")
        path = folder / f"fold_{f}" / name
        if not path.is_file():
            raise InputError(f"fold {f} has no {name}", path, "train that fold, or leave it out of --folds")
        out.append((f, path))
    if len({f for f, _ in out}) != len(out):
        raise InputError("a fold is named twice", fix="list each fold once")
    return out


def _configuration(folder: Path, ckpt: dict) -> str:
    """The configuration name: from ``TRAINER__PLANS__CONFIGURATION``, else the checkpoint's."""
    parts = folder.resolve().name.split("__")
    if len(parts) == 3 and parts[2]:
        return parts[2]
    config = (ckpt.get("init_args") or {}).get("configuration")
    if not config:
        raise InputError("cannot tell the configuration (the folder is not named "
                         "TRAINER__PLANS__CONFIGURATION and the checkpoint does not say)", folder)
    return str(config)


def _write_model(out: Path, plan, state: dict, source: dict) -> None:
    """One model directory: plan.json and the weights as its ``best`` checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / PLAN)
    with atomic_file(checkpoint_file(out, "best"), durable=True) as tmp:
        torch.save({"model": state, "imported_from": source}, tmp)


def import_nnunet(result_folder: str | Path, model_dir: str | Path, folds: Sequence[int | str] | None = None,
                  checkpoint: str = "final") -> Path:
    """Turn an nnU-Net v2 trained-model folder into a medunet model directory.

    Args:
        result_folder: ``nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION``.
        model_dir: the new model directory (must not exist, or be empty); one fold is a model
            directory, several are ``fold_<k>/`` model directories in it (an ensemble).
        folds: fold numbers and/or ``"all"`` (nnU-Net's ``fold_all``); None: every numbered fold.
        checkpoint: ``final`` (nnU-Net's default for prediction) or ``best``.

    Every weight is mapped by name and shape onto the plan's network; a mismatch, an unknown
    network, normalisation or plans version is a one-line :class:`InputError` naming the file.
    The directory is built beside the target and renamed into place: nothing half-written stays.
    """
    folder, target = Path(result_folder), Path(model_dir)
    if not folder.is_dir():
        raise InputError("result folder not found", folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError("output exists and is not empty", target, "choose a new -o folder")
    plans_path, dataset_path = folder / "plans.json", folder / "dataset.json"
    plans, dataset = _read_json(plans_path), _read_json(dataset_path)
    chosen = find_folds(folder, folds, checkpoint)
    ckpts = [(f, path, load_checkpoint(path)) for f, path in chosen]
    configuration = _configuration(folder, ckpts[0][2])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for f, path, ckpt in ckpts:
            axes = ckpt.get("inference_allowed_mirroring_axes")
            plan, net_to_med = make_plan(plans, dataset, configuration, None if axes is None else list(axes),
                                         plans_path, dataset_path)
            net = plan.build_network()
            lift = bool(plan.preprocessing.get("keep_spacing_axes"))  # a 2D network run slice by slice
            state = map_state_dict(ckpt["network_weights"], net.state_dict(), plan.dim, net_to_med, path,
                                   lift)
            net.load_state_dict(state)  # strict: every name and shape, once more
            trainer, epoch = ckpt.get("trainer_name", "?"), ckpt.get("current_epoch", "?")
            plan.reasons["imported"] = (f"nnU-Net v2 model {folder.resolve()} ({trainer}, configuration "
                                        f"{configuration}, fold {f}, {path.name}, epoch {epoch}); "
                                        "preprocessing and prediction as nnU-Net's (medunet.nnunet.plans)")
            source = {"folder": str(folder.resolve()), "fold": f, "checkpoint": path.name,
                      "configuration": configuration, "trainer": ckpt.get("trainer_name")}
            _write_model(tmp if len(ckpts) == 1 else tmp / f"fold_{f}", plan, state, source)
        keep = tmp / SOURCE_DIR
        keep.mkdir()
        for p in (plans_path, dataset_path):
            shutil.copyfile(p, keep / p.name)
        if target.exists():
            target.rmdir()
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
