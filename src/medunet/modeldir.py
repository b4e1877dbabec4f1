"""The model directory: the one module that knows its layout and loads networks from it.

    MODEL/plan.json, splits.json, log.csv, curves.png, selection.json
    MODEL/checkpoint_best.pt, checkpoint_last.pt
    MODEL/export/model[_last][_int8].onnx, model[_last].torchscript.pt
    MODEL/validation/   (predictions, scores.json, report.html)
    MODEL/fold_<k>/     (a model directory per cross-validation fold)

Writing is atomic through :func:`medunet.files.publish`; this module names the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medunet.errors import InputError

if TYPE_CHECKING:
    import torch

    from medunet.planning import Plan

PLAN = "plan.json"
SPLITS = "splits.json"
CHECKPOINTS = ("best", "last")
EXPORT_DIR = "export"
VALIDATION_DIR = "validation"


def checkpoint_file(model_dir: str | Path, which: str) -> Path:
    """``MODEL/checkpoint_<which>.pt`` (whether it exists or not)."""
    return Path(model_dir) / f"checkpoint_{which}.pt"


def checkpoint_path(model_dir: str | Path, checkpoint: str = "best") -> Path:
    """The checkpoint file a model directory offers for ``best`` / ``last``; ``best`` falls
    back to ``last`` (a run too short to validate has only the last one)."""
    if checkpoint not in CHECKPOINTS:
        raise InputError(f"unknown checkpoint '{checkpoint}'", fix="use best or last")
    model_dir = Path(model_dir)
    path = checkpoint_file(model_dir, checkpoint)
    if not path.is_file() and checkpoint == "best":
        path = checkpoint_file(model_dir, "last")
    if not path.is_file():
        raise InputError("no checkpoint found", model_dir, "train a model first with 'medunet train'")
    return path


def load_network(model_dir: str | Path, checkpoint: str = "best") -> tuple[Plan, torch.nn.Module, Path]:
    """``plan.json`` and the network of ``checkpoint_{best|last}.pt`` (on the CPU, eval mode;
    the EMA weights when the run kept them)."""
    import torch

    from medunet.planning import Plan

    model_dir = Path(model_dir)
    plan = Plan.load(model_dir)
    if plan.configuration == "cascade":
        raise InputError("this is a cascade of two networks", model_dir,
                         "use its stages, lowres/ and fullres/, one at a time (or Predictor.load for both)")
    ckpt_path = checkpoint_path(model_dir, checkpoint)
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot load checkpoint ({exc})", ckpt_path) from exc
    net = plan.build_network()
    net.load_state_dict(state["ema_model"] if state.get("ema_model") else state["model"])
    return plan, net.eval(), ckpt_path


def is_cascade(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a two-stage cascade (its ``plan.json`` says so)."""
    import json

    path = Path(model_dir) / PLAN
    try:
        return path.is_file() and json.loads(path.read_text()).get("configuration") == "cascade"
    except (OSError, ValueError, AttributeError):
        return False


def export_path(model_dir: str | Path, fmt: str = "onnx", int8: bool = False,
                checkpoint: str = "best") -> Path:
    """``MODEL/export/model[_last][_int8].onnx`` or ``model[_last].torchscript.pt``."""
    stem = "model" + ("" if checkpoint == "best" else f"_{checkpoint}")
    if fmt == "onnx":
        return Path(model_dir) / EXPORT_DIR / f"{stem}{'_int8' if int8 else ''}.onnx"
    return Path(model_dir) / EXPORT_DIR / f"{stem}.torchscript.pt"


def current_onnx(model_dir: str | Path, checkpoint: str = "best", int8: bool = False) -> Path | None:
    """The default ONNX export when it exists and is not older than its checkpoint, else None."""
    path = export_path(model_dir, "onnx", int8, checkpoint)
    ckpt = checkpoint_path(model_dir, checkpoint)
    return path if path.is_file() and path.stat().st_mtime >= ckpt.stat().st_mtime else None
