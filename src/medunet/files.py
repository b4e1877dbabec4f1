"""Writing files the way users expect: atomically, with normal permissions, durably on request.

``tempfile.mkstemp``/``mkdtemp`` create private (0600/0700) entries so that nobody can touch a
half-written file; once it is complete and renamed into place it must look like any file
``open()`` would have made (``0666 & ~umask``, folders ``0777 & ~umask``), or a colleague
sharing the model directory cannot read it. :func:`publish` is that one step for every
temporary-name write in medunet; :func:`fsync_dir` and :func:`exclusive_lock` serve the
training run's checkpoints and run directory.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from medunet.errors import InputError

__all__ = ["default_mode", "exclusive_lock", "fsync_dir", "publish", "umask"]

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``):
    setting it to read it would briefly affect files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` (``0666``) or ``mkdir()`` (``0777``) would give under the umask."""
    return (0o777 if directory else 0o666) & ~umask()


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | Path, path: str | Path, *, durable: bool = False) -> None:
    """Give a completed temporary file (or folder) its normal mode and rename it to ``path``.

    ``durable``: also fsync the file before the rename and its folder after it, so that a
    power loss leaves the old or the new file, never an empty one (checkpoints).
    """
    tmp = Path(tmp)
    is_dir = tmp.is_dir()
    os.chmod(tmp, default_mode(is_dir))
    if durable and not is_dir:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(Path(path).parent)


@contextmanager
def atomic_file(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write into; when the block ends normally it is
    published as ``path`` (:func:`publish`), when it raises it is removed. The one
    write-then-rename step of every file medunet writes, so a kill never leaves half a file.

        with atomic_file(model_dir / "plan.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, path, durable=durable)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: str | Path, what: str, fix: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on the file ``path`` for the block, or refuse with an InputError.

    The OS drops the lock when the holder exits, however it exits (a crash, SIGKILL), so a file
    left behind never blocks the next run. On a normal exit the file is removed while still
    locked (and a folder this call created for it, if left empty); a taker checks that the
    file it locked is still the one at ``path``, so removal cannot let two holders in.
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: nothing to hold
        yield path
        return
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise InputError(f"{what} (process {holder or '?'} holds {path.name})", path.parent,
                             fix) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the holder removed it between our open and flock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor releases the lock
        if created:
            with suppress(OSError):
                path.parent.rmdir()  # only when nothing else was written there
