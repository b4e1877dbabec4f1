"""bench/checkpoints.py's reading of log.csv: the validation Dice it names for each checkpoint."""

from __future__ import annotations

from pathlib import Path

from conftest import load_bench


def test_validation_by_epoch_keeps_epochs_without_validation(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("epoch,iterations,train_loss,val_dice\n1,10,0.9,\n2,20,0.5,0.75\n3,30,0.4,\n4,40,0.3,0.8125\n")
    val = load_bench("checkpoints").validation_by_epoch(log)
    assert val == {1: None, 2: 0.75, 3: None, 4: 0.8125}
