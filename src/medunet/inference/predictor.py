"""The Predictor: a model directory in, label maps in the input's format and geometry out.

When the plan crops to the non-zero region or resamples to a target spacing, the raw image
is cropped and resampled (not normalised: the per-window normaliser still works on the
result), predicted at the plan's spacing, and the prediction is reverted onto the input's
grid (resampled back class by class, un-cropped with background), so the written label map
overlays the input exactly. A case already at the plan's spacing and without a crop takes
the plain path, without copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medunet.errors import InputError
from medunet.files import atomic_file
from medunet.inference.backends import Backend, OnnxBackend, OpenVinoBackend, TorchBackend, channels_last_pays
from medunet.inference.normalization import WindowNormalizer
from medunet.inference.postprocess import apply_postprocessing, parse_postprocessing
from medunet.inference.sliding_window import indices_to_labels, sliding_window
from medunet.inference.tta import TTA_MODES, rotation_plane, tta_transforms, window_predictor
from medunet.io import IMAGE_SUFFIXES, all_finite, read_image, split_suffix, write_image
from medunet.modeldir import checkpoint_path, current_onnx, is_cascade, load_network
from medunet.planning import Plan
from medunet.preprocessing import normalize
from medunet.preprocessing.crop import uncrop
from medunet.preprocessing.pipeline import (
    PreprocessInfo,
    case_spacing,
    needs_resampling,
    prepare_geometry,
    preprocessing_options,
    revert_probabilities,
    revert_to_indices,
    target_spacing,
)
from medunet.runtime import memory_format, resolve_device, resolve_precision

__all__ = [
    "PREDICTIONS_MANIFEST", "TTA_MODES", "InputCase", "Member", "Predictor", "expand_model_dirs",
    "CascadePredictor", "fill_nonfinite", "find_dicom_cases", "find_inputs", "is_cascade", "load_network",
    "prior_channels",
]
BACKENDS = ("torch", "onnx", "openvino")
# what --precision may ask of each backend that runs the model's ONNX export (``auto``: its best;
# torch checks its own in resolve_precision)
EXPORT_PRECISIONS = {b.name: ("auto", *b.PRECISIONS) for b in (OnnxBackend, OpenVinoBackend)}
# the backends that run the model's ONNX export (MODEL/export/), which their callers make first
EXPORT_BACKENDS = tuple(EXPORT_PRECISIONS)
# lists, in an output folder, the files medunet's predict wrote there: only those may be overwritten
PREDICTIONS_MANIFEST = ".medunet-predictions.json"
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def check_backend(backend: str, precision: str | None = None, int8: bool = False) -> None:
    """Refuse a backend / precision / int8 combination that cannot run, before the callers
    export anything for it: ONNX Runtime would otherwise run fp32 whatever ``--precision``
    asked for."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'", fix=f"use {', '.join(BACKENDS)}")
    if int8 and backend not in EXPORT_BACKENDS:
        raise InputError("int8 needs an ONNX export", fix="add --backend onnx or --backend openvino")
    allowed = EXPORT_PRECISIONS.get(backend)
    if allowed and (precision or "auto") not in allowed:
        raise InputError(f"the {backend} backend runs {' or '.join(allowed[1:])}, not {precision}",
                         fix=f"use --precision {', '.join(allowed)}"
                             + (" (--backend openvino runs bf16)" if backend == "onnx" else ""))


@dataclass
class InputCase:
    """One case to predict: its channel files in order, or (``series_uid`` set) the folder
    holding a DICOM series."""

    case_id: str
    paths: list[Path]
    series_uid: str | None = None


def find_inputs(inp: str | Path, n_channels: int) -> list[InputCase]:
    """Group input files (a file or a folder) into cases.

    With one input channel a file is a case and an ``_0000`` suffix is dropped from its id
    (nnU-Net naming); with several channels ``CASE_0000.ext``, ``CASE_0001.ext``... form one
    case, and naming one channel file of a case brings its sibling files along. A folder
    without image files that holds DICOM series (itself, or in subfolders) gives one case per
    series (see :func:`find_dicom_cases`).
    """
    inp = Path(inp)
    if inp.is_file():
        files = [inp]
    elif inp.is_dir():
        files = sorted(p for p in inp.iterdir() if p.is_file() and not p.name.startswith(".")
                       and split_suffix(p)[1].lower() in IMAGE_SUFFIXES)
        if not files:
            dicom = find_dicom_cases(inp)
            if dicom:
                return dicom
            raise InputError("no images found", inp,
                             f"put files ending in {', '.join(IMAGE_SUFFIXES)} (or DICOM series) there")
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


