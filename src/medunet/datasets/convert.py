"""``medunet convert``: bring other dataset layouts into the nnU-Net v2 raw layout.

Sources:

* a Medical Segmentation Decathlon task folder (``dataset.json`` with ``modality``, ``labels``,
  ``training`` and ``test`` lists): multi-modal 4D NIfTI images are split into one 3D file per
  channel (``CASE_0000``, ``CASE_0001``, ...) with the source header's placement kept; 3D
  images and labels are copied byte for byte; macOS ``._`` entries are skipped.
* a folder with ``images/`` and ``masks/`` (or ``labels/``), any format :mod:`medunet.io` reads,
  masks matched by stem (``CASE``, ``CASE_mask``, ...): mask values (0/255, 0/100/200, ...)
  become consecutive class indices 0..K and the mapping is recorded in ``dataset.json``.

The output is written into a hidden temporary folder beside the destination, checked with
:func:`find_dataset` + :func:`validate_dataset`, and renamed into place only when complete:
a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medunet.datasets.dataset import find_dataset, validate_dataset
from medunet.errors import InputError
from medunet.files import publish
from medunet.io import Geometry, read_image, read_label, split_suffix, write_image

# volume formats hold one channel per file in the nnU-Net layout; 2D natural formats keep
# RGB channels together in one file (as nnU-Net's NaturalImage2DIO reads them)
_VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
# lossless endings an output may keep when every source file already uses it
_KEEP_ENDINGS = (".png", ".tif", ".tiff", ".bmp") + _VOLUME_ENDINGS
MAX_MASK_VALUES = 32  # more distinct mask values than this is a grey image, not a label map
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class _Item:
    """One case to write: source image and label files (label None for test cases)."""

    case_id: str
    image: Path
    label: Path | None = None


@dataclass
class _Plan:
    """What a source layout says about the output, before any pixel is written."""

    layout: str  # "msd" or "folders"
    source: Path
    name: str
    channel_names: list[str]
    labels: dict[str, int] = field(default_factory=dict)  # name -> class index (MSD: declared)
    train: list[_Item] = field(default_factory=list)
    test: list[_Item] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # dataset.json keys carried over


def convert_dataset(src: str | Path, dst: str | Path, *, name: str | None = None,
                    dataset_id: int | None = None, progress: bool = False) -> Path:
    """Convert ``src`` (MSD task or images/ + masks/ folder) into an nnU-Net v2 raw dataset.

    ``dst`` is the dataset folder to create; with ``dataset_id`` it is the raw root instead and
    the dataset goes to ``dst/DatasetNNN_NAME`` (nnU-Net's naming, so ``nnUNetv2_*`` find it by
    id). ``name`` defaults to the task name (``Task04_Hippocampus`` -> ``Hippocampus``) or the
    source folder's name. Returns the dataset folder. Raises :class:`InputError` naming the
    file and the fix on any bad input, and then leaves no destination behind.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError("source folder not found", src, "pass an MSD task folder or a folder "
                         "with images/ and masks/")
    plan = _read_source(src)
    if name is not None:
        if not _NAME_RE.match(name):
            raise InputError(f"dataset name '{name}' is not a plain folder name",
                             fix="use letters, digits, '_', '-' and '.' only")
        plan.name = name
    dst = Path(dst)
    if dataset_id is not None:
        if not 1 <= dataset_id <= 999:
            raise InputError(f"dataset id {dataset_id} is out of range", fix="use 1..999 (nnU-Net ids)")
        dst = dst / f"Dataset{dataset_id:03d}_{plan.name}"
        plan.name = dst.name
    elif name is None:
        plan.name = dst.name
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError("destination already exists and is not empty", dst,
                         "choose a new folder or remove this one")
    created = _make_parents(dst.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".converting", dir=dst.parent))
    except OSError as exc:
        _remove_empty(created)
        raise InputError(f"cannot write here ({exc.strerror or exc})", dst.parent) from exc
    try:
        _write(plan, tmp, progress)
        _check_output(tmp, plan, src)
        if dst.exists():
            dst.rmdir()  # empty (checked above); os.replace needs the name free on every OS
        publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    return dst


# ------------------------------------------------------------------------------ source layouts


