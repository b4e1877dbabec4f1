"""Preprocessed training cases on disk, memory-mapped when used.

Each case is cropped, resampled and normalised once (``preprocess_case``) and written as
``{id}_img.npy`` (float32 ``(C, *S)``), ``{id}_seg.npy`` (uint8 class indices) and
``{id}.json``. The json records what the arrays were made from: the source files (path, size,
modification time), a hash of the plan fields that change preprocessing and the
:class:`~medunet.preprocessing.pipeline.PreprocessInfo`. A later call reuses a case whose json
still matches and recomputes it otherwise, so editing a source file or the plan's
normalisation never leaves stale arrays behind. Training opens the arrays with
``mmap_mode="r"``: the operating system pages in the patches it reads, and a dataset larger
than RAM trains.

Every file is written under a temporary name and renamed, the json last: a killed run leaves
either a complete case or one whose json does not match (recomputed next time).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medunet.datasets import Case, Dataset, load_case
from medunet.errors import InputError
from medunet.files import atomic_file

if TYPE_CHECKING:  # planning sits above preprocessing: ``plan`` is a medunet.planning.Plan
    from medunet.preprocessing.pipeline import PreprocessInfo

CACHE_VERSION = 1
# the plan fields that change the cached arrays; anything else (patch, network, training) does not
PLAN_KEYS = ("spacing", "normalization", "preprocessing", "label_values", "channel_names")


@dataclass
class CachedCase:
    """One preprocessed case on disk."""

    case_id: str
    image_path: Path
    label_path: Path | None
    info: dict  # PreprocessInfo.to_dict()

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(image, label)`` as read-only memory maps (label None for an unlabelled case)."""
        image = np.load(self.image_path, mmap_mode="r")
        label = np.load(self.label_path, mmap_mode="r") if self.label_path is not None else None
        return image, label

    def preprocess_info(self) -> PreprocessInfo:
        """The geometry record needed to map predictions back to the source image."""
        from medunet.preprocessing.pipeline import PreprocessInfo

        return PreprocessInfo.from_dict(self.info)


