"""The two-stage cascade: offered on a resolution conflict, trained, chosen, predicted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_png
from medunet.errors import InputError
from medunet.inference import Predictor
from medunet.inference.predictor import CascadePredictor, prior_channels
from medunet.planning import prepare_plan
from medunet.training import train


def _organ_and_vessels(root, n, shape=(512, 512), seed=0):
    """A large blob (class 1) among 2-pixel lines (class 2): no single resolution suits both."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(n):
        r = rng.integers(110, 150)
        cy, cx = shape[0] / 2 + rng.integers(-30, 30), shape[1] / 2 + rng.integers(-30, 30)
        label = (((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1).astype(np.uint8)
        for y in range(int(rng.integers(10, 40)), shape[0], 60):
            rows = label[y: y + 2]
            rows[rows == 0] = 2  # around the organ, not through it
        image = rng.integers(40, 90, shape).astype(np.uint8)
        image[label == 1] += 70
        image[label == 2] += 140
        write_png(root / "imagesTr" / f"c{i:02d}_0000.png", image)
        write_png(root / "labelsTr" / f"c{i:02d}.png", label)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "grey"}, "labels": {"background": 0, "organ": 1, "vessel": 2},
        "numTraining": n, "file_ending": ".png"}))
    return root


def test_prior_channels_are_one_hot_foreground():
    idx = np.array([[0, 1], [2, 1]])
    prior = prior_channels(idx, 3)
    assert prior.dtype == np.float32 and prior.shape == (2, 2, 2)
    np.testing.assert_array_equal(prior[0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(prior[1], [[0, 0], [1, 0]])


def test_conflict_offers_a_cascade_and_only_then(tmp_path):
    root = _organ_and_vessels(tmp_path / "d", 3)
    _, plan = prepare_plan(root)
    assert plan.resolution["conflict"] and "cascade" in plan.configurations
    # stage 1: the organ's context (~290 px) within the encoder's 140-voxel receptive field
    assert plan.resolution["factor"] == 1.0 and plan.resolution["lowres_factor"] == 2.05
    assert "'vessel'" in plan.reasons["resolution"] and "cascade" in plan.reasons["configuration"]
    _, forced = prepare_plan(root, config="cascade")
    assert forced.configuration == "2d"  # the stages' own configuration; train() runs the cascade
    # a dataset without a conflict refuses it
    plain = tmp_path / "plain"
    _organ_and_vessels(plain, 2, shape=(96, 96))
    with pytest.raises(InputError, match="cascade"):
        prepare_plan(plain, config="cascade")


@pytest.mark.slow
def test_cascade_trains_chooses_and_predicts_at_the_input_size(tmp_path):
    root = _organ_and_vessels(tmp_path / "d", 5)
    model = tmp_path / "m"
    ov = {"training.iterations_per_epoch": 2, "batch_size": 2}
    train(root, model, epochs=1, overrides=ov, progress=False, report=False)
    top = json.loads((model / "plan.json").read_text())
    assert top["configuration"] == "cascade" and top["cascade"]["use"] in ("cascade", "lowres")
    lo = json.loads((model / "lowres" / "plan.json").read_text())
    hi = json.loads((model / "fullres" / "plan.json").read_text())
    assert lo["spacing"] == [2.05, 2.05] and hi["spacing"] == [1.0, 1.0]
    # stage 2 sees the image and one 0/1 map per foreground class, not normalised
    assert hi["in_channels"] == 3 and [n["scheme"] for n in hi["normalization"]] == ["zscore", "none", "none"]
    # both stages validated on the same cases; the comparison is recorded
    split = lambda d: json.loads((model / d / "splits.json").read_text())["val"]  # noqa: E731
    assert split("lowres") == split("fullres") == split(".")
    choice = json.loads((model / "cascade.json").read_text())
    assert choice["use"] == top["cascade"]["use"] and set(choice["dice_mean"]) == {"lowres", "cascade"}
    prior = np.array(Image.open(model / "fullres_data" / "imagesTr" / "c00_0002.png"))
    assert prior.shape == (512, 512) and set(np.unique(prior)) <= {0, 1}

    # predict through both stages, whatever the comparison chose, on an image of another size
    top["cascade"]["use"] = "cascade"
    (model / "plan.json").write_text(json.dumps(top))
    predictor = Predictor.load(model)
    assert isinstance(predictor, CascadePredictor) and predictor.fullres is not None
    rng = np.random.default_rng(1)
    test = write_png(tmp_path / "in" / "t_0000.png", rng.integers(0, 255, (437, 501)).astype(np.uint8))
    (out,) = predictor.predict(test, tmp_path / "out", progress=False)
    pred = np.array(Image.open(out))
    assert pred.shape == (437, 501) and set(np.unique(pred)) <= {0, 1, 2}
    labels, probs = predictor.predict_array(np.array(Image.open(test), np.float32)[None], spacing=(1.0, 1.0))
    assert labels.shape == (437, 501) and probs.shape == (3, 437, 501)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
    # stage 1 alone when the comparison says so
    top["cascade"]["use"] = "lowres"
    (model / "plan.json").write_text(json.dumps(top))
    alone = Predictor.load(model)
    assert alone.fullres is None
    assert alone.predict_array(np.array(Image.open(test), np.float32)[None])[0].shape == (437, 501)
    # a cascade is not a single network
    with pytest.raises(InputError, match="cascade"):
        Predictor.load([model, model / "lowres"])