def _read_source(src: Path) -> _Plan:
    meta_path = src / "dataset.json"
    meta = _read_json(meta_path) if meta_path.is_file() else None
    if meta is not None and "training" in meta:
        return _read_msd(src, meta, meta_path)
    if (src / "images").is_dir():
        return _read_folders(src, meta)
    if meta is not None and "channel_names" in meta and (src / "imagesTr").is_dir():
        raise InputError("already in the nnU-Net v2 layout", src, "use it directly (medunet plan/train)")
    raise InputError("no dataset found", src, "expected an MSD task (dataset.json with 'training') "
                     "or a folder with images/ and masks/")


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read JSON ({exc})".replace("\n", " "), path,
                         "fix or restore dataset.json") from exc
    if not isinstance(meta, dict):
        raise InputError("expected a JSON object", path, "see the Decathlon dataset.json format")
    return meta


def _read_msd(src: Path, meta: dict, meta_path: Path) -> _Plan:
    """MSD ``dataset.json``: ``modality`` -> channel names, ``labels`` {"0": name} -> {name: 0}."""
    fix = "see the Decathlon dataset.json format"
    modality = meta.get("modality")
    if not isinstance(modality, dict) or not modality:
        raise InputError("'modality' is missing or empty", meta_path, fix)
    try:
        keys = sorted(modality, key=int)
    except ValueError as exc:
        raise InputError('modality keys must be channel numbers ("0", "1", ...)', meta_path, fix) from exc
    if [int(k) for k in keys] != list(range(len(keys))):
        raise InputError("modality must number channels 0, 1, 2, ... without gaps", meta_path, fix)
    labels_in = meta.get("labels")
    if not isinstance(labels_in, dict) or not labels_in:
        raise InputError("'labels' is missing or empty", meta_path, fix)
    try:
        labels = {str(n): int(v) for v, n in sorted(labels_in.items(), key=lambda kv: int(kv[0]))}
    except (TypeError, ValueError) as exc:
        raise InputError('labels keys must be integer values ("0", "1", ...)', meta_path, fix) from exc
    if 0 not in labels.values() or len(labels) != len(labels_in):
        raise InputError("labels must declare background '0' and give each value its own name",
                         meta_path, fix)
    train = [_msd_item(src, e, meta_path, need_label=True) for e in _entries(meta, "training", meta_path)]
    train = [t for t in train if t is not None]
    test = [_msd_item(src, e, meta_path, need_label=False) for e in _entries(meta, "test", meta_path)]
    test = [t for t in test if t is not None]
    if not train:
        raise InputError("'training' lists no cases", meta_path, "list the labelled cases there")
    _unique_ids(train + test, meta_path)
    task = str(meta.get("name") or src.name)
    default_name = re.sub(r"^Task\d+_", "", src.name) or task
    extra = {k: meta[k] for k in ("description", "reference", "licence", "release", "tensorImageSize")
             if k in meta}
    return _Plan("msd", src, _safe_name(default_name), [str(modality[k]) for k in keys], labels,
                 train, test, extra)


def _entries(meta: dict, key: str, meta_path: Path) -> list:
    value = meta.get(key, [])
    if not isinstance(value, list):
        raise InputError(f"'{key}' must be a list", meta_path, "see the Decathlon dataset.json format")
    return value


def _msd_item(src: Path, entry: Any, meta_path: Path, need_label: bool) -> _Item | None:
    image = entry.get("image") if isinstance(entry, dict) else entry
    label = entry.get("label") if isinstance(entry, dict) else None
    if not isinstance(image, str) or (need_label and not isinstance(label, str)):
        raise InputError(f"bad entry {entry!r}", meta_path,
                         'write entries as {"image": "./imagesTr/x.nii.gz", '
                         '"label": "./labelsTr/x.nii.gz"}')
    if Path(image).name.startswith("._"):  # macOS resource forks copied from the archives
        return None
    img = src / image
    if not img.is_file():
        raise InputError("image listed in dataset.json is missing", img,
                         "restore the file or remove its entry from dataset.json")
    lab = None
    if need_label:
        lab = src / str(label)
        if not lab.is_file():
            raise InputError("label listed in dataset.json is missing", lab,
                             "restore the file or remove its entry from dataset.json")
    return _Item(split_suffix(img)[0], img, lab)


