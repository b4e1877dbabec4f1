"""The augmentation settings stored in ``plan.training["augment"]``: validation and defaults.

Format (every key optional; a missing key means "off", so the old ``{"flip": 0.5, "rot90": 0.5}``
keeps working)::

    {"flip": 0.5,                                   # per axis
     "rot90": 0.0,                                  # 90-degree turns in square planes
     "rotation": {"p": 0.2, "degrees": 180},        # +-degrees; default 180 in 2D, 30 in 3D
                                                    # (about each axis; 180 in-plane for slice stacks)
     "scaling": {"p": 0.2, "range": [0.7, 1.4]},    # isotropic; > 1 enlarges the content
     "elastic": {"p": 0.0, "alpha": 34, "sigma": 10},   # voxels (Simard et al. 2003)
     "gamma": {"p": 0.3, "range": [0.7, 1.5], "invert_p": 0.1},
     "brightness": {"p": 0.15, "range": [0.75, 1.25]},  # multiplicative
     "contrast": {"p": 0.15, "range": [0.75, 1.25]},    # around the mean, clipped to the range
     "noise": {"p": 0.1, "variance": [0.0, 0.1]},
     "blur": {"p": 0.2, "sigma": [0.5, 1.0]},
     "lowres": {"p": 0.25, "range": [1.0, 2.0]}}

A transform may also be given as a bare probability (``"gamma": 0.3``): its other settings then
take the defaults above, which makes ``--set training.augment.gamma=0.3`` work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from medunet.errors import InputError

_PROB = "prob"
_PAIR = "pair"
_NUMBER = "number"

# per transform: setting -> (kind, lower bound, upper bound, default); bounds are inclusive
_SPEC: dict[str, dict[str, tuple]] = {
    "rotation": {"p": (_PROB, 0.0, 1.0, 0.0), "degrees": (_NUMBER, 0.0, 180.0, None)},
    "scaling": {"p": (_PROB, 0.0, 1.0, 0.0), "range": (_PAIR, 1e-3, 1e3, [0.7, 1.4])},
    "elastic": {"p": (_PROB, 0.0, 1.0, 0.0), "alpha": (_NUMBER, 0.0, 1e4, 34.0),
                "sigma": (_NUMBER, 0.1, 1e3, 10.0)},
    "gamma": {"p": (_PROB, 0.0, 1.0, 0.0), "range": (_PAIR, 1e-2, 1e2, [0.7, 1.5]),
              "invert_p": (_PROB, 0.0, 1.0, 0.0)},
    "brightness": {"p": (_PROB, 0.0, 1.0, 0.0), "range": (_PAIR, 0.0, 1e3, [0.75, 1.25])},
    "contrast": {"p": (_PROB, 0.0, 1.0, 0.0), "range": (_PAIR, 0.0, 1e3, [0.75, 1.25])},
    "noise": {"p": (_PROB, 0.0, 1.0, 0.0), "variance": (_PAIR, 0.0, 1e3, [0.0, 0.1])},
    "blur": {"p": (_PROB, 0.0, 1.0, 0.0), "sigma": (_PAIR, 0.0, 1e2, [0.5, 1.0])},
    "lowres": {"p": (_PROB, 0.0, 1.0, 0.0), "range": (_PAIR, 1.0, 1e2, [1.0, 2.0])},
}
_TOP_PROBS = ("flip", "rot90")
KNOWN_KEYS = (*_TOP_PROBS, *_SPEC)
SPATIAL = ("rotation", "scaling", "elastic")
INTENSITY = ("noise", "blur", "brightness", "contrast", "lowres", "gamma")


def _bad(field: str, what: str, value: object) -> InputError:
    return InputError(f"training.augment.{field} {what}, got {value!r}",
                      fix=f"fix it in plan.json or with --set training.augment.{field}=VALUE")


def _number(field: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(field, "must be a number", value)
    if not lo <= value <= hi:
        raise _bad(field, f"must be within [{lo:g}, {hi:g}]", value)
    return float(value)


def _pair(field: str, value: object, lo: float, hi: float) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]  # a single number fixes the value
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise _bad(field, "must be a range [low, high]", value)
    a, b = (_number(field, v, lo, hi) for v in value)
    if a > b:
        raise _bad(field, "must be [low, high] with low <= high", value)
    return [a, b]


def validate_augmentation(config: dict | None) -> dict:
    """Check an augmentation config and return it complete (every transform, defaults filled).

    Raises :class:`InputError` naming the field (``training.augment.xxx``) and the fix.
    """
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise InputError(f"training.augment must be a mapping of transforms, got {config!r}",
                         fix='write it like {"flip": 0.5, "rotation": {"p": 0.2}} in plan.json')
    unknown = [k for k in config if k not in KNOWN_KEYS]
    if unknown:
        raise InputError(f"unknown augmentation 'training.augment.{unknown[0]}'",
                         fix=f"use one of: {', '.join(KNOWN_KEYS)}")
    out: dict = {k: _number(k, config.get(k, 0.0), 0.0, 1.0) for k in _TOP_PROBS}
    for name, spec in _SPEC.items():
        given = config.get(name, {})
        if isinstance(given, (int, float)) and not isinstance(given, bool):
            given = {"p": given}
        if not isinstance(given, dict):
            raise _bad(name, "must be a probability or a mapping like {\"p\": 0.2, ...}", given)
        extra = [k for k in given if k not in spec]
        if extra:
            raise InputError(f"unknown setting 'training.augment.{name}.{extra[0]}'",
                             fix=f"use: {', '.join(spec)}")
        entry = {}
        for key, (kind, lo, hi, default) in spec.items():
            field = f"{name}.{key}"
            if key not in given:
                entry[key] = list(default) if isinstance(default, list) else default
            elif kind == _PAIR:
                entry[key] = _pair(field, given[key], lo, hi)
            else:
                entry[key] = _number(field, given[key], lo, hi)
        out[name] = entry
    return out


def is_identity(config: dict) -> bool:
    """True when a validated config can change nothing (every probability 0)."""
    return not any(config[k] for k in _TOP_PROBS) and not any(config[k]["p"] for k in _SPEC)


def anisotropic_axis(shape: Sequence[int]) -> int | None:
    """The thin axis of a 3D patch (size 1, or under a third of both others), else None.

    Such patches are stacks of slices: spatial transforms then act only in the plane of the
    two large axes, as rotating or scaling across a handful of slices invents anatomy.
    """
    if len(shape) != 3:
        return None
    k = min(range(3), key=lambda a: (shape[a], a))
    others = [shape[a] for a in range(3) if a != k]
    return k if shape[k] == 1 or 3 * shape[k] < min(others) else None


def default_augmentation(dim: int, patch_size: Sequence[int]) -> dict:
    """nnU-Net-like defaults for a plan (``plan.training["augment"]``).

    Rotation and scaling p 0.2 (2D: +-180 degrees; 3D: +-30 degrees about each axis, or +-180
    in-plane for a slice-stack patch), elastic low in 2D and off in 3D (costly, rarely helps),
    gamma 0.3 (inverted for a tenth of those), brightness/contrast 0.15, noise 0.1, blur 0.2,
    low resolution 0.25, mirroring 0.5 per axis. 90-degree turns (exact, no interpolation) at 0.5
    where the patch has a square plane: with mirroring they give the eight lossless orientations
    our DRIVE and ISBI results were first measured with.
    """
    if dim not in (2, 3) or len(patch_size) != dim:
        raise ValueError(f"need a 2D or 3D patch size, got {dim}D {list(patch_size)}")
    in_plane = dim == 2 or anisotropic_axis(patch_size) is not None
    square = any(patch_size[a] == patch_size[b] for a in range(dim) for b in range(a + 1, dim)
                 if patch_size[a] > 1)
    return {
        "flip": 0.5,
        "rot90": 0.5 if square else 0.0,
        "rotation": {"p": 0.2, "degrees": 180.0 if in_plane else 30.0},
        "scaling": {"p": 0.2, "range": [0.7, 1.4]},
        "elastic": {"p": 0.1 if dim == 2 else 0.0, "alpha": 34.0, "sigma": 10.0},
        "gamma": {"p": 0.3, "range": [0.7, 1.5], "invert_p": 0.1},
        "brightness": {"p": 0.15, "range": [0.75, 1.25]},
        "contrast": {"p": 0.15, "range": [0.75, 1.25]},
        "noise": {"p": 0.1, "variance": [0.0, 0.1]},
        "blur": {"p": 0.2, "sigma": [0.5, 1.0]},
        "lowres": {"p": 0.25, "range": [1.0, 2.0]},
    }
