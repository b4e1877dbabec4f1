"""The CUDA paths on a GPU: precisions, fused AdamW, DDP over NCCL and a DRIVE run, in one call.

    python bench/cuda.py [--shared ../shared] [--budget 10m] [--step-budget 30s]
                         [--work /tmp/bench_cuda] [--out r.json] [--device cuda]

Made for a short lease of a GPU machine, so every part runs even when an earlier one failed,
and the JSON is rewritten after each part:

1. ``peaks``: the GPU's matrix-multiply rate (8192^3 products timed with CUDA events) in
   bf16, fp16, tf32 and plain fp32: the ceilings a training step is compared against.
2. ``precisions``: ``medunet train`` on DRIVE for ``--step-budget`` each in fp32, AMP fp16
   (with the grad scaler) and bf16; steps per second without validation, the step's counted
   FLOP/s against the peak, the grad scaler's final scale, and what the optimiser really is
   (fused AdamW, channels_last weights, the dense views the fused kernel steps).
3. ``ddp``: the real training path of a torchrun rank over NCCL: a one-rank process group (a
   one-GPU machine cannot hold two NCCL ranks), the network in DistributedDataParallel, and the
   budget/validation collectives on CUDA tensors; then ``medunet train --nproc 2`` on a node
   with fewer GPUs, which must end with the one-line error, exit 2.
4. ``drive``: DRIVE with every default and the ``--budget`` time budget on the GPU, the 20 test
   images predicted and scored in the FOV by the peers' evaluator.

``--device cpu`` runs the same script on a CPU (fp16 and NCCL are then skipped; the one-rank
group uses Gloo) so it can be checked before a lease.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import emit, log_steps, machine  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def gpu_facts() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    p = torch.cuda.get_device_properties(0)
    return {"cuda": True, "gpu": p.name, "gpus": torch.cuda.device_count(),
            "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
            "cuda_version": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "nccl": (".".join(map(str, torch.cuda.nccl.version()))
                     if torch.distributed.is_nccl_available() else None)}


def peaks() -> dict:
    """TFLOP/s of an 8192^3 product per dtype (median of 10 after 3 warm-ups, random data)."""
    import torch

    out, n = {}, 8192
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                              ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        out[name] = round(2 * n**3 / sorted(times)[len(times) // 2] / 1e12, 1)
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def optimiser_facts(model: Path, device: str) -> dict:
    """What training builds for this plan on this device: the optimiser's kernel and layout."""
    from medunet.planning import Plan
    from medunet.runtime import memory_format
    from medunet.training.optim import build_optimizer

    plan = Plan.load(model)
    fmt = memory_format(plan.dim)
    net = plan.build_network().to(device).to(memory_format=fmt)
    opt = build_optimizer(net, plan.training)
    weights = [p for p in net.parameters() if p.dim() == plan.dim + 2]
    return {"optimizer": type(opt).__name__, "fused": bool(opt.defaults.get("fused")),
            "channels_last_weights": sum(p.is_contiguous(memory_format=fmt) and not p.is_contiguous()
                                         for p in weights),
            "conv_weights": len(weights),
            "dense_views": sum(hasattr(p, "_medunet_perm") for g in opt.param_groups for p in g["params"]),
            "patch_size": plan.patch_size, "batch_size": plan.batch_size,
            "parameters": sum(p.numel() for p in net.parameters())}


