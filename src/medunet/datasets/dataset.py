"""Dataset discovery for the nnU-Net v2 raw layout and plain image/mask folder pairs.

nnU-Net v2 layout::

    DATA/dataset.json  imagesTr/CASE_0000.ext [CASE_0001.ext ...]  labelsTr/CASE.ext
         imagesTs/ labelsTs/ (optional)

As in nnU-Net, one channel file may hold several channels (an RGB PNG is channels R, G, B in
one ``CASE_0000.png``): ``channel_names`` counts channels, not files.

Folder pairs::

    DATA/images/CASE.ext  DATA/masks/CASE.ext   (also labels/; a mask may be named CASE_mask.ext)

For folder pairs without a ``dataset.json`` the label values are read from the masks, and a
binary 0/255 mask becomes classes {0, 1}: that is how most exported masks look.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medunet.errors import InputError
from medunet.io import IMAGE_SUFFIXES, Geometry, all_finite, read_image, read_label, split_suffix

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class Case:
    """One case: its channel files (in channel order) and its label file, if any."""

    case_id: str
    image_paths: list[Path]
    label_path: Path | None = None


@dataclass
class Dataset:
    """A dataset folder: metadata plus training and test cases."""

    root: Path
    name: str
    layout: str  # "nnunet" or "folders"
    channel_names: list[str]
    label_names: list[str]
    label_values: list[int]  # raw value in the files for each class index
    file_ending: str
    train: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)


def _is_image(p: Path) -> bool:
    return (
        p.is_file()
        and not p.name.startswith(".")
        and split_suffix(p)[1].lower() in IMAGE_SUFFIXES
    )


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read JSON ({exc})".replace("\n", " "), path) from exc
    if not isinstance(meta, dict):
        raise InputError("expected a JSON object", path, "see the nnU-Net v2 dataset.json format")
    return meta


def find_dataset(root: str | Path) -> Dataset:
    """Recognise the layout of ``root`` and list its cases.

    Reads no pixels for the nnU-Net layout; for image/mask folders it opens the first image
    to count its channels.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            "dataset folder not found",
            root,
            "pass the folder holding dataset.json or images/ + masks/",
        )
    if (root / "imagesTr").is_dir():
        return _find_nnunet(root)
    images = root / "images"
    masks = next((root / n for n in ("masks", "labels", "labelsTr") if (root / n).is_dir()), None)
    if images.is_dir():
        return _find_folders(root, images, masks)
    raise InputError(
        "no dataset found",
        root,
        "expected imagesTr/ + labelsTr/ + dataset.json (nnU-Net v2) or images/ + masks/",
    )


def _find_nnunet(root: Path) -> Dataset:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError(
            "dataset.json is missing", meta_path, "add it (channel_names, labels, file_ending)"
        )
    meta = _read_json(meta_path)
    for key in ("channel_names", "labels"):
        if not isinstance(meta.get(key), dict):
            raise InputError(
                f"'{key}' is missing or not an object",
                meta_path,
                "see the nnU-Net v2 dataset.json format",
            )
    channel_names = _channel_names(meta["channel_names"], meta_path)
    items = _label_items(meta["labels"], meta_path)
    file_ending = str(meta.get("file_ending", "")) or None
    train = _nnunet_cases(root / "imagesTr", root / "labelsTr", len(channel_names), file_ending)
    test = []
    if (root / "imagesTs").is_dir():
        test = _nnunet_cases(root / "imagesTs", root / "labelsTs", len(channel_names), file_ending)
    ending = file_ending or (split_suffix(train[0].image_paths[0])[1] if train else "")
    return Dataset(
        root=root,
        name=str(meta.get("name", root.name)),
        layout="nnunet",
        channel_names=channel_names,
        label_names=[n for _, n in items],
        label_values=[v for v, _ in items],
        file_ending=ending,
        train=train,
        test=test,
    )


