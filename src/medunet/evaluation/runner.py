"""``evaluate()``: match prediction and ground-truth files, score them in parallel, summarise.

Files are matched by case id, the file name without its image extension (``drive_01.png``,
``la_007.nii.gz``). Every prediction must have a ground truth; ground-truth cases without a
prediction are allowed (a fold's validation predictions against the whole ``labelsTr``) and
listed in ``meta["gt_without_prediction"]``. Each worker process reads its own files, so only
small metric dicts (and, with probabilities, the in-region pixels for the pooled AUC) travel
between processes.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunet.errors import InputError
from medunet.evaluation.metrics import PooledCurve, compute_metrics, empty_label_metrics
from medunet.evaluation.result import EvaluationResult, build_result
from medunet.io import IMAGE_SUFFIXES, read_label, split_suffix

PROB_SUFFIXES = (".npz", ".npy")
#: below this much estimated in-process work (s) the default ``workers`` stays in-process
POOL_MIN_SECONDS = 3.0


@dataclass(frozen=True)
class CaseJob:
    """Everything a worker needs to score one case (paths only: workers read the files)."""

    case: str
    pred: Path
    gt: Path
    mask: Path | None = None
    probs: Path | None = None
    labels: tuple[int, ...] | None = None
    tolerance: float = 1.0


# ---------------------------------------------------------------------------- matching
def _list_cases(path: Path, what: str) -> dict[str, Path]:
    """``{case id: file}`` for a folder (image files only) or a single file."""
    if not path.exists():
        raise InputError(f"{what} not found", path, "check the path")
    if path.is_file():
        return {split_suffix(path)[0]: path}
    found: dict[str, Path] = {}
    for f in sorted(path.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        stem, suffix = split_suffix(f)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if stem in found:
            raise InputError(
                f"two {what} files for case '{stem}': {found[stem].name} and {f.name}",
                path,
                "keep one file per case",
            )
        found[stem] = f
    if not found:
        raise InputError(
            f"no {what} files in this folder",
            path,
            f"expected label maps named CASE{{{','.join(IMAGE_SUFFIXES)}}}",
        )
    return found


def _file_for_case(folder: Path, case: str, suffixes: Sequence[str], what: str) -> Path:
    """The file of ``case`` in ``folder`` (a single file is used for every case)."""
    if folder.is_file():
        return folder
    for suf in suffixes:
        for name in (f"{case}{suf}", f"{case}_0000{suf}"):
            cand = folder / name
            if cand.is_file():
                return cand
    raise InputError(
        f"no {what} for case '{case}'",
        folder,
        f"add {case}{suffixes[0]} (any of {', '.join(suffixes[:4])}, ...) or drop the option",
    )


def _match(pred: Path, gt: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Pairs ``{case: (pred file, gt file)}`` and the GT cases that have no prediction."""
    preds = _list_cases(pred, "prediction")
    if gt.is_file() and pred.is_file():
        return {next(iter(preds)): (pred, gt)}, []
    gts = _list_cases(gt, "ground truth")
    missing = sorted(set(preds) - set(gts))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(
            f"{len(missing)} prediction(s) have no ground truth in {gt}: {shown}",
            preds[missing[0]],
            "pass the ground-truth folder that belongs to these predictions",
        )
    pairs = {c: (preds[c], gts[c]) for c in sorted(preds)}
    return pairs, sorted(set(gts) - set(preds))


# ----------------------------------------------------------------------------- one case
def _present_labels(*arrays: np.ndarray) -> set[int]:
    out: set[int] = set()
    for a in arrays:
        if a.dtype == np.uint8:
            vals = np.flatnonzero(np.bincount(a.ravel(), minlength=256))
        else:
            vals = np.unique(a)
        out.update(int(v) for v in vals if v != 0)
    return out


def _agreement(probs: np.ndarray, pred: np.ndarray, class_axis: int) -> int:
    """Pixels where the arg-max (or >= 0.5) of ``probs`` equals the prediction."""
    hard = np.argmax(probs, axis=0) if class_axis else (probs >= 0.5).astype(pred.dtype)
    return int(np.count_nonzero(hard == pred))


