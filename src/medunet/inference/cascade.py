"""Prediction with a two-stage cascade (see :mod:`medunet.training.cascade`).

A cascade model directory holds ``lowres/`` (stage 1, trained at a coarse working resolution)
and ``fullres/`` (stage 2, whose input is the image plus one 0/1 map per foreground class of
stage 1's prediction on the image's own grid). Its ``plan.json`` is stage 1's plan with
``configuration: "cascade"`` and a ``cascade`` section saying which stages to use: the
validation comparison made at the end of training may keep stage 1 alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medunet.errors import InputError
from medunet.inference.predictor import Predictor
from medunet.planning import Plan

__all__ = ["CascadePredictor", "is_cascade", "prior_channels"]


def is_cascade(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a cascade (its ``plan.json`` says so)."""
    path = Path(model_dir) / "plan.json"
    if not path.is_file():
        return False
    try:
        return Plan.load(path).configuration == "cascade"
    except InputError:
        return False


def prior_channels(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K - 1, *S)`` float32 0/1 maps of classes 1..K-1 of a class-index map: stage 2's
    extra input channels."""
    idx = np.asarray(indices)
    return np.stack([(idx == k) for k in range(1, num_classes)]).astype(np.float32)


class CascadePredictor(Predictor):
    """Stage 1 predicts on the image's grid; stage 2 sees the image plus that prediction.

    Behaves like a :class:`Predictor` of stage 1's inputs (same channels, labels, TTA and
    file handling); with ``use == "lowres"`` it is stage 1 alone.
    """

    def __init__(self, plan: Plan, lowres: Predictor, fullres: Predictor | None) -> None:
        final = fullres or lowres
        super().__init__(plan, final.members, final.device, final.precision, lowres.model_dir,
                         overlap=final.overlap, postprocessing=final.postprocessing)
        self.cascade_plan = plan
        self.lowres, self.fullres = lowres, fullres

    @classmethod
    def load(cls, model_dir: str | Path, checkpoint: str = "best", device: str | None = None,
             precision: str | None = None, *, backend: str = "torch", int8: bool = False,
             overlap: float | None = None, postprocess: str = "auto",
             calibration: str | Path | None = None) -> CascadePredictor:
        """Load the stages ``plan.cascade`` names (same options as :meth:`Predictor.load`)."""
        model_dir = Path(model_dir)
        plan = Plan.load(model_dir)
        stages = plan.cascade.get("stages") or {}
        use = plan.cascade.get("use", "cascade")
        opts = {"checkpoint": checkpoint, "device": device, "precision": precision, "backend": backend,
                "int8": int8, "overlap": overlap, "calibration": calibration}
        for name in ("lowres",) + (("fullres",) if use == "cascade" else ()):
            if not (model_dir / stages.get(name, name) / "plan.json").is_file():
                raise InputError(f"the cascade's {name} stage is missing", model_dir / stages.get(name, name),
                                 "train the cascade again (medunet train --config cascade)")
        # stage 1 keeps its own post-processing when it feeds stage 2 (as when the priors were made)
        lowres = Predictor.load(model_dir / stages.get("lowres", "lowres"),
                                postprocess="auto" if use == "cascade" else postprocess, **opts)
        fullres = None
        if use == "cascade":
            fullres = Predictor.load(model_dir / stages.get("fullres", "fullres"), postprocess=postprocess,
                                     **opts)
        return cls(plan, lowres, fullres)

    def _with_prior(self, image: np.ndarray, tta: str, spacing: Sequence[float] | None) -> np.ndarray:
        assert self.fullres is not None
        idx, _ = self.lowres._predict_indices(image, tta, False, spacing)
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        prior = prior_channels(idx, self.plan.num_classes)
        return np.concatenate([np.asarray(image, dtype=np.float32), prior], axis=0)

    def predict_array(self, image: np.ndarray, tta: str = "none", probabilities: bool = True,
                      spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Stage 2's post-processed labels (and probabilities) on the image's own grid."""
        self._check_image(image)
        if self.fullres is None:
            return self.lowres.predict_array(image, tta, probabilities, spacing)
        return self.fullres.predict_array(self._with_prior(image, tta, spacing), tta, probabilities, spacing)

    def predict_probabilities(self, image: np.ndarray, tta: str = "none",
                              spacing: Sequence[float] | None = None) -> torch.Tensor:
        self._check_image(image)
        if self.fullres is None:
            return self.lowres.predict_probabilities(image, tta, spacing)
        return self.fullres.predict_probabilities(self._with_prior(image, tta, spacing), tta, spacing)