def find_dicom_cases(folder: Path) -> list[InputCase]:
    """One case per DICOM series under ``folder``; the case id is the series' folder name, or
    its SeriesInstanceUID where a folder holds several series or two folders share a name."""
    from collections import Counter

    from medunet.io.dicom import list_dicom_series

    series = list_dicom_series(folder)
    per_dir = Counter(d for d, _ in series)
    names = Counter(d.name for d in per_dir)
    cases = []
    for d, uid in series:
        cid = d.name if per_dir[d] == 1 and names[d.name] == 1 and d.name else uid
        cases.append(InputCase(cid, [d], series_uid=uid))
    return cases


def fill_nonfinite(image: np.ndarray, path: Path | None = None, copy: bool = True) -> np.ndarray:
    """``image`` with NaN and +-inf replaced, channel by channel, by that channel's lowest finite
    value (background for every usual modality), for images the user chose to predict anyway.

    ``copy=False`` fills a writable array in place. A channel without one finite value is refused.
    """
    if all_finite(image):
        return image
    out = np.array(image, copy=True) if copy or not image.flags.writeable else image
    for c in range(out.shape[0]):
        ch = out[c]
        bad = ~np.isfinite(ch)
        if bad.all():
            raise InputError(f"channel {c} has no finite value", path, "repair the image")
        ch[bad] = np.min(ch, where=~bad, initial=np.inf)
    return out


@dataclass
class Member:
    """One model of an ensemble: its plan and the backend that runs it."""

    plan: Plan
    backend: Backend
    model_dir: Path | None = None