def _read_folders(src: Path, meta: dict | None) -> _Plan:
    ds = find_dataset(src)  # lists images/ and matches masks by stem; skips hidden/._ files
    if not ds.train:
        raise InputError("no images found", src / "images",
                         "put the images there (PNG, JPG, TIFF, NIfTI, NRRD or MHA)")
    items = []
    for case in ds.train:
        if case.label_path is None:
            raise InputError(f"image has no mask (looked for masks/{case.case_id}.* and "
                             f"{case.case_id}_mask.*)", case.image_paths[0],
                             "add its mask or remove the image")
        items.append(_Item(case.case_id, case.image_paths[0], case.label_path))
    names: dict[int, str] = {}
    if meta is not None and isinstance(meta.get("labels"), dict):  # names the user gave
        for n, v in meta["labels"].items():
            if isinstance(v, int):
                names[v] = str(n)
    return _Plan("folders", src, _safe_name(src.name), list(ds.channel_names), {}, items, [],
                 {"label_names": names})


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "dataset"


def _unique_ids(items: list[_Item], where: Path) -> None:
    seen: dict[str, Path] = {}
    for it in items:
        if it.case_id in seen:
            raise InputError(f"case '{it.case_id}' appears twice ({seen[it.case_id]}, {it.image})",
                             where, "give each case one entry")
        seen[it.case_id] = it.image


# ------------------------------------------------------------------------------------ writing


def _write(plan: _Plan, out: Path, progress: bool) -> None:
    ending = _output_ending(plan)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if plan.test else ()):
        (out / sub).mkdir()
    mapping: dict[int, int] | None = None
    if plan.layout == "folders":
        mapping = _label_mapping(plan)
    work = [(it, "Tr") for it in plan.train] + [(it, "Ts") for it in plan.test]
    for it, split in _progress(work, progress, f"converting {plan.layout}"):
        image, geom = read_image(it.image)
        if image.shape[0] != len(plan.channel_names):
            raise InputError(f"image has {image.shape[0]} channel(s) but the dataset has "
                             f"{len(plan.channel_names)} ({', '.join(plan.channel_names)})", it.image,
                             "give every case the same channels (and fix 'modality' for MSD)")
        _write_image(it, image, geom, out / f"images{split}", ending)
        if it.label is not None:
            _write_label(it, image.shape[1:], out / "labelsTr" / f"{it.case_id}{ending}", mapping, plan)
    labels = plan.labels
    meta: dict[str, Any] = {
        "name": plan.name,
        "channel_names": {str(i): n for i, n in enumerate(plan.channel_names)},
        "labels": labels,
        "numTraining": len(plan.train),
        "file_ending": ending,
    }
    if plan.test:
        meta["numTest"] = len(plan.test)
    if mapping is not None:
        meta["label_mapping"] = {str(v): i for v, i in mapping.items()}  # source value -> class
    meta.update({k: v for k, v in plan.extra.items() if k != "label_names"})
    meta["converted_from"] = {"layout": plan.layout, "path": str(plan.source.resolve())}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _output_ending(plan: _Plan) -> str:
    """Keep the source's ending when every file shares a lossless one; else PNG (2D) or NIfTI (3D).

    nnU-Net wants one ending for images and labels alike, and masks cannot be stored as JPEG.
    """
    if plan.layout == "msd":
        return ".nii.gz"
    items = plan.train + plan.test
    endings = {split_suffix(p)[1].lower() for it in items for p in (it.image, it.label) if p is not None}
    if len(endings) == 1 and (e := endings.pop()) in _KEEP_ENDINGS:
        return ".tif" if e == ".tiff" else e
    is_3d = any(split_suffix(it.image)[1].lower() in _VOLUME_ENDINGS for it in items)
    return ".nii.gz" if is_3d else ".png"


