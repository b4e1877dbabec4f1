"""Prediction speed and Dice per backend: PyTorch fp32/bf16, ONNX Runtime fp32/int8, TTA none/flip,
and nnU-Net v2's ``nnUNetv2_predict`` (TTA on, its default, and off) on the same inputs.

    python bench/predict_speed.py --drive-model /tmp/drive30/model --la-model MODEL [--out r.json]

One DRIVE test image (drive_01, Dice inside the FOV mask) and one Left Atrium test volume (the
first in imagesTs). The model directories are copied (plan and checkpoints) into ``--work`` so
the exports land there, not in the given directories. int8 models are calibrated on 16 random
patches of 4 training images of the dataset (``--calibration`` of ``medunet export``). Times
are the best of ``--repeat`` runs of ``Predictor.predict_array`` (normalisation, sliding
window, TTA, post-processing; no file I/O), after one warm-up run.

nnU-Net (its own venv, ``--nnunet-python``; skipped with ``--no-nnunet``) predicts with a model
trained briefly by its default trainer under a wall-clock limit (``--nnunet-train-seconds``,
fold ``all``, nnU-Net's own plans): enough to time it, not to judge its accuracy. It gets
``--copies`` copies of the same input in one call; its time per case is the steady-state
interval between the written outputs (start-up excluded, as in ../shared/peers), and the
wall time of the whole call divided by the copies is reported too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, emit, machine  # noqa: E402

BACKENDS = [("torch", "fp32", False), ("torch", "bf16", False), ("onnx", "fp32", False),
            ("onnx", "int8", True)]


def _copy_model(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("plan.json", "splits.json", "checkpoint_best.pt", "checkpoint_last.pt"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def _dice(pred, ref, mask=None) -> float:
    import numpy as np

    p, g = pred > 0, ref > 0
    if mask is not None:
        p, g = p & mask, g & mask
    total = int(p.sum() + g.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(p, g).sum() / total)


def bench_case(name: str, model: Path, image_path: Path, label_path: Path, mask_path: Path | None,
               calibration: Path, repeat: int, ttas: list[str]) -> list[dict]:
    import torch

    from medunet.export import export_model
    from medunet.inference import Predictor
    from medunet.io import read_image, read_label

    image, _ = read_image(image_path)
    ref, _ = read_label(label_path)
    mask = read_label(mask_path)[0] > 0 if mask_path else None
    export_seconds = {}
    t0 = time.perf_counter()
    export_model(model, "onnx")
    export_seconds["onnx"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    int8 = export_model(model, "onnx", int8=True, calibration=calibration)
    export_seconds["int8"] = round(time.perf_counter() - t0, 1)
    rows = []
    for backend, precision, q in BACKENDS:
        pred = Predictor.load(model, backend=backend, int8=q,
                              precision=precision if backend == "torch" else None)
        for tta in ttas:
            pred.predict_array(image, tta=tta, probabilities=False)  # warm-up
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                labels, _ = pred.predict_array(image, tta=tta, probabilities=False)
                times.append(time.perf_counter() - t0)
            rows.append({"case": name, "backend": backend, "precision": precision, "tta": tta,
                         "seconds": round(min(times), 3), "dice": round(_dice(labels, ref, mask), 4),
                         "postprocessing": (pred.postprocessing or {}).get("classes", {})})
            print(rows[-1], file=sys.stderr, flush=True)
    return [{"case": name, "image_shape": list(image.shape), "export_seconds": export_seconds,
             "int8_check": int8.check, "torch_threads": torch.get_num_threads()}] + rows


def bench_nnunet(nn, name: str, dataset_id: int, config: str, image_path: Path, label_path: Path,
                 mask_path: Path | None, copies: int, train_seconds: float, work: Path) -> list[dict]:
    """nnUNetv2_predict on ``copies`` copies of one case, TTA on and off."""
    import os

    from medunet.io import read_label

    nn.preprocess(dataset_id, config)
    summary = nn.train(dataset_id, config, train_seconds, f"brief{train_seconds:g}")
    inp = work / f"nnunet_in_{dataset_id}"
    shutil.rmtree(inp, ignore_errors=True)
    inp.mkdir(parents=True)
    suffix = "".join(image_path.suffixes)
    for i in range(copies):
        shutil.copy2(image_path, inp / f"copy{i}_0000{suffix}")
    ref, _ = read_label(label_path)
    mask = read_label(mask_path)[0] > 0 if mask_path else None
    rows = []
    for tta in (True, False):
        out = work / f"nnunet_out_{dataset_id}_{'tta' if tta else 'none'}"
        shutil.rmtree(out, ignore_errors=True)
        wall = nn.predict(dataset_id, config, f"brief{train_seconds:g}", inp, out, tta)
        outs = sorted(out.glob(f"copy*{suffix}"))
        times = sorted(os.path.getmtime(p) for p in outs)
        steady = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else wall
        labels, _ = read_label(outs[0])
        rows.append({"case": name, "backend": "nnunet", "precision": "fp32",
                     "tta": "flip (nnU-Net default)" if tta else "none",
                     "seconds": round(steady, 3), "wall_seconds_per_case": round(wall / copies, 3),
                     "dice": round(_dice(labels, ref, mask), 4),
                     "nnunet_train": {"seconds": train_seconds, "iterations": summary["total_train_iters"]}})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _speedup(results: list[dict]) -> list[dict]:
    """Our default (torch at the auto precision, the plan's default TTA: ``flip`` for 3D, ``none``
    for 2D, see planning.default_tta) against nnU-Net's default (TTA on)."""
    from medunet.planning.plan import default_tta

    out = []
    shapes = {r["case"]: r["image_shape"] for r in results if "image_shape" in r}
    for case in dict.fromkeys(r["case"] for r in results if "backend" in r):
        rows = [r for r in results if r.get("case") == case and "backend" in r]
        tta = default_tta(len(shapes[case]) - 1, "3d")
        ours = [r for r in rows if r["backend"] == "torch" and r["tta"] == tta]
        peer = [r for r in rows if r["backend"] == "nnunet" and r["tta"] != "none"]
        if not ours or not peer:
            continue
        default = min(ours, key=lambda r: r["seconds"])  # bf16 where the CPU has it (the default)
        best = max((r for r in rows if r["backend"] != "nnunet"), key=lambda r: r["dice"])
        out.append({"case": case, "ours_default": f"torch {default['precision']} tta {tta}",
                    "ours_seconds": default["seconds"], "nnunet_default_seconds": peer[0]["seconds"],
                    "speedup": round(peer[0]["seconds"] / default["seconds"], 1),
                    "dice_default": default["dice"], "dice_most_accurate": best["dice"],
                    "most_accurate": f"{best['backend']} {best['precision']} tta {best['tta']}",
                    "dice_gap_points": round(100 * (best["dice"] - default["dice"]), 2)})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drive-model", type=Path, default=Path("/tmp/drive30/model"))
    ap.add_argument("--la-model", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medunet_bench_predict"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tta", nargs="*", default=["none", "flip"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-nnunet", dest="nnunet", action="store_false")
    ap.add_argument("--nnunet-python", type=Path, default=Path("/tmp/nnunet_venv/bin/python"))
    ap.add_argument("--nnunet-root", type=Path, default=Path("/tmp/nnunet_root"))
    ap.add_argument("--nnunet-train-seconds", type=float, default=150.0)
    ap.add_argument("--copies", type=int, default=3)
    args = ap.parse_args(argv)
    info = machine()
    nn = None
    if args.nnunet:
        from _nnunet import NnUNet

        nn = NnUNet(args.nnunet_python, args.nnunet_root)
    results: list[dict] = []
    drive = DATA / "Dataset001_DRIVE"
    la = DATA / "Dataset003_LeftAtrium"
    if args.drive_model and args.drive_model.is_dir():
        model = _copy_model(args.drive_model, args.work / "drive")
        results += bench_case("DRIVE drive_01", model, drive / "imagesTs" / "drive_01_0000.png",
                              drive / "labelsTs" / "drive_01.png", drive / "masksTs" / "drive_01.png",
                              drive / "imagesTr", args.repeat, args.tta)
        if nn:
            results += bench_nnunet(nn, "DRIVE drive_01", 1, "2d", drive / "imagesTs" / "drive_01_0000.png",
                                    drive / "labelsTs" / "drive_01.png", drive / "masksTs" / "drive_01.png",
                                    args.copies, args.nnunet_train_seconds, args.work)
    if args.la_model and args.la_model.is_dir():
        model = _copy_model(args.la_model, args.work / "la")
        first = sorted((la / "imagesTs").iterdir())[0]
        case = first.name.replace("_0000.nii.gz", "")
        results += bench_case(f"LA {case}", model, first, la / "labelsTs" / f"{case}.nii.gz", None,
                              la / "imagesTr", args.repeat, args.tta)
        if nn:
            results += bench_nnunet(nn, f"LA {case}", 3, "3d_fullres", first,
                                    la / "labelsTs" / f"{case}.nii.gz", None, args.copies,
                                    args.nnunet_train_seconds, args.work)
    result = {"benchmark": "predict_speed", "repeat": args.repeat, "results": results,
              "speedup_vs_nnunet": _speedup(results), "machine": info}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