def expand_model_dirs(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Model directories to load: a directory holding ``fold_*/`` model directories stands for
    all of its folds (a cross-validation ensemble); any other path is one model."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        folds = [d for d in p.glob("fold_*") if d.is_dir() and (d / "plan.json").is_file()]
        suffix = lambda d: (int(d.name[5:]) if d.name[5:].isdigit() else 1 << 30, d.name)  # noqa: E731
        out.extend(sorted(folds, key=suffix) if folds else [p])
    if not out:
        raise InputError("no model directory given", fix="pass a directory written by 'medunet train'")
    return out


class Predictor:
    """Load trained model directories and segment images.

    One code path serves every configuration: windows are cut from the raw image, normalised
    on the fly, run through every model (PyTorch or ONNX Runtime) under every test-time
    transform, averaged, Gaussian-weighted into slabs, and turned into labels that are then
    post-processed as the plan (or the caller) says.

    Example:
        >>> pred = Predictor.load("model_dir")                          # doctest: +SKIP
        >>> labels, probs = pred.predict_array(image)                   # doctest: +SKIP
        >>> pred.predict("imagesTs/", "out/", tta="flip")               # doctest: +SKIP
        >>> Predictor.load(["fold_0", "fold_1"], backend="onnx")        # doctest: +SKIP
    """

    def __init__(self, plan: Plan, members: Sequence[Member] | Sequence[torch.nn.Module],
                 device: torch.device | None = None, precision: str = "fp32",
                 model_dir: Path | None = None, *, overlap: float | None = None,
                 postprocessing: dict | None = None) -> None:
        dev = device or torch.device("cpu")
        self.members = [m if isinstance(m, Member) else
                        Member(plan, TorchBackend(m, dev, precision), model_dir) for m in members]
        if not self.members:
            raise ValueError("a Predictor needs at least one model")
        self.plan = plan
        self.device = getattr(self.members[0].backend, "device", dev)
        self.precision = getattr(self.members[0].backend, "precision", precision)
        self.model_dir = model_dir
        self.overlap = float(plan.inference.get("overlap", 0.5) if overlap is None else overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"overlap {self.overlap} is out of range", fix="use a value in [0, 1), e.g. 0.5")
        self.postprocessing = postprocessing or None

    @property
    def nets(self) -> list[torch.nn.Module]:
        """The PyTorch networks (empty for ONNX backends)."""
        return [m.backend.net for m in self.members if isinstance(m.backend, TorchBackend)]

    @classmethod
    def load(cls, model_dir: str | Path | Sequence[str | Path], checkpoint: str = "best",
             device: str | None = None, precision: str | None = None, *, backend: str = "torch",
             int8: bool = False, overlap: float | None = None, postprocess: str = "auto") -> Predictor:
        """Load one model directory, several (an ensemble), or a directory of ``fold_*/`` models.

        Args:
            backend: ``torch``, ``onnx`` (ONNX Runtime on the CPU) or ``openvino`` (OpenVINO on
                the CPU, fp32 or bf16 by ``precision``); the last two run the up-to-date export in
                ``MODEL/export/``: :func:`medunet.export.ensure_onnx` makes it, as
                ``medunet predict --backend onnx|openvino`` does.
            int8: with ``onnx`` or ``openvino``, the statically quantised int8 model.
            overlap: sliding-window overlap (default: the plan's, 0.5).
            postprocess: ``auto`` (the choice stored in the first model's plan), ``none``, or
                steps such as ``largest_component,1:fill_holes`` (see
                :func:`medunet.inference.postprocess.parse_postprocessing`).
        """
        check_backend(backend, precision, int8)
        given = [model_dir] if isinstance(model_dir, (str, Path)) else list(model_dir)
        if cls is Predictor and len(given) == 1 and is_cascade(given[0]):
            return CascadePredictor.load(given[0], checkpoint, device, precision, backend=backend, int8=int8,
                                         overlap=overlap, postprocess=postprocess)
        dirs = expand_model_dirs(given)
        for d in dirs:
            if is_cascade(d):
                raise InputError("a cascade cannot be part of an ensemble", d,
                                 "predict with the cascade alone")
        dev = resolve_device(device) if backend == "torch" else torch.device("cpu")
        prec = "fp32" if backend == "onnx" else resolve_precision(precision, dev)
        members = []
        for d in dirs:
            if backend == "torch":
                plan, net, _ = load_network(d, checkpoint)
                members.append(Member(plan, TorchBackend(_prepare(net, dev, plan.dim), dev, prec), d))
            else:
                path = current_onnx(d, checkpoint, int8)
                if path is None:
                    raise InputError(f"no current {'int8 ' if int8 else ''}ONNX export of the {checkpoint} "
                                     "checkpoint", d, f"run 'medunet export {d}{' --int8' if int8 else ''}' "
                                     f"first ('medunet predict --backend {backend}' does it for you)")
                run = OnnxBackend(path) if backend == "onnx" else OpenVinoBackend(path, prec)
                members.append(Member(Plan.load(d), run, d))
        _check_compatible(members)
        primary = members[0].plan
        if postprocess == "auto":
            choice = _stored_postprocessing(Path(given[0])) or primary.inference.get("postprocessing")
        elif postprocess in ("none", ""):
            choice = None
        else:
            choice = parse_postprocessing(postprocess, primary.label_values)
        pred = cls(primary, members, dev, prec, dirs[0], overlap=overlap, postprocessing=choice)
        # how to load it again: worker processes of predict(workers=N) do, and a re-run into the
        # same folder compares these settings before it skips finished cases
        pred.load_spec = {"model_dir": [str(Path(g).resolve()) for g in given], "checkpoint": checkpoint,
                          "device": device, "precision": precision, "backend": backend, "int8": int8,
                          "overlap": overlap, "postprocess": postprocess}
        return pred

    def _groups(self) -> list[tuple[Plan, list[Backend]]]:
        """Members that share patch size and normalisation run in one sliding-window pass."""
        groups: dict[str, tuple[Plan, list[Backend]]] = {}
        for m in self.members:
            key = json.dumps([m.plan.patch_size, m.plan.normalization], sort_keys=True)
            groups.setdefault(key, (m.plan, []))[1].append(m.backend)
        return list(groups.values())

    def resolve_tta(self, tta: str) -> str:
        """``auto`` is the plan's default (``inference.tta``: mirroring for 3D models, none for
        2D, see make_plan); any other mode is used as given."""
        return self.plan.inference.get("tta", "none") if tta == "auto" else tta

    @property
    def average(self) -> str:
        """What windows, transforms and models average: ``probabilities`` (medunet's models) or
        ``logits`` (nnU-Net's way, which imported nnU-Net models keep: ``inference.average``)."""
        return self.plan.inference.get("average", "probabilities")

    def _as_probabilities(self, scores: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Class scores from :meth:`_run` as probabilities (a softmax when they are logits)."""
        if self.average != "logits":
            return scores
        t = torch.as_tensor(scores)
        return torch.softmax(t.float(), dim=0) if isinstance(scores, torch.Tensor) else torch.softmax(
            t.float(), dim=0).numpy()

    @torch.inference_mode()
    def _run(self, image: np.ndarray, tta: str, probabilities: bool, labels: bool, normalised: bool = False,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        plan = self.plan
        inf = plan.inference
        transforms = tta_transforms(self.resolve_tta(tta), plan.dim, rotation_plane(plan.spacing, plan.dim),
                                    inf.get("mirror_axes"))
        k = plan.num_classes
        groups = self._groups()
        total: torch.Tensor | None = None
        for gplan, backends in groups:
            if normalised:
                prepare, source = None, image
            else:
                try:
                    prepare, source = WindowNormalizer(image, gplan.normalization), image
                except ValueError:  # a scheme it does not know: normalise the whole image up front
                    prepare, source = None, normalize(image, gplan.normalization)
            probs, idx = sliding_window(
                window_predictor(backends, transforms, self.average), source, gplan.patch_size, k,
                overlap=self.overlap, batch_size=max(1, gplan.batch_size),
                sigma_scale=gplan.inference.get("sigma_scale", 0.125), prepare=prepare,
                probabilities=probabilities or len(groups) > 1, labels=labels and len(groups) == 1,
                weights=gplan.inference.get("window_weights", "medunet"),
                pad=gplan.inference.get("pad", "end"))
            if len(groups) == 1:
                return probs, idx
            assert probs is not None
            probs *= len(backends)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        total /= len(self.members)
        idx = total.argmax(0).to(torch.uint8 if k <= 256 else torch.int16) if labels else None
        return (total if probabilities else None), idx

    def predict_probabilities(self, image: np.ndarray, tta: str = "none",
                              spacing: Sequence[float] | None = None) -> torch.Tensor:
        """Class probabilities ``(K, *S)`` (float32) for a raw channel-first image.

        ``tta``: ``none``; ``flip`` averages every combination of mirrored spatial axes (4
        passes in 2D, 8 in 3D); ``full`` adds +-10 degree in-plane rotations. Every model of an
        ensemble is averaged the same way. ``spacing``: the image's voxel spacing (None: it is
        at the plan's spacing); the probabilities are on the image's own grid either way.
        """
        self._check_image(image)
        work, info, normalised = self._prepare(image, spacing)
        probs, _ = self._run(work, tta, probabilities=True, labels=False, normalised=normalised)
        assert probs is not None
        probs = self._as_probabilities(probs)
        if info is None:
            return probs
        del work
        return torch.from_numpy(revert_probabilities(probs, info))

    def _prepare(self, image: np.ndarray, spacing: Sequence[float] | None,
                 ) -> tuple[np.ndarray, PreprocessInfo | None, bool]:
        """The image the networks see (cropped, resampled raw intensities), the record to
        revert with (None when the plan changes nothing for this case) and whether the image
        is normalised already (a plan that normalises before resampling, as nnU-Net does)."""
        opts = preprocessing_options(self.plan)
        spacing = case_spacing(spacing, image.shape[1:], self.plan)
        resample = opts["resample"] and needs_resampling(spacing, target_spacing(self.plan, spacing))
        if not opts["crop_nonzero"] and not resample:
            return image, None, False
        first = bool(resample and opts["normalize_first"])
        work, info = prepare_geometry(image, spacing, self.plan, normalise=first)
        return (work, info, first) if info.cropped or info.resampled else (image, None, False)

    def _predict_indices(self, image: np.ndarray, tta: str, probabilities: bool,
                         spacing: Sequence[float] | None) -> tuple[np.ndarray | torch.Tensor,
                                                                   np.ndarray | torch.Tensor | None]:
        """Class-index map and (if asked) probabilities on the image's own grid."""
        work, info, normalised = self._prepare(image, spacing)
        if info is None:
            probs, idx = self._run(image, tta, probabilities=probabilities, labels=True)
            assert idx is not None
            return idx, (self._as_probabilities(probs) if probs is not None else None)
        if not info.resampled:  # cropped only: labels come straight from the sliding window
            probs, idx = self._run(work, tta, probabilities=probabilities, labels=True)
            del work
            assert idx is not None
            full_idx = uncrop(idx.numpy(), info.bbox, info.original_shape, fill=0)
            return full_idx, (revert_probabilities(self._as_probabilities(probs), info)
                              if probs is not None else None)
        probs, _ = self._run(work, tta, probabilities=True, labels=False, normalised=normalised)
        del work
        assert probs is not None
        if self.average == "logits":  # nnU-Net's order: resample the logits back, then argmax
            idx = revert_to_indices(probs, info)
            return idx, (revert_probabilities(self._as_probabilities(probs), info) if probabilities else None)
        if probabilities:  # K x original floats are wanted anyway: argmax them
            full = revert_probabilities(probs, info)
            del probs
            k = full.shape[0]
            return full.argmax(0).astype(np.uint8 if k <= 256 else np.uint16), full
        # labels only: classes go back one at a time (no K x original-size float array)
        return revert_to_indices(probs, info), None

    def predict_array(self, image: np.ndarray, tta: str = "none", probabilities: bool = True,
                      spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Post-processed label map (raw label values) and, unless ``probabilities=False``
        (which saves a ``K x image`` float32 array), the probabilities before post-processing.

        ``spacing`` is the image's voxel spacing (per spatial axis, as :mod:`medunet.io`
        reads it); None means the image is at the plan's spacing. When the plan crops or
        resamples, both outputs are on the image's own grid.
        """
        self._check_image(image)
        idx, probs = self._predict_indices(image, tta, probabilities, spacing)
        labels = indices_to_labels(idx, self.plan.label_values)
        labels = apply_postprocessing(labels, self.postprocessing, int(self.plan.label_values[0]))
        if isinstance(probs, torch.Tensor):
            probs = probs.numpy()
        return labels, probs

    def _check_image(self, image: np.ndarray, path: Path | None = None) -> None:
        """Refuse what the networks cannot segment: wrong dimension or channels, and NaN/inf
        (one NaN makes a z-scored image all NaN and the prediction silently all background)."""
        if image.ndim - 1 != self.plan.dim:
            raise InputError(
                f"image is {image.ndim - 1}D but the model is {self.plan.dim}D", path,
                "use a model trained on data of this dimension")
        if image.shape[0] != self.plan.in_channels:
            raise InputError(
                f"image has {image.shape[0]} channel(s), the model expects {self.plan.in_channels} "
                f"({', '.join(self.plan.channel_names)})", path,
                "give every channel (CASE_0000, CASE_0001, ...) or the right colour mode")
        if not all_finite(image):
            n = int(np.count_nonzero(~np.isfinite(image)))
            raise InputError(f"image has {n} non-finite voxel(s) (NaN or inf)", path,
                             "repair the image, or predict with --fill-nonfinite (replaces them with the "
                             "image's lowest finite value; medunet.inference.fill_nonfinite for arrays)")

    def predict_case(self, case: InputCase, out_dir: Path, save_probabilities: bool = False,
                     tta: str = "none", overlay: bool = False, dicom_seg: bool = True,
                     fill_nonfinite_values: bool = False) -> Path:
        """Predict one case from its files and write ``{case_id}{ext}`` into ``out_dir``
        (and, with ``overlay``, ``overlays/{case_id}.png`` beside it).

        A DICOM series case (``case.series_uid``) gives ``{case_id}.nii.gz`` in the series'
        geometry and, with ``dicom_seg``, ``{case_id}.seg.dcm`` referencing the source slices.
        ``fill_nonfinite_values``: replace NaN/inf (see :func:`fill_nonfinite`) instead of
        refusing the image.
        """
        if case.series_uid is not None:
            from medunet.io.dicom import read_dicom_series

            image, geom = read_dicom_series(case.paths[0], case.series_uid)
        else:
            arrays, geom = [], None
            for p in case.paths:
                arr, g = read_image(p)
                geom = geom or g
                arrays.append(arr)
            if len({a.shape[1:] for a in arrays}) > 1:
                raise InputError("channel files differ in size", case.paths[0])
            image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            del arrays
        if fill_nonfinite_values:
            image = fill_nonfinite(image, case.paths[0], copy=False)
        self._check_image(image, case.paths[0])
        spacing = geom.spacing if geom is not None and len(geom.spacing) == image.ndim - 1 else None
        labels, probs = self.predict_array(image, tta=tta, probabilities=save_probabilities, spacing=spacing)
        out = write_image(out_dir / _label_name(case), labels, geom)
        if case.series_uid is not None and dicom_seg:
            from medunet.io.dicom_seg import write_dicom_seg

            assert geom is not None
            write_dicom_seg(labels, geom.extra["files"], out_dir / f"{case.case_id}.seg.dcm",
                            self.plan.label_values, self.plan.label_names,
                            series_description=f"medunet {self.plan.dataset_name}"[:64])
        if save_probabilities and probs is not None:
            _save_npz(out_dir / f"{case.case_id}.npz", probs)
        if overlay:
            from medunet.inference.overlay import write_overlay

            write_overlay(image, labels, out_dir / "overlays" / f"{case.case_id}.png",
                          self.plan.label_values, geom.spacing if geom else None, title=case.case_id)
        return out

    def predict(self, inputs: str | Path, out_dir: str | Path, save_probabilities: bool = False,
                progress: bool = True, tta: str = "auto", overlay: bool = False,
                dicom_seg: bool = True, fill_nonfinite_values: bool = False, *,
                workers: int | None = None, overwrite: bool = False) -> list[Path]:
        """Predict a file or a folder (of images, or of DICOM series); returns the label files
        of every case. ``dicom_seg``: also write a DICOM-SEG for each DICOM series;
        ``fill_nonfinite_values``: replace NaN/inf instead of refusing such images.

        ``out_dir`` must not be an input folder, and only files that an earlier ``predict``
        wrote there (listed in its ``.medunet-predictions.json``) are overwritten: anything
        else in the way (input images, ground truth) is refused before a case is predicted.
        A re-run into the same folder with the same models and settings skips the cases whose
        outputs are all there (a stopped run continues); ``overwrite`` redoes them.

        ``workers``: processes predicting cases side by side (default: one per visible GPU on
        CUDA, else 1). On a CPU each gets an equal share of the cores; they load the model the
        way this Predictor was loaded (:meth:`load`).
        """
        mode = self.resolve_tta(tta)
        tta_transforms(mode, self.plan.dim)  # a bad mode fails before any file is read
        n_workers = self._workers(workers)
        out_dir = Path(out_dir)
        cases = find_inputs(inputs, self.plan.in_channels)
        names = [_case_outputs(c, save_probabilities, overlay, dicom_seg) for c in cases]
        settings = self._settings(mode, save_probabilities, overlay, dicom_seg, fill_nonfinite_values)
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest() if settings else None
        manifest = _Manifest.claim(out_dir, _input_folders(Path(inputs), cases), names, key, overwrite)
        todo = [(c, ns) for c, ns in zip(cases, names, strict=True) if not manifest.finished(ns)]
        n_workers = min(n_workers, max(1, len(todo)))
        self.last_run = {"cases": len(cases), "predicted": len(todo), "skipped": len(cases) - len(todo),
                         "workers": n_workers}
        args = (out_dir, save_probabilities, tta, overlay, dicom_seg, fill_nonfinite_values)
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("predicting", total=len(cases), completed=len(cases) - len(todo))

            def finished(ns: list[str]) -> None:
                manifest.mark(ns)
                bar.advance(task)

            if n_workers <= 1:
                for case, ns in todo:
                    self.predict_case(case, *args)
                    finished(ns)
            else:
                _predict_in_workers(self, todo, args, n_workers, finished)
        return [out_dir / ns[0] for ns in names]

    def _settings(self, tta: str, *flags: bool) -> dict | None:
        """What decides a prediction's content (models and their checkpoint times, TTA,
        overlap, post-processing, output options); None for a Predictor not made by :meth:`load`,
        whose earlier outputs are then never reused."""
        spec = getattr(self, "load_spec", None)
        if spec is None:
            return None
        models = []
        for m in self.members:
            if m.model_dir is not None:
                try:
                    stamp = checkpoint_path(m.model_dir, spec["checkpoint"]).stat().st_mtime
                except (InputError, OSError):
                    stamp = None
                models.append([str(Path(m.model_dir).resolve()), stamp])
        return {"models": models, "backend": spec["backend"], "int8": spec["int8"], "tta": tta,
                "overlap": self.overlap, "postprocessing": self.postprocessing, "options": list(flags)}

    def _workers(self, workers: int | None) -> int:
        if workers is None:
            workers = torch.cuda.device_count() if self.device.type == "cuda" else 1
        if workers < 1:
            raise InputError(f"--workers {workers} is not a positive number", fix="use 1 or more")
        if workers > 1 and getattr(self, "load_spec", None) is None:
            raise InputError("worker processes need a Predictor made by Predictor.load",
                             fix="load it with Predictor.load, or predict with workers=1")
        return workers


def _predict_in_workers(predictor: Predictor, cases: list[tuple[InputCase, list[str]]], args: tuple,
                        n_workers: int, advance: Callable[[list[str]], None]) -> None:
    """Cases spread over ``n_workers`` spawned processes, each loading the model once: on a
    CPU with ``cores / n_workers`` torch threads, on CUDA one visible GPU each. The first
    failure stops the rest and is raised here."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    spec = dict(predictor.load_spec)
    gpus = torch.cuda.device_count() if predictor.device.type == "cuda" else 0
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    ctx = multiprocessing.get_context("spawn")  # a forked torch with live OpenMP threads can hang
    with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_worker_start,
                             initargs=(spec, threads, gpus)) as pool:
        pending = {pool.submit(_worker_case, case, args): ns for case, ns in cases}
        waiting = set(pending)
        while waiting:
            finished, waiting = wait(waiting, return_when=FIRST_EXCEPTION)
            for f in finished:
                if f.exception() is not None:
                    for p in waiting:
                        p.cancel()
                    raise f.exception()
                advance(pending[f])


