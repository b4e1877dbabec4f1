"""bench/pseudo_teacher.py on a tiny 2D self-training run: the frozen model it serves, the cases
it scores, and the one-line refusal of a run without pseudo-label rounds."""

import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_bench
from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError
from medunet.modeldir import load_network
from medunet.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"training.iterations_per_epoch": 2, "batch_size": 4, "network.features": [8, 16, 32, 64]}
FP32 = {"progress": False, "report": False, "precision": "fp32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The full dataset (8 labelled, 2 test), a pseudo-label run on a copy whose last 3 training
    labels were withheld, and a supervised run."""
    root = tmp_path_factory.mktemp("pt")
    full = make_synthetic_dataset(root / "full", n_train=8, n_test=2, shape=(32, 32), seed=7)
    part = root / "part"
    shutil.copytree(full, part)
    for i in range(5, 8):
        (part / "labelsTr" / f"synth_tr{i:03d}.png").unlink()
    train(part, root / "pseudo" / "model", epochs=2, overrides=TINY, unlabeled=True, semi="pseudo", **FP32)
    train(full, root / "plain" / "model", epochs=1, overrides=TINY, **FP32)
    return full, root / "pseudo", root / "plain"


def test_the_frozen_model_is_served_and_scored_on_test_and_unlabelled_cases(runs, tmp_path):
    full, pseudo, _ = runs
    bench = load_bench("pseudo_teacher")
    row = bench.score(pseudo, full, tmp_path)
    frozen = torch.load(pseudo / "model" / "checkpoint_last.pt", weights_only=True)["pseudo_model"]
    _, net, _ = load_network(tmp_path / "teacher", "best")
    served = net.state_dict()
    assert all(torch.equal(served[k].float(), v.float()) for k, v in frozen.items())
    assert row["pseudo_round"] >= 1
    assert row["teacher_test"]["cases"] == 2 and row["teacher_unlabeled"]["cases"] == 3
    for part in ("teacher_test", "teacher_unlabeled"):
        assert 0.0 <= row[part]["dice"] <= 1.0, part
    assert "student_test" not in row  # bench/semisup.py scores the student; train() alone does not


def test_a_run_without_rounds_is_refused(runs, tmp_path):
    full, _, plain = runs
    with pytest.raises(InputError, match="no frozen pseudo-label model"):
        load_bench("pseudo_teacher").score(plain, full, tmp_path)
