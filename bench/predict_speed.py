"""Prediction speed and Dice per backend: PyTorch fp32/bf16, ONNX Runtime fp32/int8, TTA none/flip.

    python bench/predict_speed.py --drive-model /tmp/drive30/model --la-model MODEL [--out r.json]

One DRIVE test image (drive_01, Dice inside the FOV mask) and one Left Atrium test volume (the
first in imagesTs). The model directories are copied (plan and checkpoints) into ``--work`` so
the exports land there, not in the given directories. int8 models are calibrated on 16 random
patches of 4 training images of the dataset (``--calibration`` of ``medunet export``). Times
are the best of ``--repeat`` runs of ``Predictor.predict_array`` (normalisation, sliding
window, TTA, post-processing; no file I/O), after one warm-up run.
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drive-model", type=Path, default=Path("/tmp/drive30/model"))
    ap.add_argument("--la-model", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medunet_bench_predict"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tta", nargs="*", default=["none", "flip"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    info = machine()
    results: list[dict] = []
    drive = DATA / "Dataset001_DRIVE"
    la = DATA / "Dataset003_LeftAtrium"
    if args.drive_model and args.drive_model.is_dir():
        model = _copy_model(args.drive_model, args.work / "drive")
        results += bench_case("DRIVE drive_01", model, drive / "imagesTs" / "drive_01_0000.png",
                              drive / "labelsTs" / "drive_01.png", drive / "masksTs" / "drive_01.png",
                              drive / "imagesTr", args.repeat, args.tta)
    if args.la_model and args.la_model.is_dir():
        model = _copy_model(args.la_model, args.work / "la")
        first = sorted((la / "imagesTs").iterdir())[0]
        case = first.name.replace("_0000.nii.gz", "")
        results += bench_case(f"LA {case}", model, first, la / "labelsTs" / f"{case}.nii.gz", None,
                              la / "imagesTr", args.repeat, args.tta)
    result = {"benchmark": "predict_speed", "repeat": args.repeat, "results": results, "machine": info}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