_WORKER: dict = {}


def _worker_start(spec: dict, threads: int, gpus: int) -> None:
    import multiprocessing

    torch.set_num_threads(threads)
    if gpus:  # worker k of the pool takes GPU k (modulo the count)
        ident = multiprocessing.current_process()._identity
        spec = {**spec, "device": f"cuda:{(ident[0] - 1 if ident else 0) % gpus}"}
    _WORKER["predictor"] = Predictor.load(spec.pop("model_dir"), **spec)


def _worker_case(case: InputCase, args: tuple) -> Path:
    return _WORKER["predictor"].predict_case(case, *args)


def _label_name(case: InputCase) -> str:
    """The label file's name: the input's format (NIfTI for DICOM; PNG for JPEG, whose lossy
    compression would corrupt label values)."""
    if case.series_uid is not None:
        return f"{case.case_id}.nii.gz"
    suffix = split_suffix(case.paths[0])[1].lower()
    return f"{case.case_id}{'.png' if suffix in ('.jpg', '.jpeg') else suffix}"


def _case_outputs(case: InputCase, probabilities: bool, overlay: bool, dicom_seg: bool) -> list[str]:
    """Every file ``predict_case`` writes for ``case``, relative to the output folder."""
    names = [_label_name(case)]
    if case.series_uid is not None and dicom_seg:
        names.append(f"{case.case_id}.seg.dcm")
    if probabilities:
        names.append(f"{case.case_id}.npz")
    if overlay:
        names.append(f"overlays/{case.case_id}.png")
    return names


