"""Geometry that travels beside an array: spacing, origin, direction (and the source affine)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Geometry:
    """Physical placement of the spatial axes of an array.

    ``spacing``/``origin`` have one entry per spatial axis (in array-axis order), and
    ``direction`` is the row-major ``ndim x ndim`` matrix whose columns are the axis
    directions. Origin and direction are in the source format's world frame: RAS for NIfTI
    (as its affine), LPS for NRRD/MHA (as ITK); the writers convert between the two when a
    NIfTI-sourced geometry is written as NRRD/MHA or the reverse. For NIfTI the original
    4x4 ``affine`` (and, in ``extra["nifti"]``, the header's sform/qform fields) is kept
    verbatim so a written prediction carries exactly the input's header geometry; ``fmt``
    remembers the source format so outputs can be written in kind.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...] = ()
    direction: tuple[float, ...] = ()
    affine: tuple[float, ...] | None = None
    fmt: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.spacing)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin) if self.origin else (0.0,) * n
        if not self.direction:
            self.direction = tuple(np.eye(n).ravel().tolist())
        self.direction = tuple(float(d) for d in self.direction)
        if self.affine is not None:
            self.affine = tuple(float(a) for a in np.asarray(self.affine).ravel())

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @classmethod
    def identity(cls, ndim: int, fmt: str = "") -> Geometry:
        return cls(spacing=(1.0,) * ndim, fmt=fmt)

    @property
    def affine_matrix(self) -> np.ndarray:
        """Voxel-index to world (homogeneous) matrix, built from the fields when not stored."""
        if self.affine is not None:
            return np.asarray(self.affine, dtype=float).reshape(4, 4)
        n = self.ndim
        mat = np.eye(n + 1)
        mat[:n, :n] = np.asarray(self.direction).reshape(n, n) * np.asarray(self.spacing)
        mat[:n, n] = self.origin
        return mat

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(**d)
