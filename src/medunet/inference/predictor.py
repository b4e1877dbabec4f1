"""The Predictor: a model directory in, label maps in the input's format and geometry out."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medunet.errors import InputError
from medunet.inference.sliding_window import probabilities_to_labels, sliding_window_inference
from medunet.io import IMAGE_SUFFIXES, read_image, split_suffix, write_image
from medunet.nets import build_network
from medunet.planning import Plan
from medunet.preprocessing import normalize
from medunet.runtime import memory_format, resolve_device, resolve_precision

TTA_MODES = ("none", "flip")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class InputCase:
    """One case to predict: its channel files in order."""

    case_id: str
    paths: list[Path]


def find_inputs(inp: str | Path, n_channels: int) -> list[InputCase]:
    """Group input files (a file or a folder) into cases.

    With one input channel a file is a case and an ``_0000`` suffix is dropped from its id
    (nnU-Net naming); with several channels ``CASE_0000.ext``, ``CASE_0001.ext``... form one
    case, and naming one channel file of a case brings its sibling files along.
    """
    inp = Path(inp)
    if inp.is_file():
        files = [inp]
    elif inp.is_dir():
        files = sorted(p for p in inp.iterdir() if p.is_file() and not p.name.startswith(".")
                       and split_suffix(p)[1].lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError("no images found", inp,
                             f"put files ending in {', '.join(IMAGE_SUFFIXES)} there")
    else:
        raise InputError("input not found", inp)
    if n_channels == 1:
        cases = []
        for f in files:
            stem = split_suffix(f)[0]
            cases.append(InputCase(stem[:-5] if stem.endswith("_0000") else stem, [f]))
        return cases
    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        stem, suffix = split_suffix(f)
        m = _CHANNEL_RE.match(stem)
        if not m:  # one multi-channel file (e.g. an RGB PNG)
            groups.setdefault(stem, {})[0] = f
            continue
        chans = groups.setdefault(m["case"], {})
        chans[int(m["ch"])] = f
        if inp.is_file():
            for c in range(n_channels):
                sib = f.parent / f"{m['case']}_{c:04d}{suffix}"
                if sib.is_file():
                    chans[c] = sib
    return [InputCase(cid, [ch[c] for c in sorted(ch)]) for cid, ch in sorted(groups.items())]


class Predictor:
    """Load a trained model directory and segment images.

    Example:
        >>> pred = Predictor.load("model_dir")              # doctest: +SKIP
        >>> labels, probs = pred.predict_array(image)       # doctest: +SKIP
        >>> pred.predict("imagesTs/", "out/")               # doctest: +SKIP
    """

    def __init__(self, plan: Plan, nets: Sequence[torch.nn.Module], device: torch.device,
                 precision: str, model_dir: Path | None = None) -> None:
        self.plan = plan
        self.nets = list(nets)
        self.device = device
        self.precision = precision
        self.model_dir = model_dir

    @classmethod
    def load(cls, model_dir: str | Path, checkpoint: str = "best", device: str | None = None,
             precision: str | None = None) -> Predictor:
        """Load ``plan.json`` and ``checkpoint_{best|last}.pt`` from a model directory."""
        model_dir = Path(model_dir)
        plan = Plan.load(model_dir)
        ckpt_path = model_dir / f"checkpoint_{checkpoint}.pt"
        if not ckpt_path.is_file() and checkpoint == "best":
            ckpt_path = model_dir / "checkpoint_last.pt"
        if not ckpt_path.is_file():
            raise InputError("no checkpoint found", model_dir, "train a model first with 'medunet train'")
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"cannot load checkpoint ({exc})", ckpt_path) from exc
        net = build_network(plan.dim, plan.in_channels, plan.num_classes, **_net_kwargs(plan))
        net.load_state_dict(state["ema_model"] if state.get("ema_model") else state["model"])
        return cls(plan, [_prepare(net, dev, plan.dim)], dev, prec, model_dir)

    @torch.inference_mode()
    def predict_probabilities(self, image: np.ndarray, tta: str = "none") -> torch.Tensor:
        """Class probabilities ``(K, *S)`` for a raw channel-first image (normalised here).

        ``tta="flip"`` averages the predictions of every combination of mirrored spatial axes
        (4 passes in 2D, 8 in 3D); each model of an ensemble is averaged the same way.
        """
        self._check_image(image)
        if tta not in TTA_MODES:
            raise InputError(f"unknown test-time augmentation '{tta}'", fix=f"use {', '.join(TTA_MODES)}")
        x = torch.from_numpy(normalize(image, self.plan.normalization))
        nsp = x.ndim - 1
        flips = [()] if tta == "none" else [
            tuple(a for a in range(nsp) if mask >> a & 1) for mask in range(2**nsp)]
        inf = self.plan.inference
        total = None
        for net in self.nets:
            for axes in flips:
                xi = torch.flip(x, [1 + a for a in axes]) if axes else x
                p = sliding_window_inference(
                    net, xi, self.plan.patch_size, self.plan.num_classes,
                    overlap=inf.get("overlap", 0.5), batch_size=max(1, self.plan.batch_size),
                    sigma_scale=inf.get("sigma_scale", 0.125), precision=self.precision,
                    device=self.device)
                if axes:
                    p = torch.flip(p, [1 + a for a in axes])
                total = p if total is None else total + p
        assert total is not None
        return total / (len(self.nets) * len(flips))

    def predict_array(self, image: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """Label map (raw label values, spatial shape) and probabilities for one image."""
        probs = self.predict_probabilities(image, tta=tta)
        return probabilities_to_labels(probs, self.plan.label_values), probs.numpy()

    def _check_image(self, image: np.ndarray, path: Path | None = None) -> None:
        if image.ndim - 1 != self.plan.dim:
            raise InputError(
                f"image is {image.ndim - 1}D but the model is {self.plan.dim}D", path,
                "use a model trained on data of this dimension")
        if image.shape[0] != self.plan.in_channels:
            raise InputError(
                f"image has {image.shape[0]} channel(s), the model expects {self.plan.in_channels} "
                f"({', '.join(self.plan.channel_names)})", path,
                "give every channel (CASE_0000, CASE_0001, ...) or the right colour mode")

    def predict_case(self, case: InputCase, out_dir: Path, save_probabilities: bool = False,
                     tta: str = "none") -> Path:
        """Predict one case from its files and write ``{case_id}{ext}`` into ``out_dir``."""
        arrays, geom = [], None
        for p in case.paths:
            arr, g = read_image(p)
            geom = geom or g
            arrays.append(arr)
        if len({a.shape[1:] for a in arrays}) > 1:
            raise InputError("channel files differ in size", case.paths[0])
        image = np.concatenate(arrays, axis=0)
        self._check_image(image, case.paths[0])
        labels, probs = self.predict_array(image, tta=tta)
        suffix = split_suffix(case.paths[0])[1].lower()
        if suffix in (".jpg", ".jpeg"):
            suffix = ".png"  # a lossy format would corrupt label values
        out = write_image(out_dir / f"{case.case_id}{suffix}", labels, geom)
        if save_probabilities:
            _save_npz(out_dir / f"{case.case_id}.npz", probs)
        return out

    def predict(self, inputs: str | Path, out_dir: str | Path, save_probabilities: bool = False,
                progress: bool = True, tta: str = "none") -> list[Path]:
        """Predict a file or a folder; returns the written label files."""
        out_dir = Path(out_dir)
        cases = find_inputs(inputs, self.plan.in_channels)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("predicting", total=len(cases))
            for case in cases:
                written.append(self.predict_case(case, out_dir, save_probabilities, tta))
                bar.advance(task)
        return written


def _save_npz(path: Path, probs: np.ndarray) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, probabilities=probs.astype(np.float32))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _net_kwargs(plan: Plan) -> dict:
    net = dict(plan.network)
    preset = net.pop("preset", "default")
    return {"preset": preset, **net}


def _prepare(net: torch.nn.Module, device: torch.device, dim: int) -> torch.nn.Module:
    net = net.to(device).eval()
    return net.to(memory_format=memory_format(dim))