def _input_folders(inputs: Path, cases: list[InputCase]) -> set[Path]:
    """The folders the inputs live in (a DICOM series' own folder included), resolved."""
    folders = {inputs.resolve() if inputs.is_dir() else inputs.resolve().parent}
    for case in cases:
        for p in case.paths:
            folders.add(p.resolve() if case.series_uid is not None else p.resolve().parent)
    return folders


@dataclass
class _Manifest:
    """An output folder's ``.medunet-predictions.json``: every file medunet's predict wrote there
    (only those may be overwritten) and, per file, the settings that made it (a re-run with the
    same models and settings skips cases whose outputs are all there)."""

    path: Path
    files: set[str]
    made_with: dict[str, str]
    key: str | None

    @classmethod
    def claim(cls, out_dir: Path, input_folders: set[Path], names: list[list[str]], key: str | None,
              overwrite: bool) -> _Manifest:
        """Check that writing ``names`` (per case) into ``out_dir`` destroys nothing the user
        owns, then list them (before any is written: a killed run can be re-run); the cases
        to redo lose their mark until they are written again."""
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError("output exists and is not a folder", out_dir, "choose another --output folder")
        if out_dir.resolve() in input_folders:
            raise InputError("output folder is an input folder", out_dir,
                             "choose another --output folder: predictions would overwrite or mix with the "
                             "images")
        seen: set[str] = set()
        for name in (n for ns in names for n in ns):
            if name in seen:
                raise InputError(f"two inputs would both write {name}", out_dir,
                                 "rename one of the inputs (CASE.ext and CASE_0000.ext are the same case)")
            seen.add(name)
        path = out_dir / PREDICTIONS_MANIFEST
        try:
            before = json.loads(path.read_text())
            previous = set(before.get("files", []))
            made_with = {k: v for k, v in dict(before.get("made_with", {})).items() if isinstance(v, str)}
        except (OSError, ValueError, AttributeError, TypeError):
            previous, made_with = set(), {}
        for name in seen:
            target = out_dir / name
            if name not in previous and (target.exists() or target.is_symlink()):
                raise InputError("exists and was not written by medunet predict", target,
                                 "choose a new or empty --output folder (ground truth or images there would "
                                 "be overwritten)")
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = cls(path, previous | seen, made_with, key)
        for ns in names:
            if overwrite or not manifest.finished(ns):
                for n in ns:
                    manifest.made_with.pop(n, None)
        manifest.write()
        return manifest

    def finished(self, names: list[str]) -> bool:
        """Every output of a case is there and was made with these settings."""
        return self.key is not None and all(
            self.made_with.get(n) == self.key and (self.path.parent / n).is_file() for n in names)

    def mark(self, names: list[str]) -> None:
        if self.key is not None:
            self.made_with.update(dict.fromkeys(names, self.key))
            self.write()

    def write(self) -> None:
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps({"written_by": "medunet predict", "files": sorted(self.files),
                                       "made_with": self.made_with}, indent=1))


