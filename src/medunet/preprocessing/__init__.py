"""Per-plan preprocessing shared by training and inference (so both see the same numbers)."""

from medunet.preprocessing.normalize import normalize

__all__ = ["normalize"]
