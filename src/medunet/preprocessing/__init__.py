"""Per-plan preprocessing shared by training and inference (so both see the same numbers):
crop to the non-zero region, resample to the plan's spacing, normalise; the on-disk cache."""

from medunet.preprocessing.cache import CachedCase, plan_hash, preprocess_dataset
from medunet.preprocessing.crop import crop, nonzero_bbox, uncrop
from medunet.preprocessing.normalize import normalize
from medunet.preprocessing.pipeline import (
    PreprocessInfo,
    preprocess_case,
    revert_labels,
    revert_probabilities,
    revert_to_indices,
)
from medunet.preprocessing.resample import resample_image, resample_label

__all__ = ["CachedCase", "PreprocessInfo", "crop", "nonzero_bbox", "normalize", "plan_hash",
           "preprocess_case", "preprocess_dataset", "resample_image", "resample_label", "revert_labels",
           "revert_probabilities", "revert_to_indices", "uncrop"]
