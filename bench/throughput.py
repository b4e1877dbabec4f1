"""Training throughput: medunet vs nnU-Net v2, same CPU, same 2D patch, batch and network, one run.

    python bench/throughput.py [--seconds 180] [--patch 128 128] [--batch 2] [--out r.json]

nnU-Net trains DRIVE's 2d configuration with its default trainer (SGD, its augmentation in its
own background workers, deep supervision), its plans cut to the patch (fewer stages, as
nnunet_budget.py does) and a wall-clock limit. medunet then trains the same data with the
same patch, batch and network shape (nnU-Net's features per stage and strides, instance norm,
leaky ReLU, strided-conv down-sampling, transposed-conv up-sampling, deep supervision) and its
own defaults otherwise (augmentation on the training device, bf16 + channels_last where the CPU
has native bf16). A second medunet run keeps the same features, strides, patch and batch but our
`default` preset's blocks (batch norm, max-pool down-sampling: 20.61 M parameters vs nnU-Net's
20.62 M). Iterations per second count training steps including waiting for data, not
validation or start-up. ``machine_limit`` compares a step's counted FLOPs per second with the
bf16 and fp32 matrix-multiply peaks measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, PEERS, emit, machine  # noqa: E402
from _nnunet import NnUNet  # noqa: E402


def nnunet_params(nn: NnUNet, plans_name: str) -> int | None:
    ds = next(d for d in nn.pre.iterdir() if d.name.startswith("Dataset001_"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import nnunet_budget as b; "
            "print(b.count_params(sys.argv[2], sys.argv[3], '2d'))")
    out = subprocess.run([str(nn.python), "-c", code, str(PEERS), str(ds / f"{plans_name}.json"),
                          str(ds / "dataset.json")], capture_output=True, text=True).stdout.split()
    return int(out[-1]) if out and out[-1].isdigit() else None


def run_nnunet(nn: NnUNet, args: argparse.Namespace) -> dict:
    nn.preprocess(1, "2d")
    plans_name = nn.patch_plans(1, "2d", args.patch, args.batch)
    tag = f"throughput_{plans_name}"
    shutil.rmtree(nn.root / "results" / tag, ignore_errors=True)  # always a fresh, timed run
    s = nn.train(1, "2d", args.seconds, tag, plans_name)
    arch = nn.plans(1, plans_name)["configurations"]["2d"]["architecture"]["arch_kwargs"]
    steps_s = s["time_in_train_steps_s"]
    return {"iterations": s["total_train_iters"], "train_step_seconds": steps_s,
            "iterations_per_second": round(s["total_train_iters"] / steps_s, 3),
            "median_step_seconds": round(s["iter_s_median"], 4), "setup_seconds": s["setup_s"],
            "patch_size": s["patch_size"], "batch_size": s["batch_size"],
            "parameters": nnunet_params(nn, plans_name), "arch": arch, "plans": plans_name}


def run_medunet(args: argparse.Namespace, arch: dict, nnunet_blocks: bool) -> dict:
    from medunet.cli import parse_overrides
    from medunet.planning import Plan
    from medunet.training import train

    strides = [list(s) for s in arch["strides"][1:]]  # nnU-Net's first stage does not pool
    overrides = {
        "patch_size": list(args.patch), "batch_size": args.batch,
        "network.features": list(arch["features_per_stage"]), "network.strides": strides,
        "network.kernel_sizes": [list(k) for k in arch["kernel_sizes"]],
        "network.act": "leakyrelu", "network.up": "transpose", "network.n_convs": 2,
        "network.deep_supervision": True, "training.iterations_per_epoch": 10**6, "training.patience": 0,
    }
    if nnunet_blocks:
        overrides.update({"network.norm": "instance", "network.down": "conv"})
    overrides.update(parse_overrides(args.overrides))
    work = args.work / ("medunet" if nnunet_blocks else "medunet_default_blocks")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    res = train(DATA / "Dataset001_DRIVE", work, time_budget=args.seconds, overrides=overrides,
                progress=False, report=False)
    wall = time.perf_counter() - t0
    row = list(csv.DictReader((work / "log.csv").open()))[-1]
    steps_s = float(row["epoch_seconds"]) - float(row["val_seconds"])
    plan = Plan.load(work)
    return {"iterations": res.iterations, "train_step_seconds": round(steps_s, 1),
            "iterations_per_second": round(res.iterations / steps_s, 3),
            "data_wait_share": float(row["data_wait_share"]), "wall_seconds": round(wall, 1),
            "patch_size": plan.patch_size, "batch_size": plan.batch_size,
            "parameters": sum(p.numel() for p in plan.build_network().parameters()),
            "network": plan.network, "augment": plan.training.get("augment")}


def step_flops(plan_dir: Path) -> int:
    """Floating-point operations of one training step of the plan's network (forward and
    backward on one batch of patches), counted by torch.utils.flop_counter (convolutions and
    matrix products; element-wise work is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medunet.planning import Plan

    plan = Plan.load(plan_dir)
    net = plan.build_network().train()
    x = torch.randn(plan.batch_size, plan.in_channels, *plan.patch_size)
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        loss = sum(o.float().mean() for o in out) if isinstance(out, (list, tuple)) else out.float().mean()
        loss.backward()
    return int(counter.get_total_flops())


def matmul_peak(dtype: str, n: int = 2048, seconds: float = 3.0) -> float:
    """The machine's matrix-multiply rate (FLOP/s) in ``dtype`` with torch's threads: the
    ceiling a training step's convolutions could reach on this CPU."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    for _ in range(3):
        a @ b
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - t0)


def machine_limit(work: Path, its: float) -> dict:
    """How close a medunet step is to the machine's limit: counted FLOPs per step times steps
    per second against the bf16 and fp32 matrix-multiply peaks measured now."""
    flops = step_flops(work)
    peaks = {d: matmul_peak(d) for d in ("bf16", "fp32")}
    achieved = flops * its
    return {"step_gflop": round(flops / 1e9, 2), "achieved_gflops": round(achieved / 1e9, 1),
            **{f"peak_{d}_gflops": round(p / 1e9, 1) for d, p in peaks.items()},
            **{f"share_of_{d}_peak": round(achieved / p, 3) for d, p in peaks.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="training time for each")
    ap.add_argument("--patch", type=int, nargs=2, default=[128, 128])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--nnunet-python", type=Path, default=Path("/tmp/nnunet_venv/bin/python"))
    ap.add_argument("--root", type=Path, default=Path("/tmp/nnunet_root"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/medunet_bench_throughput"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    info = machine()
    nn = NnUNet(args.nnunet_python, args.root)
    peer = run_nnunet(nn, args)
    ours = run_medunet(args, peer["arch"], nnunet_blocks=True)
    ours_default = run_medunet(args, peer["arch"], nnunet_blocks=False)
    result = {"benchmark": "throughput", "dataset": "Dataset001_DRIVE 2d", "seconds_each": args.seconds,
              "medunet": ours, "medunet_default_blocks": ours_default,
              "nnunet": {k: v for k, v in peer.items() if k != "arch"},
              "speedup": round(ours["iterations_per_second"] / peer["iterations_per_second"], 2),
              "speedup_default_blocks": round(ours_default["iterations_per_second"]
                                              / peer["iterations_per_second"], 2),
              "machine": info}
    result["machine_limit"] = machine_limit(args.work / "medunet", ours["iterations_per_second"])
    result["machine_limit_default_blocks"] = machine_limit(args.work / "medunet_default_blocks",
                                                           ours_default["iterations_per_second"])
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
