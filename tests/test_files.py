"""medunet.files: temporary-name writes end up with the modes plain open()/mkdir() give."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medunet.errors import InputError
from medunet.files import default_mode, exclusive_lock, publish, umask


@pytest.fixture
def mask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(mask_027):
    assert umask() == 0o027 and umask() == 0o027
    assert default_mode() == 0o640 and default_mode(directory=True) == 0o750


def test_publish_gives_files_and_folders_the_umask_mode(tmp_path, mask_027):
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    assert _mode(Path(tmp)) == 0o600
    publish(tmp, tmp_path / "f.txt", durable=True)
    assert _mode(tmp_path / "f.txt") == 0o640 and not Path(tmp).exists()
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    publish(folder, tmp_path / "d")
    assert _mode(tmp_path / "d") == 0o750


def test_every_temporary_name_writer_honours_the_umask(tmp_path, mask_027):
    from medunet.inference.predictor import _save_npz
    from medunet.planning import Plan
    from medunet.preprocessing.cache import _atomic_write
    from medunet.training.callbacks import save_checkpoint, write_json

    write_json(tmp_path / "a.json", {"x": 1})
    save_checkpoint({"w": torch.zeros(2)}, tmp_path / "c.pt")
    _atomic_write(tmp_path / "i.npy", lambda f: np.save(f, np.zeros(3)))
    _save_npz(tmp_path / "p.npz", np.zeros((2, 3), np.float32))
    Plan(dataset_name="d", dim=2, in_channels=1, channel_names=["x"], label_names=["b", "f"],
         label_values=[0, 1], spacing=[1.0, 1.0], median_shape=[8, 8], normalization=[{"scheme": "none"}],
         patch_size=[8, 8], batch_size=2, network={}).save(tmp_path / "plan.json")
    for name in ("a.json", "c.pt", "i.npy", "p.npz", "plan.json"):
        assert _mode(tmp_path / name) == 0o640, name
    assert torch.load(tmp_path / "c.pt")["w"].shape == (2,)


def test_converted_dataset_folder_honours_the_umask(tmp_path, mask_027):
    from conftest import write_png
    from medunet.datasets.convert import convert_dataset

    for i in range(2):
        write_png(tmp_path / "src" / "images" / f"c{i}.png", np.full((8, 8), 40 * i, np.uint8))
        write_png(tmp_path / "src" / "masks" / f"c{i}.png", np.eye(8, dtype=np.uint8) * 255)
    dst = convert_dataset(tmp_path / "src", tmp_path / "dst", progress=False)
    assert _mode(dst) == 0o750


def test_exclusive_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    lock = tmp_path / "run" / ".lock"
    with exclusive_lock(lock, "in use", "wait"):
        assert lock.read_text().strip() == str(os.getpid())
        with (pytest.raises(InputError, match=rf"in use \(process {os.getpid()} holds \.lock\)"),
              exclusive_lock(lock, "in use", "wait")):
            pass
    with exclusive_lock(lock, "in use", "wait"):  # released: a new holder gets it
        pass
    assert not lock.exists() and not lock.parent.exists()  # removed, with the folder made for it
    lock.parent.mkdir()
    lock.write_text("999999\n")  # left behind by a killed holder: the OS holds no lock on it
    with exclusive_lock(lock, "in use", "wait"):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists() and lock.parent.is_dir()  # a folder that was there stays


def test_checkpoints_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    import medunet.files
    from medunet.training.callbacks import save_checkpoint

    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(medunet.files.os, "fsync", record)
    save_checkpoint({"w": torch.ones(3)}, tmp_path / "checkpoint_last.pt")
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.startswith(".checkpoint_last.")
    assert Path(synced[1]) == tmp_path  # the folder, after the rename: the new name is on disk
    assert torch.load(tmp_path / "checkpoint_last.pt")["w"].sum() == 3


def test_atomic_file_publishes_on_success_and_leaves_nothing_on_error(tmp_path, mask_027):
    from medunet.files import atomic_file

    target = tmp_path / "sub" / "plan.json"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("{}")
        assert not target.exists()  # visible only once complete
    assert target.read_text() == "{}" and stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "{}" and sorted(p.name for p in target.parent.iterdir()) == ["plan.json"]