def _check_compatible(members: list[Member]) -> None:
    """Ensemble members must predict the same thing from the same input."""
    first = members[0]
    for m in members[1:]:
        for attr in ("dim", "in_channels", "label_values"):
            a, b = getattr(first.plan, attr), getattr(m.plan, attr)
            if a != b:
                raise InputError(f"models disagree on {attr} ({a} in {first.model_dir}, {b} here)",
                                 m.model_dir, "ensemble only models trained on the same kind of data")
        # the image is cropped and resampled once, as the first model's plan says
        a, b = preprocessing_options(first.plan), preprocessing_options(m.plan)
        geometric = a["crop_nonzero"] or a["resample"] or b["crop_nonzero"] or b["resample"]
        if geometric and (a != b or needs_resampling(m.plan.spacing, first.plan.spacing)):
            raise InputError(f"models disagree on preprocessing ({a}, spacing {first.plan.spacing} in "
                             f"{first.model_dir}; {b}, spacing {m.plan.spacing} here)", m.model_dir,
                             "ensemble only models planned with the same spacing and preprocessing")


def _stored_postprocessing(path: Path) -> dict | None:
    """A choice stored in the plan of a ``fold_*`` parent directory (the ensemble's own)."""
    plan = path / "plan.json"
    if not path.is_dir() or not plan.is_file() or not any(path.glob("fold_*")):
        return None
    try:
        return Plan.load(plan).inference.get("postprocessing")
    except InputError:
        return None