def _channel_names(channels: dict, meta_path: Path) -> list[str]:
    try:
        keys = sorted(channels, key=int)
    except ValueError as exc:
        raise InputError(
            'channel_names keys must be channel numbers ("0", "1", ...)', meta_path
        ) from exc
    if not keys or [int(k) for k in keys] != list(range(len(keys))):
        raise InputError("channel_names must number channels 0, 1, 2, ... without gaps", meta_path)
    return [str(channels[k]) for k in keys]


def _label_items(labels: dict, meta_path: Path) -> list[tuple[int, str]]:
    items = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputError(
                f"region-based label '{name}' is not supported",
                meta_path,
                "give each label one integer value",
            )
        try:
            items.append((int(value), str(name)))
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"label '{name}' has a non-integer value {value!r}", meta_path
            ) from exc
    items.sort()
    if not items or items[0][0] != 0:
        raise InputError("labels must include background = 0", meta_path)
    values = [v for v, _ in items]
    if len(set(values)) != len(values):
        raise InputError(f"labels repeat a value ({values})", meta_path, "give each label its own")
    return items


def _nnunet_cases(img_dir: Path, lab_dir: Path, n_channels: int, ending: str | None) -> list[Case]:
    """Group channel files by case.

    A file may hold several channels (RGB), so a case has between 1 and ``n_channels`` files,
    numbered from 0 without gaps and the same for every case; ``validate_dataset`` checks that
    they add up to ``n_channels`` channels.
    """
    groups: dict[str, dict[int, Path]] = {}
    for p in sorted(img_dir.iterdir()):
        if not _is_image(p) or (ending and not p.name.endswith(ending)):
            continue
        stem = split_suffix(p)[0]
        m = _CHANNEL_RE.match(stem)
        if not m:
            raise InputError(
                "image name lacks the channel suffix",
                p,
                "name images CASE_0000.ext (nnU-Net v2 layout)",
            )
        ch = int(m["ch"])
        if ch >= n_channels:
            raise InputError(
                f"channel file _{ch:04d} but dataset.json declares {n_channels} channel(s)",
                p,
                "fix channel_names in dataset.json or remove the file",
            )
        groups.setdefault(m["case"], {})[ch] = p
    n_files = max((max(chans) + 1 for chans in groups.values()), default=0)
    cases = []
    for case_id, chans in sorted(groups.items()):
        missing = [c for c in range(n_files) if c not in chans]
        if missing:
            names = ", ".join(f"{case_id}_{c:04d}" for c in missing)
            raise InputError(
                f"case '{case_id}' lacks channel file(s) {names}",
                img_dir,
                f"every case needs the same {n_files} channel file(s)",
            )
        label = None
        if lab_dir.is_dir():
            label = next((q for q in _candidates(lab_dir, case_id) if q.is_file()), None)
        cases.append(Case(case_id, [chans[c] for c in range(n_files)], label))
    return cases


def _candidates(folder: Path, case_id: str) -> Iterable[Path]:
    for stem in (case_id, f"{case_id}_mask", f"{case_id}_label", f"{case_id}_seg"):
        for suf in IMAGE_SUFFIXES:
            yield folder / f"{stem}{suf}"


def _find_folders(root: Path, images: Path, masks: Path | None) -> Dataset:
    cases = []
    seen: dict[str, Path] = {}
    for p in sorted(images.iterdir()):
        if not _is_image(p):
            continue
        case_id = split_suffix(p)[0]
        if case_id in seen:
            raise InputError(
                f"two images for case '{case_id}' ({seen[case_id].name}, {p.name})",
                p,
                "keep one file per case",
            )
        seen[case_id] = p
        label = None
        if masks is not None:
            label = next((q for q in _candidates(masks, case_id) if q.is_file()), None)
        cases.append(Case(case_id, [p], label))
    meta = {}
    if (root / "dataset.json").is_file():
        meta = _read_json(root / "dataset.json")
    if isinstance(meta.get("labels"), dict):
        items = _label_items(meta["labels"], root / "dataset.json")
        values = [v for v, _ in items]
        names = [n for _, n in items]
    else:
        values, names = [], []  # filled in by validate_dataset from the masks
    n_ch = 1
    if cases:
        arr, _ = read_image(cases[0].image_paths[0])
        n_ch = arr.shape[0]
    channel_names = ["R", "G", "B"] if n_ch == 3 else [f"channel{i}" for i in range(n_ch)]
    if isinstance(meta.get("channel_names"), dict):
        channel_names = _channel_names(meta["channel_names"], root / "dataset.json")
    return Dataset(
        root=root,
        name=str(meta.get("name", root.name)),
        layout="folders",
        channel_names=channel_names,
        label_names=names,
        label_values=values,
        file_ending=split_suffix(cases[0].image_paths[0])[1] if cases else "",
        train=cases,
    )