def _write_image(it: _Item, image: np.ndarray, geom: Geometry, folder: Path, ending: str) -> None:
    """Copy the file when it already fits; split channels for volume formats; else re-encode."""
    same = split_suffix(it.image)[1].lower() == ending
    per_channel = ending in _VOLUME_ENDINGS or image.ndim == 4
    if same and ending in _VOLUME_ENDINGS and image.shape[0] == 1:
        # a copy keeps the whole header (scaling, description) and the exact bytes; 2D files
        # are re-encoded instead, which drops what medunet ignores too (alpha, palettes)
        shutil.copyfile(it.image, folder / f"{it.case_id}_0000{ending}")
        return
    if per_channel:
        for c in range(image.shape[0]):
            write_image(folder / f"{it.case_id}_{c:04d}{ending}", image[c], geom)
    else:
        write_image(folder / f"{it.case_id}_0000{ending}", image, geom)


def _write_label(it: _Item, shape: tuple[int, ...], path: Path, mapping: dict[int, int] | None,
                 plan: _Plan) -> None:
    assert it.label is not None
    lab, geom = read_label(it.label)
    if lab.shape != tuple(shape):
        raise InputError(f"label shape {lab.shape} does not match image shape {tuple(shape)} "
                         f"({it.image.name})", it.label, "labels must have their image's size")
    values = np.unique(lab).tolist()
    if mapping is None:  # MSD: values as declared, file copied unchanged
        unknown = sorted(set(values) - set(plan.labels.values()))
        if unknown:
            raise InputError(f"label values {unknown} are not declared in dataset.json "
                             f"({sorted(plan.labels.values())})", it.label,
                             "add them to 'labels' in dataset.json or fix the label file")
        if split_suffix(it.label)[1].lower() == split_suffix(path)[1].lower():
            shutil.copyfile(it.label, path)
        else:
            write_image(path, lab, geom)
        return
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for v, i in mapping.items():
        lut[v] = i
    write_image(path, lut[lab], geom)


def _label_mapping(plan: _Plan) -> dict[int, int]:
    """Read every mask once: its distinct values, in order, become classes 0..K (0 stays 0)."""
    found: set[int] = {0}
    for it in plan.train:
        assert it.label is not None
        lab, _ = read_label(it.label)
        vals = np.unique(lab).tolist()
        if vals[0] < 0:
            raise InputError(f"mask has negative values {[v for v in vals if v < 0]}", it.label,
                             "store classes as values 0, 1, 2, ... (or 0/255)")
        if len(vals) > MAX_MASK_VALUES:
            raise InputError(f"mask has {len(vals)} distinct values: it looks like a grey image, "
                             "not a label map", it.label,
                             "save masks losslessly (PNG, not JPEG) with one value per class")
        found.update(vals)
    if len(found) > MAX_MASK_VALUES:
        raise InputError(f"the masks hold {len(found)} distinct values together", plan.train[0].label,
                         "save masks losslessly (PNG, not JPEG) with one value per class")
    if len(found) < 2:
        raise InputError("the masks contain only background (0)", plan.train[0].label,
                         "add foreground to the masks")
    values = sorted(found)
    given: dict[int, str] = plan.extra.get("label_names", {})
    names = []
    for v in values:
        if v in given:
            names.append(given[v])
        elif v == 0:
            names.append("background")
        elif len(values) == 2:
            names.append("foreground")
        else:
            names.append(f"class_{v}")
    if len(set(names)) != len(names):
        names = ["background" if v == 0 else f"class_{v}" for v in values]
    plan.labels = {n: i for i, n in enumerate(names)}
    return {v: i for i, v in enumerate(values)}


def _check_output(out: Path, plan: _Plan, src: Path) -> None:
    """Read the result back as medunet and nnU-Net will: a last check before it appears."""
    try:
        ds = find_dataset(out)
        validate_dataset(ds, "train")
        if plan.test:
            validate_dataset(ds, "test", require_labels=False)
    except InputError as exc:
        raise InputError(f"the converted dataset does not validate ({exc})", src,
                         "fix the source files named above") from exc


def _progress(items: list, enabled: bool, label: str) -> Iterator:
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=label)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last) so a failure can remove them."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder ({exc.strerror or exc})", folder) from exc
    return missing[::-1]


def _remove_empty(folders: Iterable[Path]) -> None:
    for p in reversed(list(folders)):
        with contextlib.suppress(OSError):
            p.rmdir()
