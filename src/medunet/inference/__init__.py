"""Inference: sliding window, test-time augmentation, ensembles, post-processing, backends."""

from medunet.inference.backends import OnnxBackend, OpenVinoBackend, TorchBackend
from medunet.inference.network import sliding_window_inference
from medunet.inference.postprocess import apply_postprocessing, choose_postprocessing
from medunet.inference.predictor import (
    TTA_MODES,
    Predictor,
    expand_model_dirs,
    fill_nonfinite,
    find_inputs,
    load_network,
)
from medunet.inference.sliding_window import gaussian_weights, sliding_window

__all__ = [
    "TTA_MODES",
    "OnnxBackend",
    "OpenVinoBackend",
    "Predictor",
    "TorchBackend",
    "apply_postprocessing",
    "choose_postprocessing",
    "expand_model_dirs",
    "fill_nonfinite",
    "find_inputs",
    "gaussian_weights",
    "load_network",
    "sliding_window",
    "sliding_window_inference",
]