def _load_probs(path: Path, shape: tuple[int, ...], pred: np.ndarray) -> np.ndarray:
    """Probabilities as ``(C, *shape)`` (or ``shape`` for a single foreground map).

    Singleton axes are ignored and reversed spatial axes (a SimpleITK z,y,x writer) are turned
    round; when both orders fit, the one agreeing better with the prediction wins.
    """
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                keys = list(z.keys())
                key = "probabilities" if "probabilities" in keys else (
                    keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise InputError(
                        f"cannot tell the probability array among {keys}",
                        path,
                        "store it under the key 'probabilities'",
                    )
                arr = z[key]
        else:
            arr = np.load(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read probabilities ({type(exc).__name__}: {exc})", path) from exc
    arr = np.asarray(arr, dtype=np.float32)
    squeezed = tuple(s for s in shape if s != 1)

    def fit(a: np.ndarray, lead: int) -> list[np.ndarray]:
        head, spatial = a.shape[:lead], a.shape[lead:]
        sq = tuple(s for s in spatial if s != 1)
        out = []
        if sq == squeezed:
            out.append(a.reshape(head + shape))
        axes = list(range(lead)) + list(range(a.ndim - 1, lead - 1, -1))
        if len(spatial) > 1 and tuple(s for s in spatial[::-1] if s != 1) == squeezed:
            rev = np.transpose(a, axes).reshape(head + shape)
            if not out or not np.array_equal(rev, out[0]):
                out.append(rev)
        return out

    for lead in (1, 0):
        if arr.ndim < lead + len(squeezed):
            continue
        cands = fit(arr, lead)
        if not cands:
            continue
        if len(cands) > 1:
            cands.sort(key=lambda c, lead=lead: _agreement(c, pred, lead), reverse=True)
        return cands[0]
    raise InputError(
        f"probabilities of shape {arr.shape} do not fit the label shape {shape}",
        path,
        "save them class axis first in the label's array order",
    )


def _run_case(job: CaseJob) -> dict:
    """Read and score one case (runs in a worker process)."""
    gt, geom = read_label(job.gt)
    pred, _ = read_label(job.pred)
    if pred.shape != gt.shape:
        raise InputError(
            f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape} "
            f"({job.gt})",
            job.pred,
            "write predictions in the ground truth's geometry (medunet predict does)",
        )
    mask = None
    if job.mask is not None:
        m, _ = read_label(job.mask)
        if m.shape != gt.shape:
            raise InputError(
                f"mask shape {m.shape} does not match ground-truth shape {gt.shape}", job.mask
            )
        mask = m > 0
    probs = _load_probs(job.probs, gt.shape, pred) if job.probs is not None else None
    present = _present_labels(gt, pred)
    if job.labels is not None:
        labels = list(job.labels)
    else:
        extra = range(1, probs.shape[0]) if probs is not None and probs.ndim > gt.ndim else [1]
        labels = sorted(present | (set(extra) if probs is not None else set()))
    spacing = tuple(geom.spacing[: gt.ndim]) if len(geom.spacing) >= gt.ndim else (1.0,) * gt.ndim
    try:
        metrics = compute_metrics(pred, gt, spacing, labels, mask, probs, job.tolerance)
    except ValueError as exc:
        raise InputError(str(exc), job.probs or job.pred) from exc
    pooled = {}
    if probs is not None:
        roi = mask if mask is not None else np.ones(gt.shape, bool)
        for lab in labels:
            p = probs if probs.ndim == gt.ndim else probs[lab]
            pooled[lab] = (gt[roi] == lab, p[roi].astype(np.float32))
    return {
        "case": job.case,
        "metrics": metrics,
        "present": sorted(present),
        "n_roi": int(mask.sum()) if mask is not None else int(gt.size),
        "spacing": list(spacing),
        "shape": list(gt.shape),
        "fmt": geom.fmt,
        "pooled": pooled,
    }


# ------------------------------------------------------------------------------ running
def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one: fork() of a process running torch threads can deadlock."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # workers fork from a server that has numpy/scipy/nibabel loaded already
    ctx.set_forkserver_preload(["medunet.evaluation.runner"])
    return ctx


def _run_all(
    jobs: list[CaseJob], workers: int, tick: Callable[[str], None], adaptive: bool = False
) -> Iterable[dict]:
    """Yield each case's output as it completes, in-process or over ``workers`` processes.

    With ``adaptive`` the first two cases are scored in-process and the second one's time
    (the first pays for lazy imports) decides: when the rest would take less than
    ``POOL_MIN_SECONDS`` in-process, starting processes (about a second on a small machine)
    would cost more than it saves, so everything stays here.
    """
    if adaptive and workers > 1 and len(jobs) > 2:
        for job in jobs[:2]:
            t0 = time.perf_counter()
            out = _run_case(job)
            tick(job.case)
            yield out
        if (time.perf_counter() - t0) * (len(jobs) - 2) < POOL_MIN_SECONDS:
            workers = 1
        jobs = jobs[2:]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            out = _run_case(job)
            tick(job.case)
            yield out
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_mp_context()) as ex:
        names: dict[Future, str] = {ex.submit(_run_case, job): job.case for job in jobs}
        pending = set(names)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    out = f.result()  # re-raises a worker's InputError here
                    tick(names[f])
                    yield out
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def evaluate(
    pred: str | Path,
    gt: str | Path,
    *,
    mask: str | Path | None = None,
    probs: str | Path | None = None,
    labels: Sequence[int] | None = None,
    tolerance: float = 1.0,
    json_path: str | Path | None = None,
    csv_path: str | Path | None = None,
    report: str | Path | None = None,
    model_dir: str | Path | None = None,
    images: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Score predicted label maps against ground truth, per case and class, and summarise.

    Args:
        pred: folder (or single file) of predicted label maps in any format medunet reads.
        gt: folder (or file) of ground-truth label maps named ``CASE.ext``.
        mask: folder of region masks (value > 0, e.g. DRIVE's field of view); every metric is
            computed inside the region only.
        probs: folder of ``CASE.npz`` (key ``probabilities``, class axis first, channel k =
            label k) or ``CASE.npy``, for ROC-AUC and PR-AUC per case and pooled.
        labels: label values to score; default every non-zero value found in the GT or
            predictions of any case (a label a case lacks is scored there as "both empty").
        tolerance: normalised surface Dice tolerance in physical units (mm for NIfTI).
        json_path, csv_path: write the full result / one row per case and label.
        report: write a self-contained HTML report here.
        model_dir: add the training curves of ``MODEL_DIR/log.csv`` to the report.
        images: images (``CASE_0000.ext`` or ``CASE.ext``) to draw the report's overlays on.
        workers: processes over cases; 1 runs in-process. Default ``min(cpu_count, 4)``,
            but only when the first cases show the rest would take more than a few seconds
            (starting processes costs about a second).
        progress: show a progress bar on stderr.

    Raises:
        InputError: missing folders, a prediction without GT, shape mismatches, unreadable
            files, a missing mask or probability file.

    Example:
        >>> res = evaluate("pred", "labelsTs", mask="masksTs", report="report.html")
        >>> res.metric(1, "dice", kind="pooled")
    """
    t0 = time.perf_counter()
    pred, gt = Path(pred), Path(gt)
    pairs, unmatched = _match(pred, gt)
    mask_dir = Path(mask) if mask is not None else None
    prob_dir = Path(probs) if probs is not None else None
    for p, what in ((mask_dir, "mask folder"), (prob_dir, "probability folder")):
        if p is not None and not p.exists():
            raise InputError(f"{what} not found", p, "check the path")
    if images is not None and not Path(images).exists():
        raise InputError("image folder not found", images, "check the path")
    lab_tuple = tuple(int(x) for x in labels) if labels is not None else None
    if lab_tuple is not None and not lab_tuple:
        raise InputError("no labels to score", None, "pass at least one label value")
    jobs = [
        CaseJob(
            case=c,
            pred=pp,
            gt=gp,
            mask=_file_for_case(mask_dir, c, IMAGE_SUFFIXES, "mask") if mask_dir else None,
            probs=_file_for_case(prob_dir, c, PROB_SUFFIXES, "probability file")
            if prob_dir
            else None,
            labels=lab_tuple,
            tolerance=float(tolerance),
        )
        for c, (pp, gp) in pairs.items()
    ]
    adaptive = workers is None
    n_workers = _default_workers() if workers is None else max(1, int(workers))

    outputs: list[dict] = []
    if progress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]evaluating[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            transient=False,
        )
        with bar:
            task = bar.add_task("", total=len(jobs))
            def tick(case: str) -> None:
                bar.update(task, advance=1, description=case)

            outputs = list(_run_all(jobs, n_workers, tick, adaptive))
    else:
        outputs = list(_run_all(jobs, n_workers, lambda c: None, adaptive))
    outputs.sort(key=lambda o: o["case"])

    # labels: the ones asked for, or every value seen anywhere
    if lab_tuple is not None:
        final_labels = list(lab_tuple)
    else:
        final_labels = sorted(set().union(*(o["present"] for o in outputs)))
        if not final_labels:  # GT and predictions all empty: score label 1 as "both empty"
            final_labels = [1]
    with_probs = prob_dir is not None
    for o in outputs:
        for lab in final_labels:
            if lab not in o["metrics"]:
                o["metrics"][lab] = empty_label_metrics(o["n_roi"], o["spacing"], with_probs)

    curves: dict[int, dict] = {}
    if with_probs:
        for lab in final_labels:
            acc = PooledCurve()
            for o in outputs:
                if lab in o["pooled"]:
                    y, s = o["pooled"].pop(lab)
                    acc.add(y, s)
            curves[lab] = acc.curves()
    fmts = {o["fmt"] for o in outputs}
    meta = {
        "pred": str(pred.resolve()),
        "gt": str(gt.resolve()),
        "mask": str(mask_dir.resolve()) if mask_dir else None,
        "probs": str(prob_dir.resolve()) if prob_dir else None,
        "images": str(Path(images).resolve()) if images is not None else None,
        "n_cases": len(outputs),
        "labels": final_labels,
        "tolerance": float(tolerance),
        "distance_units": "mm" if fmts & {"nifti", "itk"} else "pixels",
        "gt_without_prediction": unmatched,
        "pooled_auc_method": {str(k): v["method"] for k, v in curves.items()},
        "files": {
            j.case: {
                "pred": str(j.pred),
                "gt": str(j.gt),
                "mask": str(j.mask) if j.mask else None,
            }
            for j in jobs
        },
        "spacing": {o["case"]: o["spacing"] for o in outputs},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    result = build_result(outputs, final_labels, meta, curves, with_probs)
    if json_path is not None:
        result.write_json(json_path)
    if csv_path is not None:
        result.write_csv(csv_path)
    if report is not None:
        from medunet.evaluation.report import write_report

        write_report(result, report, images=images, model_dir=model_dir)
    result.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return result
