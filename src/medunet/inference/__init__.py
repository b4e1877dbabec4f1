"""Sliding-window inference and the Predictor that turns files into label maps."""

from medunet.inference.predictor import Predictor, find_inputs
from medunet.inference.sliding_window import gaussian_weights, sliding_window_inference

__all__ = ["Predictor", "find_inputs", "gaussian_weights", "sliding_window_inference"]