def plan_hash(plan) -> str:
    """A short hash of the plan fields that affect preprocessing (and the cache format)."""
    key = {k: getattr(plan, k) for k in PLAN_KEYS}
    key["cache_version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sources(case: Case) -> list[dict]:
    out = []
    for p in [*case.image_paths, *([case.label_path] if case.label_path is not None else [])]:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise InputError(f"cannot read source file ({exc.strerror})", p) from exc
        out.append({"path": str(Path(p).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _paths(cache_dir: Path, case_id: str) -> tuple[Path, Path, Path]:
    return cache_dir / f"{case_id}_img.npy", cache_dir / f"{case_id}_seg.npy", cache_dir / f"{case_id}.json"


def _atomic_write(path: Path, write: Callable[[object], None], binary: bool = True) -> None:
    with atomic_file(path) as tmp, tmp.open("wb" if binary else "w") as f:
        write(f)


def _cached(case: Case, cache_dir: Path, expected: dict) -> CachedCase | None:
    """The case as cached, when its json matches ``expected`` and its arrays exist."""
    img, seg, meta_path = _paths(cache_dir, case.case_id)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if any(meta.get(k) != v for k, v in expected.items()):
        return None
    shape = _npy_shape(img, np.float32)
    if shape is None or list(shape) != meta.get("image_shape"):
        return None
    has_label = case.label_path is not None
    if has_label and _npy_shape(seg, np.uint8) != shape[1:]:
        return None
    return CachedCase(case.case_id, img, seg if has_label else None, meta.get("info", {}))


def _npy_shape(path: Path, dtype: type) -> tuple[int, ...] | None:
    """The shape of a complete, C-ordered ``.npy`` of ``dtype``; None for a missing, truncated or
    otherwise damaged file (a disk full or a copy gone wrong), which is then recomputed rather
    than failing later in a memory map. Reads the header only."""
    try:
        with path.open("rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read is None:
                return None
            shape, fortran, dt = read(f)
            offset = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, SyntaxError, TypeError):
        return None
    if fortran or dt != np.dtype(dtype) or size != offset + int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
        return None
    return tuple(int(n) for n in shape)


def _process(case: Case, dataset: Dataset, plan, cache_dir: Path, expected: dict) -> CachedCase:
    """Load, preprocess and write one case (runs in a worker process when workers > 1)."""
    from medunet.preprocessing.pipeline import preprocess_case

    raw, label, geom = load_case(case, dataset)
    spacing = list(geom.spacing[-(raw.ndim - 1):])
    image, seg, info = preprocess_case(raw, spacing, plan, label=label, normalise=True)
    del raw, label
    img_path, seg_path, meta_path = _paths(cache_dir, case.case_id)
    meta_path.unlink(missing_ok=True)  # a crash below must not leave an old json beside new arrays
    image = np.ascontiguousarray(image, dtype=np.float32)
    _atomic_write(img_path, lambda f: np.save(f, image))
    if seg is not None:
        if int(seg.max(initial=0)) > 255:
            raise InputError("more than 256 classes cannot be cached as uint8", case.label_path)
        seg = np.ascontiguousarray(seg, dtype=np.uint8)
        _atomic_write(seg_path, lambda f: np.save(f, seg))
    meta = {**expected, "case_id": case.case_id, "info": info.to_dict(),
            "image_shape": list(image.shape), "has_label": seg is not None}
    _atomic_write(meta_path, lambda f: json.dump(meta, f, indent=1), binary=False)
    return CachedCase(case.case_id, img_path, seg_path if seg is not None else None, meta["info"])


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one: fork() of a process running torch threads can deadlock."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["medunet.preprocessing.cache"])
    return ctx


def _select(dataset: Dataset, case_ids: Sequence[str] | None) -> list[Case]:
    if case_ids is None:
        return list(dataset.train)
    by_id = {c.case_id: c for c in [*dataset.train, *dataset.test]}
    missing = [c for c in case_ids if c not in by_id]
    if missing:
        raise InputError(f"cases not in the dataset: {', '.join(missing[:5])}", dataset.root,
                         "check the case ids (splits.json)")
    return [by_id[c] for c in case_ids]


def _run(todo: list[tuple[Case, dict]], dataset: Dataset, plan, cache_dir: Path,
         workers: int, tick: Callable[[], None]) -> Iterable[CachedCase]:
    if workers <= 1 or len(todo) <= 1:
        for case, expected in todo:
            yield _process(case, dataset, plan, cache_dir, expected)
            tick()
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_mp_context()) as ex:
        pending: set[Future] = {ex.submit(_process, case, dataset, plan, cache_dir, expected)
                                for case, expected in todo}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    yield f.result()  # re-raises a worker's InputError here
                    tick()
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def preprocess_dataset(dataset: Dataset, plan, cache_dir: str | Path,
                       case_ids: Sequence[str] | None = None, workers: int = 2,
                       progress: bool = True) -> dict[str, CachedCase]:
    """Preprocess cases into ``cache_dir`` (reusing up-to-date ones); returns them by case id.

    Args:
        dataset: the dataset (``find_dataset``; label values filled in by validation).
        plan: the plan whose spacing, normalisation and preprocessing the arrays follow.
        cache_dir: folder for ``{id}_img.npy``, ``{id}_seg.npy`` and ``{id}.json``.
        case_ids: which cases (training or test); default every training case.
        workers: processes for the cases to (re)compute; 1 works in this process.
        progress: show a progress bar.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cases = _select(dataset, case_ids)
    phash = plan_hash(plan)
    result: dict[str, CachedCase] = {}
    todo: list[tuple[Case, dict]] = []
    for case in cases:
        expected = {"cache_version": CACHE_VERSION, "plan_hash": phash, "sources": _sources(case)}
        hit = _cached(case, cache_dir, expected)
        if hit is not None:
            result[case.case_id] = hit
        else:
            todo.append((case, expected))
    if todo:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), disable=not progress, transient=True) as bar:
            task = bar.add_task(f"preprocessing {len(todo)} case(s)", total=len(todo))
            for done in _run(todo, dataset, plan, cache_dir, workers, lambda: bar.advance(task)):
                result[done.case_id] = done
    return {c.case_id: result[c.case_id] for c in cases}