def find_unlabeled(dataset: Dataset, folder: str | Path | None = None) -> list[Case]:
    """Unlabelled images for semi-supervised training, as cases without labels.

    ``folder``: images laid out like the dataset's training images (``CASE_0000.ext`` channel
    files for the nnU-Net layout, ``CASE.ext`` for image/mask folders). ``None``: the training
    images that have no label, which are then taken out of ``dataset.train`` (so validation and
    planning see labelled cases only). Raises :class:`InputError` when there are none.
    """
    if folder is None:
        unlabeled = [c for c in dataset.train if c.label_path is None]
        where = "imagesTr" if dataset.layout == "nnunet" else "images"
        if not unlabeled:
            raise InputError(f"--unlabeled without a folder, but every image in {where} has a label",
                             dataset.root / where,
                             "pass a folder of unlabelled images (--unlabeled DIR), or add images without "
                             "labels there")
        dataset.train = [c for c in dataset.train if c.label_path is not None]
        return unlabeled
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("folder of unlabelled images not found", folder,
                         "pass an existing folder (--unlabeled DIR)")
    if dataset.layout == "nnunet":
        # (any label found beside an image is dropped below)
        cases = _nnunet_cases(folder, folder, dataset.num_channels, dataset.file_ending or None)
    else:
        cases = [Case(split_suffix(p)[0], [p]) for p in sorted(folder.iterdir()) if _is_image(p)]
    if not cases:
        pattern = "CASE_0000" if dataset.layout == "nnunet" else "CASE"
        raise InputError("no unlabelled images found", folder,
                         f"put images named like {pattern}{dataset.file_ending} there, as in the training "
                         "images")
    return [Case(c.case_id, c.image_paths, None) for c in cases]


def check_unlabeled(cases: list[Case], channels: int, dim: int) -> None:
    """Read every unlabelled case once and refuse one whose channel count or dimension differs
    from the labelled data's (``channels``, ``dim``), naming the file; NaN/inf are refused by
    :func:`load_case`."""
    for c in cases:
        image, _, _ = load_case(c)
        if image.shape[0] != channels:
            raise InputError(f"unlabelled image has {image.shape[0]} channel(s), the labelled images "
                             f"{channels}", c.image_paths[0],
                             "give unlabelled images the labelled ones' channels (same channel files)")
        if image.ndim - 1 != dim:
            raise InputError(f"unlabelled image is {image.ndim - 1}D, the labelled images {dim}D",
                             c.image_paths[0], "do not mix 2D and 3D images")


