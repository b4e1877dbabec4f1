"""Find cases in a dataset folder, validate them, and load them."""

from medunet.datasets.dataset import (
    Case,
    Dataset,
    check_unlabeled,
    find_dataset,
    find_unlabeled,
    load_case,
    validate_dataset,
)

__all__ = ["Case", "Dataset", "check_unlabeled", "find_dataset", "find_unlabeled", "load_case",
           "validate_dataset"]
