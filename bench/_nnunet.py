"""nnU-Net v2 as a peer, run only by the benchmarks (never a dependency of medunet).

nnU-Net lives in its own virtual environment (``--nnunet-python``, made with
``python -m venv /tmp/nnunet_venv && /tmp/nnunet_venv/bin/pip install -c constraints.txt nnunetv2``)
and is driven through ``../shared/peers/nnunet_budget.py``, whose budget trainer is nnU-Net's
default trainer with a wall-clock limit (see that file's docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from _common import DATA, PEERS

BUDGET = PEERS / "nnunet_budget.py"
TRAINER = "nnUNetTrainerBudget"


class NnUNet:
    """One nnU-Net root (raw/preprocessed/results) and the interpreter of its venv."""

    def __init__(self, python: Path, root: Path) -> None:
        if not Path(python).is_file():
            raise SystemExit(f"{python} not found: install nnU-Net in its own venv (see bench/_nnunet.py)")
        self.python, self.root = Path(python), Path(root)
        self.raw, self.pre = self.root / "raw", self.root / "preprocessed"
        for d in (self.raw, self.pre):
            d.mkdir(parents=True, exist_ok=True)
        for d in DATA.iterdir():  # nnU-Net only reads raw data: link the shared datasets
            if d.name.startswith("Dataset") and not (self.raw / d.name).exists():
                (self.raw / d.name).symlink_to(d)
        self.log = self.root / "nnunet.log"

    def env(self, results: Path, budget_s: float = 0.0) -> dict:
        return dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                    nnUNet_results=str(results), NNUNET_BUDGET_SECONDS=str(budget_s),
                    NNUNET_BUDGET_EPOCHS="20", PYTHONUNBUFFERED="1")

    def _sh(self, cmd: list[str], env: dict) -> float:
        t0 = time.perf_counter()
        with self.log.open("a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc:
            raise SystemExit(f"nnU-Net command failed (rc {rc}), see {self.log}: {' '.join(cmd[:6])}")
        return time.perf_counter() - t0

    def preprocess(self, dataset_id: int, config: str) -> None:
        """nnU-Net's own plan and preprocessing (skipped when already there)."""
        ds = next(d for d in self.raw.iterdir() if d.name.startswith(f"Dataset{dataset_id:03d}_"))
        plans = self.pre / ds.name / "nnUNetPlans.json"
        if plans.is_file():
            ident = json.loads(plans.read_text())["configurations"][config]["data_identifier"]
            if (self.pre / ds.name / ident).is_dir():
                return
        exe = self.python.parent / "nnUNetv2_plan_and_preprocess"
        self._sh([str(exe), "-d", str(dataset_id), "-c", config, "-np", "2"], self.env(self.root / "results"))

    def patch_plans(self, dataset_id: int, config: str, patch: list[int], batch: int) -> str:
        """A plans file with another patch and batch (nnunet_budget.make_patch_plans)."""
        ds = next(d for d in self.pre.iterdir() if d.name.startswith(f"Dataset{dataset_id:03d}_"))
        code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import nnunet_budget as b; "
                "print(json.dumps(b.make_patch_plans(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), "
                "int(sys.argv[5]))[0]))")
        out = subprocess.run([str(self.python), "-c", code, str(PEERS), str(ds), config, json.dumps(patch),
                              str(batch)], check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def plans(self, dataset_id: int, plans_name: str = "nnUNetPlans") -> dict:
        ds = next(d for d in self.pre.iterdir() if d.name.startswith(f"Dataset{dataset_id:03d}_"))
        return json.loads((ds / f"{plans_name}.json").read_text())

    def train(self, dataset_id: int, config: str, budget_s: float, tag: str,
              plans_name: str = "nnUNetPlans") -> dict:
        """Train fold 'all' with the budget trainer; returns its budget_summary.json."""
        results = self.root / "results" / tag
        ds = next(d for d in self.raw.iterdir() if d.name.startswith(f"Dataset{dataset_id:03d}_")).name
        fold = results / ds / f"{TRAINER}__{plans_name}__{config}" / "fold_all"
        summary = fold / "budget_summary.json"
        if not summary.is_file():
            args = [str(dataset_id), config, "all", "-tr", TRAINER, "-p", plans_name, "-device", "cpu"]
            self._sh([str(self.python), str(BUDGET), "_nnunet", "train", *args], self.env(results, budget_s))
        out = json.loads(summary.read_text())
        out["results"] = str(results)
        return out

    def predict(self, dataset_id: int, config: str, tag: str, inp: Path, out: Path, tta: bool,
                plans_name: str = "nnUNetPlans") -> float:
        """``nnUNetv2_predict`` with its defaults (TTA on unless ``tta`` is False); wall seconds."""
        args = ["-i", str(inp), "-o", str(out), "-d", str(dataset_id), "-c", config, "-f", "all",
                "-tr", TRAINER, "-p", plans_name, "-device", "cpu", "--disable_progress_bar"]
        if not tta:
            args.append("--disable_tta")
        return self._sh([str(self.python), str(BUDGET), "_nnunet", "predict", *args],
                        self.env(self.root / "results" / tag))
