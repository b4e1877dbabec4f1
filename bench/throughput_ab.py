"""medunet's training it/s on bench/throughput.py's setup, without nnU-Net's run: for comparing
two commits back to back on one machine (a refactor must not slow the step).

    PYTHONPATH=<worktree>/src python <worktree>/bench/throughput_ab.py [--seconds 120] [--out r.json]

Run it from a worktree of each commit (its own bench/throughput.py trains): both the
nnU-Net-shaped network with nnU-Net's blocks and with the default blocks. Needs the nnU-Net
plans that a bench/throughput.py run stored under --root. Prints JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402
from _common import emit, machine  # noqa: E402
from _nnunet import NnUNet  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="training time for each")
    ap.add_argument("--nnunet-python", type=Path, default=Path("/tmp/nnunet_venv/bin/python"))
    ap.add_argument("--root", type=Path, default=Path("/tmp/nnunet_root"))
    ap.add_argument("--plans", default="nnUNetPlans_patch128x128_bs2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medunet_bench_throughput_ab"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    nn = NnUNet(args.nnunet_python, args.root)
    arch = nn.plans(1, args.plans)["configurations"]["2d"]["architecture"]["arch_kwargs"]
    run = argparse.Namespace(patch=[128, 128], batch=2, seconds=args.seconds, overrides=[], work=args.work)
    result: dict = {"benchmark": "throughput_ab", "seconds_each": args.seconds, "machine": machine()}
    for name, blocks in (("nnunet_blocks", True), ("default_blocks", False)):
        r = tp.run_medunet(run, arch, nnunet_blocks=blocks)
        result[name] = {k: r[k] for k in ("iterations", "iterations_per_second", "data_wait_share")}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
