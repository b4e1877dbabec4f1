"""One sliding window of an nnU-Net-shaped network: PyTorch against OpenVINO, fp32 and bf16.

    python bench/openvino_window.py [--repeats 4] [--out result.json]

Why medunet has an OpenVINO backend (issue 18): nnU-Net's networks put an instance norm after
every conv, which PyTorch cannot keep in its blocked bf16 layout. This times a single window
(batch 1) of medunet's ``nnunet`` network at two nnU-Net geometries, random weights (speed does
not depend on them): Left Atrium ``3d_fullres`` (96 x 80 x 48, 5 stages, 32..320 features) and
DRIVE ``2d`` (640 x 640, 7 stages, 32..512). Rows: PyTorch eager fp32, PyTorch bf16 autocast
(contiguous, as the Torch backend runs instance-norm networks), and OpenVINO on the ONNX export
with the graph compiled for the window's shape (as ``OpenVinoBackend`` does) or with dynamic
shapes, each in fp32 and bf16. Seconds per window are the mean of ``--repeats`` calls after one
warm-up call. Prints one JSON document; needs the ``openvino`` package.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

GEOMETRIES = {
    "la_3d_fullres": {"dims": 3, "channels": 1, "window": [96, 80, 48], "features": [32, 64, 128, 256, 320],
                      "strides": [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]},
    "drive_2d": {"dims": 2, "channels": 3, "window": [640, 640],
                 "features": [32, 64, 128, 256, 512, 512, 512], "strides": [[2, 2]] * 6},
}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and OpenVINO's first-inference work)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round((time.perf_counter() - t0) / repeats, 4)


def geometry_rows(name: str, g: dict, repeats: int, threads: int, tmp: Path) -> dict:
    import openvino as ov
    import torch

    from medunet.nets.nnunet import NnUNet

    torch.manual_seed(0)
    net = NnUNet(g["dims"], g["channels"], 2, features=g["features"], strides=g["strides"],
                 kernel_sizes=[[3] * g["dims"]] * len(g["features"])).eval()
    x = torch.randn(1, g["channels"], *g["window"])
    rows: dict = {}
    for prec in ("fp32", "bf16"):
        def run(prec: str = prec) -> None:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=prec == "bf16"):
                net(x)
        rows[f"torch_{prec}"] = timed(run, repeats)
    onnx_path = tmp / f"{name}.onnx"
    axes = {0: "n", **{2 + i: f"s{i}" for i in range(g["dims"])}}
    torch.onnx.export(net, (x,), str(onnx_path), dynamo=False, input_names=["image"], output_names=["logits"],
                      opset_version=17, dynamic_axes={"image": axes, "logits": axes})
    core = ov.Core()
    xn = x.numpy()
    for shapes in ("static", "dynamic"):
        for prec, hint in (("fp32", "f32"), ("bf16", "bf16")):
            model = core.read_model(str(onnx_path))
            if shapes == "static":
                model.reshape({model.inputs[0].get_any_name(): list(xn.shape)})
            t0 = time.perf_counter()
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "INFERENCE_NUM_THREADS": threads,
                                                         "PERFORMANCE_HINT": "LATENCY"})
            compile_s = round(time.perf_counter() - t0, 3)
            request = compiled.create_infer_request()
            rows[f"openvino_{shapes}_{prec}"] = timed(lambda r=request: r.infer({0: xn}), repeats)
            rows[f"openvino_{shapes}_{prec}_compile_s"] = compile_s
    return {"window": g["window"], "seconds_per_window": rows,
            "n_parameters": sum(p.numel() for p in net.parameters())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import openvino
    import torch

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="medunet-ov-window-") as tmp:
        result = {"benchmark": "openvino_window", "command": " ".join(["python", *sys.argv]),
                  "machine": machine(), "openvino": openvino.__version__, "threads": threads,
                  "geometries": {n: geometry_rows(n, g, args.repeats, threads, Path(tmp))
                                 for n, g in GEOMETRIES.items()}}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
