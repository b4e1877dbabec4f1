"""Helpers shared by the benchmarks: paths, machine facts, load, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
PEERS = SHARED / "peers"


def machine() -> dict:
    """CPU model, core count, load average and the commit: BENCHMARKS.md needs all four."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=REPO, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "commit": commit + ("+dirty" if dirty else ""),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def peer_eval(pred: Path, gt: Path, mask: Path | None = None, prob: Path | None = None) -> dict:
    """Score with the independent evaluator in ../shared/peers (pooled and mean metrics)."""
    out = pred.parent / f"{pred.name}_seg_eval.json"
    cmd = [sys.executable, str(PEERS / "seg_eval.py"), "--pred", str(pred), "--gt", str(gt),
           "--out", str(out)]
    if mask:
        cmd += ["--mask", str(mask)]
    if prob:
        cmd += ["--prob", str(prob)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def emit(result: dict, path: Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text)
