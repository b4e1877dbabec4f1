"""Per-request temporary folders, and removing the ones a crashed server left behind.

Each request works in ``<tmp>/medunet-serve-<pid>-<random>`` (mode 0700). The folders hold
patient images, so a server that was killed must not leave them lying around:
:func:`remove_stale_work_dirs` runs at start-up and removes, in the temporary folder the server
uses, only folders that

* have exactly this name pattern (``medunet-serve-`` + optional ``<pid>-`` + mkdtemp's 8
  characters), are real folders (not links) and belong to this user;
* were last changed before this process started; and
* were made by a process that is gone: no process with that pid, or one that started after the
  folder was last changed (the pid was reused). Folders of a server still running, however
  old, are kept. Names without a pid (written before pids were added) are judged by age alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

WORK_PREFIX = "medunet-serve-"
_WORK_NAME = re.compile(r"medunet-serve-(?:(\d{1,10})-)?[a-z0-9_]{8}")
_CLOCK_SLACK = 1.0  # /proc start times are whole seconds since boot: allow that much either way
log = logging.getLogger("medunet.serve")


def make_work_dir(root: Path | None) -> Path:
    """A fresh private folder for one request; the name carries this process's pid."""
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=root))


def tmp_root(tmp_dir: str | Path | None) -> Path:
    """The folder the work folders go to: ``tmp_dir`` (created 0700 if new) or the system's."""
    if tmp_dir is None:
        return Path(tempfile.gettempdir())
    root = Path(tmp_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def remove_stale_work_dirs(root: Path) -> list[Path]:
    """Remove the work folders that crashed servers left in ``root`` (see the module doc)."""
    started = process_start_time(os.getpid()) or time.time()
    uid = os.getuid() if hasattr(os, "getuid") else None
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = _WORK_NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if uid is not None and st.st_uid != uid:
            continue
        if st.st_mtime >= started - _CLOCK_SLACK:
            continue
        if match.group(1) is not None and _creator_alive(int(match.group(1)), st.st_mtime):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    if removed:
        log.warning("removed %d temporary folder(s) left by a server that stopped abnormally in %s",
                    len(removed), root)
    return removed


def _creator_alive(pid: int, changed_at: float) -> bool:
    """Whether the process that made a folder (last changed at ``changed_at``) may still run."""
    start = process_start_time(pid)
    if start is not None:
        return start <= changed_at + _CLOCK_SLACK
    if Path("/proc/self/stat").exists():  # /proc works here and has no such pid: it is gone
        return False
    try:  # no /proc (macOS): the pid exists or not, without a start time
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from ``/proc``; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22 (starttime); fields after ')' start at 3
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
