"""Peak memory (RSS) of predicting a CT-sized volume, 512 x 512 x 300 int16, with a small 3D U-Net.

    python bench/predict_memory.py [--shape 512 512 300] [--out result.json]

Each configuration runs in a fresh process (peak RSS is per process): ``labels`` (what
``medunet predict`` does without ``--save-probabilities``), ``labels+probabilities``, and
``previous`` (the sliding window of commit 85213ea: a float32 normalised copy of the image and
full-size float32 probability and weight sums). The model is random (memory does not depend
on the weights); ``--overlap 0`` by default to keep the run short, since the buffers do not
depend on the overlap either.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, machine  # noqa: E402

CONFIGS = ("labels", "labels+probabilities", "previous")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _model(tmp: Path, patch: list[int]) -> Path:
    import torch

    from medunet.nets import build_network
    from medunet.planning import Plan

    plan = Plan(dataset_name="ct", dim=3, in_channels=1, channel_names=["CT"], label_names=["bg", "organ"],
                label_values=[0, 1], spacing=[0.8, 0.8, 2.5], median_shape=[512, 512, 300],
                normalization=[{"scheme": "ct", "lower": -200.0, "upper": 400.0, "mean": 50.0, "std": 120.0}],
                patch_size=patch, batch_size=2,
                network={"preset": "default", "features": [8, 16, 32], "strides": [[2, 2, 2], [2, 2, 2]]},
                inference={"overlap": 0.5})
    model = tmp / "model"
    plan.save(model / "plan.json")
    torch.manual_seed(0)
    net = build_network(3, 1, 2, "default", features=[8, 16, 32], strides=[[2, 2, 2], [2, 2, 2]])
    torch.save({"model": net.state_dict(), "ema_model": None}, model / "checkpoint_last.pt")
    return model


def _previous_sliding_window():
    """The sliding window as it was before this change (from git), for the comparison row."""
    import importlib.util
    import tempfile

    src = subprocess.run(["git", "show", "85213ea:src/medunet/inference/sliding_window.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "previous_sliding_window.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("previous_sliding_window", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def child(config: str, shape: list[int], patch: list[int], overlap: float, precision: str) -> dict:
    """One configuration in this process: returns peak RSS and timings."""
    import tempfile

    import numpy as np
    import torch

    from medunet.inference import Predictor

    tmp = Path(tempfile.mkdtemp())
    pred = Predictor.load(_model(tmp, patch), precision=precision, overlap=overlap, postprocess="none")
    with torch.inference_mode():  # warm the allocator and kernels on a small input
        pred.predict_array(np.zeros((1, *patch), np.int16), probabilities=False)
    base = _current_rss_mb()
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1500, size=(1, *shape), dtype=np.int16)
    t0 = time.perf_counter()
    if config == "previous":
        from medunet.inference.sliding_window import indices_to_labels
        from medunet.preprocessing import normalize

        old = _previous_sliding_window()
        x = torch.from_numpy(normalize(image, pred.plan.normalization))
        probs = old.sliding_window_inference(pred.nets[0], x, patch, 2, overlap=overlap, batch_size=2,
                                             precision=pred.precision, device=pred.device)
        labels = indices_to_labels(probs.argmax(0), pred.plan.label_values)
    else:
        labels, probs = pred.predict_array(image, probabilities=config != "labels")
    seconds = time.perf_counter() - t0
    return {"config": config, "peak_rss_mb": round(_rss_mb(), 1), "rss_before_image_mb": round(base, 1),
            "image_mb": round(image.nbytes / 2**20, 1), "labels_mb": round(labels.nbytes / 2**20, 1),
            "seconds": round(seconds, 1), "foreground_fraction": round(float((labels == 1).mean()), 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--patch", type=int, nargs=3, default=[96, 96, 48])
    ap.add_argument("--overlap", type=float, default=0.0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.patch, args.overlap, args.precision)))
        return {}
    rows = []
    for config in args.configs:
        cmd = [sys.executable, __file__, "--child", config, "--shape", *map(str, args.shape),
               "--patch", *map(str, args.patch), "--overlap", str(args.overlap),
               "--precision", args.precision]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"config": config, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    result = {"benchmark": "predict_memory", "shape": args.shape, "patch": args.patch,
              "overlap": args.overlap, "model": "UNet 3D, features 8-16-32, random weights, 2 classes",
              "rows": rows, "machine": machine()}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
