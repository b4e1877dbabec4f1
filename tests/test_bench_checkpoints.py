"""bench/checkpoints.py's reading of log.csv: the validation Dice it names for each checkpoint."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_checkpoints", BENCH / "checkpoints.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_validation_by_epoch_keeps_epochs_without_validation(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("epoch,iterations,train_loss,val_dice\n1,10,0.9,\n2,20,0.5,0.75\n3,30,0.4,\n4,40,0.3,0.8125\n")
    val = _module().validation_by_epoch(log)
    assert val == {1: None, 2: 0.75, 3: None, 4: 0.8125}
