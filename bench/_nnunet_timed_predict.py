"""nnU-Net v2's own prediction of a trained model folder, timed case by case (steady state).

Runs inside nnU-Net's virtual environment, never medunet's (bench/nnunet_models.py calls it):

    /tmp/nnunet_venv/bin/python bench/_nnunet_timed_predict.py --model RESULTS/.../nnUNetTrainerBudget__P__C \
        --input imagesTs --output OUT --cases id1,id2 --json timing.json [--no-mirroring] [--threads 2]

Why not ``nnUNetv2_predict``: its wall time mixes process start-up, model loading and a pool of
worker processes into one number. Here nnU-Net's ``nnUNetPredictor`` is set up as
``nnUNetv2_predict`` sets it up (tile step 0.5, Gaussian weighting, CPU, as many torch threads as
cores, fold ``all``, ``checkpoint_final.pth``), each case is read with the plans' own image
reader (not timed), ``predict_single_npy_array`` is timed (nnU-Net's preprocessing, sliding
window, mirroring, resampling back and the argmax), and the segmentation is written with the same
reader/writer (not timed) so it can be compared with other predictions file by file. The first
case is predicted once more beforehand as a warm-up and timed separately.

The budget trainer's class (../shared/peers/nnunet_budget.py) is registered so that nnU-Net
finds the trainer named in the checkpoint without walking all its trainer modules.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"


def register_budget_trainer(peers: Path) -> None:
    """Make ``nnUNetTrainerBudget`` (named in the checkpoint) resolvable by the predictor."""
    sys.path.insert(0, str(peers))
    import nnunet_budget  # in ../shared/peers, on the path only now
    import nnunetv2.inference.predict_from_raw_data as pfrd

    cls = nnunet_budget.make_trainer_class()
    original = pfrd.recursive_find_trainer_class_by_name

    def find(name: str) -> type:
        return cls if name == cls.__name__ else original(name)

    pfrd.recursive_find_trainer_class_by_name = find


def case_files(folder: Path, ending: str, case_id: str) -> list[Path]:
    """The channel files ``{case_id}_XXXX{ending}`` of one case, in channel order."""
    pat = re.compile(re.escape(case_id) + r"_\d{4}" + re.escape(ending) + "$")
    files = sorted(p for p in folder.iterdir() if pat.fullmatch(p.name))
    if not files:
        raise SystemExit(f"no image files for case {case_id} in {folder}")
    return files


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True,
                    help="nnU-Net trained model folder (TRAINER__PLANS__CONF)")
    ap.add_argument("--input", type=Path, required=True, help="folder of nnU-Net-named images (imagesTs)")
    ap.add_argument("--output", type=Path, required=True, help="where the segmentations go")
    ap.add_argument("--cases", required=True, help="comma-separated case ids, predicted in this order")
    ap.add_argument("--json", type=Path, required=True, help="write the timings here")
    ap.add_argument("--no-mirroring", action="store_true", help="disable nnU-Net's mirroring TTA")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads (nnUNetv2_predict -device cpu uses all cores)")
    ap.add_argument("--peers", type=Path, default=PEERS, help="folder with nnunet_budget.py")
    args = ap.parse_args(argv)

    import importlib.metadata

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(args.threads)
    register_budget_trainer(args.peers)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not args.no_mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    t0 = time.perf_counter()
    predictor.initialize_from_trained_model_folder(str(args.model), use_folds=("all",),
                                                   checkpoint_name="checkpoint_final.pth")
    load_s = time.perf_counter() - t0
    reader_writer = predictor.plans_manager.image_reader_writer_class()
    ending = predictor.dataset_json["file_ending"]
    ids = [c for c in args.cases.split(",") if c]
    args.output.mkdir(parents=True, exist_ok=True)

    def timed(case_id: str) -> tuple[object, dict, float]:
        """(segmentation, properties, seconds of predict_single_npy_array alone)."""
        img, props = reader_writer.read_images([str(f) for f in case_files(args.input, ending, case_id)])
        t = time.perf_counter()
        seg = predictor.predict_single_npy_array(img, props, None, None, False)
        return seg, props, time.perf_counter() - t

    _, _, warmup_s = timed(ids[0])
    per_case = []
    for cid in ids:
        seg, props, dt = timed(cid)
        reader_writer.write_seg(seg, str(args.output / f"{cid}{ending}"), props)
        per_case.append({"case": cid, "seconds": round(dt, 4)})
    secs = [c["seconds"] for c in per_case]
    axes = predictor.allowed_mirroring_axes
    result = {
        "mirroring": not args.no_mirroring,
        "allowed_mirroring_axes": list(axes) if axes is not None else None,
        "torch_threads": torch.get_num_threads(),
        "nnunetv2": importlib.metadata.version("nnunetv2"),
        "torch": torch.__version__,
        "network_class": type(predictor.network).__name__,
        "n_parameters": sum(p.numel() for p in predictor.network.parameters()),
        "load_s": round(load_s, 3),
        "warmup_s": round(warmup_s, 4),
        "seconds_per_case": round(sum(secs) / len(secs), 4),
        "per_case": per_case,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_case"}))
    return result


if __name__ == "__main__":
    main()