def load_case(
    case: Case, dataset: Dataset | None = None
) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Load one case: image ``(C, *spatial)`` float32, label ``spatial`` as class indices (or None).

    Raw label values are mapped to class indices ``0..K-1`` with ``dataset.label_values``;
    without a dataset (or before ``validate_dataset`` has filled in the values of a folder
    dataset) the label keeps its raw values.
    """
    arrays = []
    geom = None
    for p in case.image_paths:
        arr, g = read_image(p)
        _check_finite(arr, p, case.case_id)
        if geom is None:
            geom = g
        elif arr.shape[1:] != arrays[0].shape[1:]:
            raise InputError(
                f"channel shape {arr.shape[1:]} differs from {arrays[0].shape[1:]} "
                "of the first channel file",
                p,
            )
        arrays.append(arr)
    assert geom is not None, "a case has at least one image file"
    image = np.concatenate(arrays, axis=0).astype(np.float32, copy=False)
    label = None
    if case.label_path is not None:
        lab, lgeom = read_label(case.label_path)
        if lab.shape != image.shape[1:]:
            raise InputError(
                f"label shape {lab.shape} does not match image shape {image.shape[1:]}",
                case.label_path,
                "labels must have the image's size",
            )
        _check_grid(geom, lgeom, case.label_path, case.case_id)
        if dataset is not None and dataset.label_values:
            label = _map_values(lab, dataset.label_values, case.label_path)
        else:
            label = lab
    return image, label, geom


def _check_finite(image: np.ndarray, path: Path, case_id: str) -> None:
    """NaN or inf in an image poisons its normalisation (one NaN makes a z-scored case all NaN)
    and with it the training loss: refuse it here, naming the file."""
    if all_finite(image):
        return
    n = int(np.count_nonzero(~np.isfinite(image)))
    raise InputError(f"case '{case_id}': image has {n} non-finite voxel(s) (NaN or inf)", path,
                     "repair the image (e.g. replace NaN with the background value) or leave the case out")


# formats without a placement in space: only their spacing (1) can be compared
_UNPLACED = ("natural", "tiff")
ORIGIN_TOLERANCE = 0.01  # of the smallest voxel edge: a label shifted by less overlays the same voxels
DIRECTION_TOLERANCE = 1e-3  # per direction cosine (float32 headers round at ~1e-7)


def _world(geom: Geometry) -> np.ndarray:
    """Voxel index -> world matrix in NIfTI's RAS frame (ITK's LPS has its first two axes
    flipped), so an image and a label in different formats compare."""
    m = geom.affine_matrix.copy()
    if geom.fmt == "itk":
        m[: min(2, geom.ndim)] *= -1
    return m


def _check_grid(image_geom: Geometry, label_geom: Geometry, path: Path, case_id: str) -> None:
    """A label must lie on its image's voxel grid: equal spacing (to 0.1 %, as nnU-Net checks),
    origin (to 1 % of a voxel) and axis directions; a label on another grid trains silently
    on the wrong voxels."""
    if image_geom.ndim != label_geom.ndim:
        return
    fix = "resample the label onto the image grid (or give it the image's header)"
    a, b = np.asarray(image_geom.spacing), np.asarray(label_geom.spacing)
    if not np.allclose(a, b, rtol=1e-3, atol=1e-6):
        raise InputError(f"case '{case_id}': label spacing {tuple(b.tolist())} differs from image "
                         f"spacing {tuple(a.tolist())}", path, fix)
    if image_geom.fmt in _UNPLACED or label_geom.fmt in _UNPLACED:
        return
    wa, wb = _world(image_geom), _world(label_geom)
    if wa.shape != wb.shape:
        return
    n = wa.shape[0] - 1
    shift = float(np.abs(wa[:n, n] - wb[:n, n]).max())
    if shift > ORIGIN_TOLERANCE * float(np.abs(a).min()):
        raise InputError(f"case '{case_id}': label origin {tuple(np.round(wb[:n, n], 4).tolist())} differs "
                         f"from image origin {tuple(np.round(wa[:n, n], 4).tolist())} (by {shift:.4g})",
                         path, fix)
    da = wa[:n, :n] / np.linalg.norm(wa[:n, :n], axis=0)
    db = wb[:n, :n] / np.linalg.norm(wb[:n, :n], axis=0)
    if float(np.abs(da - db).max()) > DIRECTION_TOLERANCE:
        raise InputError(f"case '{case_id}': label axis directions {np.round(db, 4).tolist()} differ from "
                         f"the image's {np.round(da, 4).tolist()}", path, fix)


def _unique(lab: np.ndarray) -> list[int]:
    """Sorted distinct values; a bincount for small labels (much faster than sorting)."""
    if lab.dtype == np.uint8:
        return np.flatnonzero(np.bincount(lab.ravel(), minlength=256)).tolist()
    return np.unique(lab).tolist()


def _map_values(lab: np.ndarray, values: list[int], path: Path) -> np.ndarray:
    unknown = sorted(set(_unique(lab)) - set(values))
    if unknown:
        raise InputError(
            f"label values {unknown} are not declared (declared: {values})",
            path,
            "fix the mask or add the values to 'labels' in dataset.json",
        )
    dtype = np.uint8 if len(values) <= 256 else np.int64
    if values == list(range(len(values))):
        return lab.astype(dtype, copy=False)
    lut = np.zeros(int(max(values)) + 1, dtype=dtype)
    for idx, v in enumerate(values):
        lut[v] = idx
    return lut[lab]


def validate_dataset(
    dataset: Dataset, split: str = "train", require_labels: bool = True
) -> list[dict]:
    """Read every case once and check it; returns per-case facts (shape, spacing, label values).

    Raises :class:`InputError` (one line, naming the file) on: no cases, a missing label,
    unreadable/empty files, NaN/inf in an image, image/label shape, spacing, origin or
    direction mismatch, undeclared label values,
    mixed 2D/3D cases, mixed channel counts, or a channel count other than dataset.json's.
    Infers label values for folder datasets without metadata (0/255 masks -> classes 0/1).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    cases = dataset.train if split == "train" else dataset.test
    if dataset.layout == "nnunet":
        folder = dataset.root / ("imagesTr" if split == "train" else "imagesTs")
        pattern = f"CASE_0000{dataset.file_ending or '.nii.gz'}"
    else:
        folder = dataset.root / "images"
        pattern = f"CASE{dataset.file_ending or '.png'}"
    if not cases:
        raise InputError("no cases found", folder, f"put images named like {pattern} there")
    if require_labels:
        for c in cases:
            if c.label_path is None:
                where = "labelsTr" if dataset.layout == "nnunet" else "masks"
                if split == "test":
                    where = "labelsTs"
                raise InputError(
                    f"case '{c.case_id}' has no label",
                    c.image_paths[0],
                    f"add {where}/{c.case_id}{dataset.file_ending}",
                )
    infer = not dataset.label_values
    facts = []
    found_values: set[int] = set()
    ndim = n_ch = None
    for c in cases:
        image, raw, geom = load_case(c, None)
        if dataset.layout == "nnunet" and image.shape[0] != dataset.num_channels:
            raise InputError(
                f"image has {image.shape[0]} channel(s) but dataset.json declares "
                f"{dataset.num_channels} ({', '.join(dataset.channel_names)})",
                c.image_paths[0],
                "fix channel_names in dataset.json or the image files",
            )
        if ndim is None:
            ndim, n_ch = image.ndim - 1, image.shape[0]
        elif image.ndim - 1 != ndim:
            raise InputError(
                f"case is {image.ndim - 1}D but earlier cases are {ndim}D",
                c.image_paths[0],
                "do not mix 2D and 3D cases",
            )
        elif image.shape[0] != n_ch:
            raise InputError(
                f"image has {image.shape[0]} channels, earlier cases have {n_ch}",
                c.image_paths[0],
            )
        values: list[int] = []
        if raw is not None:
            values = _unique(raw)
            if infer:
                found_values.update(values)
            else:
                _map_values(raw, dataset.label_values, c.label_path)  # raises on undeclared values
        facts.append({
            "case_id": c.case_id,
            "shape": list(image.shape[1:]),
            "channels": image.shape[0],
            "spacing": list(geom.spacing[-(image.ndim - 1):]),
            "label_values": values,
        })
    if infer and found_values:
        # raw values become class indices in order: 0/255 masks give classes 0/1
        vals = sorted(found_values | {0})
        if vals[0] < 0:
            bad = next(f for f in facts if f["label_values"] and f["label_values"][0] < 0)
            path = next(c.label_path for c in cases if c.case_id == bad["case_id"])
            raise InputError(f"negative label values {[v for v in vals if v < 0]}", path)
        dataset.label_values = vals
        dataset.label_names = ["background"] + [
            "foreground" if v == 255 and len(vals) == 2 else f"class{v}" for v in vals[1:]
        ]
    if (found_values or not infer) and len(dataset.label_values) < 2:
        raise InputError("labels contain only background", folder, "add foreground to the masks")
    return facts
