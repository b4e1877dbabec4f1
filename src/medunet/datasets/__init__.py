"""Find cases in a dataset folder, validate them, and load them."""

from medunet.datasets.dataset import Case, Dataset, find_dataset, load_case, validate_dataset

__all__ = ["Case", "Dataset", "find_dataset", "load_case", "validate_dataset"]