def _save_npz(path: Path, probs: np.ndarray) -> None:
    with atomic_file(path) as tmp, tmp.open("wb") as f:  # a file object: savez adds no suffix
        np.savez_compressed(f, probabilities=probs.astype(np.float32))


def _prepare(net: torch.nn.Module, device: torch.device, dim: int) -> torch.nn.Module:
    net = net.to(device).eval()
    return net.to(memory_format=memory_format(dim)) if channels_last_pays(net) else net


# --------------------------------------------------------------------------------------------
# two-stage cascade (see medunet.training.cascade): a model directory holding ``lowres/``
# (stage 1, trained at a coarse working resolution) and ``fullres/`` (stage 2, whose input is
# the image plus one 0/1 map per foreground class of stage 1's prediction on the image's own
# grid). Its plan.json is stage 1's plan with ``configuration: "cascade"`` and a ``cascade``
# section saying which stages to use: the validation comparison at the end of training may
# keep stage 1 alone. It lives here because Predictor.load returns it for such a directory.


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
             overlap: float | None = None, postprocess: str = "auto") -> CascadePredictor:
        """Load the stages ``plan.cascade`` names (same options as :meth:`Predictor.load`)."""
        model_dir = Path(model_dir)
        plan = Plan.load(model_dir)
        stages = plan.cascade.get("stages") or {}
        use = plan.cascade.get("use", "cascade")
        opts = {"checkpoint": checkpoint, "device": device, "precision": precision, "backend": backend,
                "int8": int8, "overlap": overlap}
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
