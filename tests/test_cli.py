"""The CLI end to end on a tiny generated dataset: plan, train, predict, evaluate; exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medunet.cli import app, parse_overrides
from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError

runner = CliRunner()


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "medunet.cli", *args], capture_output=True, text=True)


def test_parse_overrides(tmp_path):
    assert parse_overrides(["patch_size=64,64", "training.lr=0.01", "network.norm=instance"]) == {
        "patch_size": [64, 64], "training.lr": 0.01, "network.norm": "instance"}
    f = tmp_path / "o.json"
    f.write_text(json.dumps({"batch_size": 3, "training": {"epochs": 2}}))
    assert parse_overrides(None, [f]) == {"batch_size": 3, "training.epochs": 2}
    with pytest.raises(InputError):
        parse_overrides(["novalue"])


def test_train_predict_evaluate_end_to_end(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_train=4, n_test=2, shape=(32, 32), seed=1)
    model, preds = tmp_path / "model", tmp_path / "preds"

    r = runner.invoke(app, ["plan", str(data)])
    assert r.exit_code == 0, r.output
    assert "patch_size" in r.output

    r = runner.invoke(app, ["train", str(data), "-o", str(model), "--epochs", "2", "--quiet",
                            "--set", "training.iterations_per_epoch=3"])
    assert r.exit_code == 0, r.output
    # one validation case shows nothing case by case, so the last weights are served
    assert "validation Dice" in r.output and "(last weights, epoch 2)" in r.output
    assert json.loads((model / "plan.json").read_text())["training"]["iterations_per_epoch"] == 3

    r = runner.invoke(app, ["predict", str(model), str(data / "imagesTs"), "-o", str(preds),
                            "--save-probabilities", "--quiet"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in preds.iterdir()) == [  # the manifest lists what predict wrote
        ".medunet-predictions.json", "synth_ts000.npz", "synth_ts000.png", "synth_ts001.npz",
        "synth_ts001.png"]

    out_json = tmp_path / "eval.json"
    r = runner.invoke(app, ["evaluate", str(preds), str(data / "labelsTs"), "--json", str(out_json),
                            "--workers", "1"])
    assert r.exit_code == 0, r.output
    result = json.loads(out_json.read_text())
    assert len(result["cases"]) == 2


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    r = _cli("train", str(tmp_path / "missing"), "-o", str(tmp_path / "m"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()  # nothing half-written

    data = make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(16, 16))
    (data / "labelsTr" / "synth_tr001.png").unlink()
    r = _cli("train", str(data), "-o", str(tmp_path / "m"), "--epochs", "1")
    assert r.returncode == 2 and "synth_tr001" in r.stderr and "no label" in r.stderr
    assert not (tmp_path / "m").exists()

    r = _cli("train", str(data), "-o", str(tmp_path / "m"), "--time-budget", "soon")
    assert r.returncode == 2 and "duration" in r.stderr

    good = make_synthetic_dataset(tmp_path / "g", n_train=2, n_test=0, shape=(16, 16))
    r = _cli("train", str(good), "-o", str(tmp_path / "m"), "--epochs", "1", "--set", "training.ema_every=0")
    assert r.returncode == 2 and "training.ema_every" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()

    r = _cli("predict", str(tmp_path / "nomodel"), str(data), "-o", str(tmp_path / "p"))
    assert r.returncode == 2 and "plan.json not found" in r.stderr


def test_max_voxels_is_a_global_option(tmp_path):
    """``medunet --max-voxels N COMMAND`` sets the readers' limit for any command (no env var)."""
    data = make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(16, 16))
    r = _cli("--max-voxels", "100", "plan", str(data))
    assert r.returncode == 2 and "holds 256 values, more than the limit of 100" in r.stderr
    assert _cli("--max-voxels", "1e4", "plan", str(data)).returncode == 0
    r = _cli("--max-voxels", "-3", "plan", str(data))
    assert r.returncode == 2 and "positive whole number" in r.stderr
