"""medunet: U-Nets for medical image segmentation, from a folder of labelled images to a model.

The CLI verbs are plain calls too::

    import medunet
    medunet.train("Dataset001", "model_dir", time_budget="30m")
    labels, probs = medunet.Predictor.load("model_dir").predict_array(image)
"""

from medunet.errors import InputError

__version__ = "0.1.0"

__all__ = ["InputError", "Predictor", "evaluate", "train", "__version__"]


def __getattr__(name: str):
    # lazy: importing medunet must not import torch for `medunet --help`-like uses
    if name == "train":
        from medunet.training import train

        return train
    if name == "Predictor":
        from medunet.inference import Predictor

        return Predictor
    if name == "evaluate":
        from medunet.evaluation import evaluate

        return evaluate
    raise AttributeError(name)