def precision_run(ds: Path, work: Path, precision: str, budget: str, device: str) -> dict:
    import torch

    from medunet.training import train
    from throughput import step_flops

    model = work / f"steps_{precision}"
    train(ds, model, time_budget=budget, device=device, precision=precision, progress=False, report=False)
    out = {"precision": precision, **log_steps(model)}
    ckpt = torch.load(model / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    scaler = ckpt.get("scaler") or {}
    out["grad_scaler_scale"] = scaler.get("scale")
    out["grad_scaler_enabled"] = bool(scaler)
    out.update(optimiser_facts(model, device))
    flops = step_flops(model)
    out["step_gflop"] = round(flops / 1e9, 2)
    out["achieved_tflops"] = round(flops * out["steps_per_second"] / 1e12, 2)
    return out


def ddp_child(ds: Path, model: Path, budget: str, device: str) -> None:
    """One torchrun rank's training, in a group of one: ``Dist.active`` is forced so the run
    takes the distributed path (process group, DDP, collectives) that N ranks take."""
    from dataclasses import dataclass

    from medunet.training import distributed, train

    @dataclass(frozen=True)
    class OneRankGroup(distributed.Dist):
        @property
        def active(self) -> bool:
            return True

    distributed.from_environment = lambda: OneRankGroup(0, 1, 0)
    res = train(ds, model, time_budget=budget, device=device, progress=False, report=False)
    import torch

    print(json.dumps({"backend": torch.distributed.get_backend(), "iterations": res.iterations,
                      "best_val_dice": res.best_dice}), flush=True)


def ddp(ds: Path, work: Path, budget: str, device: str) -> dict:
    model = work / "ddp_one_rank"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cuda; "
            f"cuda.ddp_child(cuda.Path({str(ds)!r}), cuda.Path({str(model)!r}), {budget!r}, {device!r})")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    out: dict = {"returncode": p.returncode}
    if p.returncode == 0:
        out.update(json.loads(p.stdout.strip().splitlines()[-1]))
        out.update(log_steps(model))
    else:
        out["stderr_tail"] = p.stderr[-2000:]
    if device == "cuda":  # two ranks on a one-GPU node: the clear error, not a hang
        import torch

        n = torch.cuda.device_count() + 1
        t = time.perf_counter()
        q = subprocess.run([sys.executable, "-m", "medunet", "train", str(ds), "-o",
                            str(work / "ddp_too_many"), "--time-budget", "1m", "--quiet", "--no-report",
                            "--nproc", str(n)], capture_output=True, text=True, timeout=300)
        out["too_many_ranks"] = {"nproc": n, "returncode": q.returncode,
                                 "seconds": round(time.perf_counter() - t, 1),
                                 "message": [ln for ln in q.stderr.splitlines() if "needs GPU" in ln][:1]
                                 or q.stderr[-600:]}
    return out


def drive(ds: Path, args: argparse.Namespace) -> dict:
    ns = argparse.Namespace(budget=args.budget, work=args.work / "drive", overrides=[], tta="auto", seed=0)
    run = _common.train_and_predict(ds, ns, save_probabilities=True)
    preds = run["predictions"]
    scores = _common.peer_eval(preds, ds / "labelsTs", mask=ds / "masksTs", prob=preds)
    facts = {k: v for k, v in run["facts"].items() if k != "machine"}
    return {**facts, **{f"log_{k}": v for k, v in log_steps(run["model"]).items()},
            "test_pooled_in_fov": {k: scores["pooled"].get(k) for k in ("dice", "auc", "accuracy")},
            "test_mean_dice": scores["mean"].get("dice")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=_common.SHARED, help="the folder with data/ and peers/")
    ap.add_argument("--budget", default="10m", help="the DRIVE run's time budget")
    ap.add_argument("--step-budget", default="30s", help="each precision's training run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_cuda"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", nargs="+", default=["peaks", "precisions", "ddp", "drive"])
    args = ap.parse_args(argv)
    _common.PEERS = args.shared / "peers"
    ds = args.shared / "data" / "Dataset001_DRIVE"
    import torch

    result: dict = {"benchmark": "cuda", "machine": machine(), "gpu": gpu_facts(), "torch": torch.__version__}
    args.work.mkdir(parents=True, exist_ok=True)

    def part(name: str, fn) -> None:
        if name not in args.parts:
            return
        say(f"{name} ...")
        t = time.perf_counter()
        result[name] = _safe(fn)  # a short lease: record a failure, go on with the next part
        result[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
        say(f"{name} done in {result[f'{name}_seconds']} s: {json.dumps(result[name])[:600]}")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))

    cuda = args.device == "cuda"
    if cuda:
        part("peaks", peaks)
    precisions = ("fp32", "fp16", "bf16") if cuda else ("fp32", "bf16")
    part("precisions", lambda: [_safe(lambda p=p: precision_run(ds, args.work, p, args.step_budget,
                                                                args.device)) for p in precisions])
    part("ddp", lambda: ddp(ds, args.work, args.step_budget, args.device))
    part("drive", lambda: drive(ds, args))
    result["loadavg_end"] = list(os.getloadavg())
    emit(result, args.out)
    return result


def _safe(fn) -> dict:
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


if __name__ == "__main__":
    main()
