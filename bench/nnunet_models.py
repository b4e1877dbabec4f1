"""Existing nnU-Net v2 models run inside medunet: the same label maps as nnU-Net's, in less time.

    python bench/nnunet_models.py [--setups drive,la,resenc] [--budget 5m] [--cases N]
        [--nnunet-python /tmp/nnunet_venv/bin/python] [--nnunet-root /tmp/nnunet_root]
        [--work /tmp/medunet_bench_nnunet_models] [--nnunet-no-tta] [--out result.json]

Full run:  python bench/nnunet_models.py --out /tmp/nnunet_models.json
Smoke:     python bench/nnunet_models.py --setups drive --budget 2m --cases 3

nnU-Net v2 lives in its own virtual environment (``--nnunet-python``, see bench/_nnunet.py) and is
never a dependency of medunet. Per setup -- DRIVE ``2d`` with ``nnUNetPlans``, Left Atrium
``3d_fullres`` with ``nnUNetPlans``, and a residual-encoder plan (``nnUNetPlannerResEncM`` ->
``nnUNetResEncUNetMPlans``, on DRIVE ``2d`` unless ``--resenc-on la``):

1. nnU-Net plans and preprocesses the dataset, then trains its default trainer on fold ``all``
   under the wall-clock ``--budget`` (bench/_nnunet.py's budget trainer; a finished training of
   the same setup and budget under ``--nnunet-root`` is reused unless ``--retrain``);
2. nnU-Net predicts the test images itself (bench/_nnunet_timed_predict.py, in its venv:
   ``nnUNetPredictor`` as ``nnUNetv2_predict -device cpu`` sets it up, mirroring on), timing
   ``predict_single_npy_array`` per case after one warm-up case (reading and writing untimed);
3. ``medunet.nnunet.import_nnunet`` turns the same trained model folder into a medunet model
   directory, which predicts the same cases in six rows: fp32 with mirroring (``tta="flip"``,
   restricted to the checkpoint's mirroring axes), bf16 with mirroring, bf16 without TTA,
   ONNX Runtime fp32 with mirroring, and OpenVINO fp32 and bf16 with mirroring (both backends
   run the model's ONNX export). Each case's ``Predictor.predict_case`` is timed after one
   warm-up case; that time includes reading the image and writing the label file, which the
   nnU-Net timing leaves out, so the speed-ups are conservative. Post-processing is off (nnU-Net's
   ``predict_single_npy_array`` applies none).

Reported per row: seconds per case (mean of the steady-state cases), warm-up seconds, the
per-case list; for medunet rows, per case the voxel agreement with nnU-Net's label map (same
mirroring setting; ``--nnunet-no-tta`` adds the nnU-Net row without mirroring that the bf16
no-TTA row is checked against) and the Dice of the two foregrounds; min/mean summaries; the
speed-up (nnU-Net s/case over the row's s/case); and every row's test score from the independent
evaluator in ../shared/peers (DRIVE: pooled F1 inside the FOV masks; LA: mean Dice and HD95).
Checks: fp32 rows agree with nnU-Net on >= 99.9 % of voxels in every case, bf16 rows reach a
foreground Dice >= 0.995 against nnU-Net in every case, and medunet's fastest bf16 row with
mirroring (PyTorch or OpenVINO) is >= 3x faster than nnU-Net with mirroring. A setup (or row)
that fails is recorded with its error and the others go on. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, emit, machine, peer_eval  # noqa: E402
from _nnunet import TRAINER, NnUNet  # noqa: E402

TIMED_PREDICT = Path(__file__).resolve().parent / "_nnunet_timed_predict.py"
DATASETS = {"drive": (1, "Dataset001_DRIVE"), "la": (3, "Dataset003_LeftAtrium")}
CONFIGS = {"drive": "2d", "la": "3d_fullres"}
RESENC_PLANNER, RESENC_PLANS = "nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"
# medunet rows: name -> (backend, precision, tta)
MEDUNET_ROWS = {
    "medunet_fp32_mirror": ("torch", "fp32", "flip"),
    "medunet_bf16_mirror": ("torch", "bf16", "flip"),
    "medunet_bf16_none": ("torch", "bf16", "none"),
    "medunet_onnx_fp32_mirror": ("onnx", "fp32", "flip"),
    "medunet_openvino_fp32_mirror": ("openvino", "fp32", "flip"),
    "medunet_openvino_bf16_mirror": ("openvino", "bf16", "flip"),
}
AGREEMENT_MIN, DICE_MIN, SPEEDUP_GOAL = 0.999, 0.995, 3.0


@dataclass(frozen=True)
class Setup:
    """One nnU-Net model to train, import and compare."""

    name: str
    dataset_id: int
    dataset: str
    config: str
    plans: str = "nnUNetPlans"
    planner: str | None = None


def make_setups(resenc_on: str) -> dict[str, Setup]:
    did, ds = DATASETS[resenc_on]
    return {
        "drive": Setup("drive", *DATASETS["drive"], CONFIGS["drive"]),
        "la": Setup("la", *DATASETS["la"], CONFIGS["la"]),
        "resenc": Setup("resenc", did, ds, CONFIGS[resenc_on], RESENC_PLANS, RESENC_PLANNER),
    }


# ------------------------------------------------------------------------------------------ nnU-Net side
def preprocess(nn: NnUNet, s: Setup) -> None:
    """nnU-Net's planning and preprocessing for the setup, reusing what is already there.

    Another planner (ResEnc) is planned on the default one's fingerprint (``--no_pp``); its
    ``2d``/``3d_fullres`` data identifier is ``nnUNetPlans_<config>``, the default's data, so
    ``nnUNetv2_preprocess`` runs only where that folder is missing.
    """
    nn.preprocess(s.dataset_id, s.config)  # fingerprint + default plans + their data
    if s.planner is None:
        return
    pre = nn.pre / s.dataset
    plans = pre / f"{s.plans}.json"
    env = nn.env(nn.root / "results")
    if not plans.is_file():
        exe = nn.python.parent / "nnUNetv2_plan_and_preprocess"
        nn._sh([str(exe), "-d", str(s.dataset_id), "-pl", s.planner, "-npfp", "2", "--no_pp"], env)
    ident = json.loads(plans.read_text())["configurations"][s.config]["data_identifier"]
    if not (pre / ident).is_dir():
        exe = nn.python.parent / "nnUNetv2_preprocess"
        nn._sh([str(exe), "-d", str(s.dataset_id), "-plans_name", s.plans, "-c", s.config, "-np", "2"], env)


def plan_summary(plans_file: Path, config: str) -> dict:
    """What network nnU-Net planned: patch, class, stages (from the model folder's plans.json)."""
    plans = json.loads(plans_file.read_text())
    c = plans["configurations"][config]
    arch = c["architecture"]
    ak = arch["arch_kwargs"]
    return {
        "plans_name": plans["plans_name"],
        "configuration": config,
        "patch_size": c["patch_size"],
        "batch_size": c["batch_size"],
        "spacing": c["spacing"],
        "network": arch["network_class_name"].split(".")[-1],
        "n_stages": ak["n_stages"],
        "features_per_stage": ak["features_per_stage"],
        "blocks_per_stage": ak.get("n_blocks_per_stage", ak.get("n_conv_per_stage")),
    }


def nnunet_row(nn: NnUNet, s: Setup, model: Path, results: Path, ids: list[str], out: Path,
               mirror: bool, threads: int) -> dict:
    """nnU-Net's own prediction, timed per case in its venv (bench/_nnunet_timed_predict.py)."""
    if out.exists():
        shutil.rmtree(out)
    timing = out.with_name(out.name + "_timing.json")
    cmd = [str(nn.python), str(TIMED_PREDICT), "--model", str(model), "--input",
           str(DATA / s.dataset / "imagesTs"), "--output", str(out), "--cases", ",".join(ids),
           "--json", str(timing), "--threads", str(threads)]
    if not mirror:
        cmd.append("--no-mirroring")
    wall = nn._sh(cmd, nn.env(results))
    res = json.loads(timing.read_text())
    ending = json.loads((DATA / s.dataset / "dataset.json").read_text())["file_ending"]
    return {"engine": "nnunet", "backend": "torch", "precision": "fp32", "mirroring": mirror,
            "seconds_per_case": res.pop("seconds_per_case"), "warmup_s": res.pop("warmup_s"),
            "per_case": res.pop("per_case"), "process_wall_s": round(wall, 1), **res,
            "predictions": str(out), "_files": {i: out / f"{i}{ending}" for i in ids}}


# ------------------------------------------------------------------------------------------ medunet side
def medunet_row(model_dir: Path, images: Path, ids: list[str], out: Path, backend: str, precision: str,
                tta: str) -> dict:
    """medunet's prediction of the imported model, each ``predict_case`` timed after a warm-up."""
    import torch

    from medunet.inference import Predictor
    from medunet.inference.predictor import find_inputs

    for d in (out, out.with_name(out.name + "_warmup")):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    t0 = time.perf_counter()
    # post-processing off: nnU-Net's predict_single_npy_array applies none either
    pred = Predictor.load(model_dir, device="cpu", precision=precision, backend=backend, postprocess="none")
    load_s = time.perf_counter() - t0
    by_id = {c.case_id: c for c in find_inputs(images, pred.plan.in_channels)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RuntimeError(f"medunet finds no input for case(s) {missing[:5]} in {images}")
    cases = [by_id[i] for i in ids]
    warm_dir = out.with_name(out.name + "_warmup")
    t0 = time.perf_counter()
    pred.predict_case(cases[0], warm_dir, tta=tta)
    warmup_s = time.perf_counter() - t0
    shutil.rmtree(warm_dir)
    per_case, files = [], {}
    for c in cases:
        t0 = time.perf_counter()
        files[c.case_id] = pred.predict_case(c, out, tta=tta)
        per_case.append({"case": c.case_id, "seconds": round(time.perf_counter() - t0, 4)})
    secs = [c["seconds"] for c in per_case]
    return {"engine": "medunet", "backend": backend, "precision": precision, "precision_used": pred.precision,
            "tta": tta, "mirroring": tta != "none", "seconds_per_case": round(float(np.mean(secs)), 4),
            "warmup_s": round(warmup_s, 4), "per_case": per_case, "load_s": round(load_s, 3),
            "torch_threads": torch.get_num_threads(), "predictions": str(out), "_files": files}


def _aligned(a: np.ndarray, b: np.ndarray, case: str) -> tuple[np.ndarray, np.ndarray]:
    """Two label maps of one case on the same grid (singleton axes dropped; reversed axis order,
    as a z,y,x writer against an x,y,z reader gives, undone)."""
    a, b = np.squeeze(a), np.squeeze(b)
    if a.shape != b.shape and a.shape == b.shape[::-1]:
        b = np.transpose(b)
    if a.shape != b.shape:
        raise ValueError(f"{case}: label maps differ in shape {a.shape} vs {b.shape}")
    return a, b


def compare(row: dict, ref: dict) -> dict:
    """Per case: voxel agreement and foreground Dice of ``row``'s label map against ``ref``'s;
    written into the row's per-case entries; returns the min/mean summary."""
    from medunet.io import read_label

    agree, dice = [], []
    for entry in row["per_case"]:
        cid = entry["case"]
        a, b = _aligned(read_label(ref["_files"][cid])[0], read_label(row["_files"][cid])[0], cid)
        fa, fb = a > 0, b > 0
        denom = int(fa.sum()) + int(fb.sum())
        entry["agreement"] = float(np.mean(a == b))
        entry["dice_vs_nnunet"] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(fa, fb).sum()) / denom
        agree.append(entry["agreement"])
        dice.append(entry["dice_vs_nnunet"])
    return {"agreement_min": min(agree), "agreement_mean": float(np.mean(agree)),
            "dice_min": min(dice), "dice_mean": float(np.mean(dice))}


# ------------------------------------------------------------------------------------------ one setup
def import_model(result_folder: Path, model_dir: Path) -> Path:
    """nnU-Net's trained model folder (fold ``all``, final checkpoint) as a medunet model directory."""
    from medunet.nnunet import import_nnunet

    if model_dir.exists():
        shutil.rmtree(model_dir)
    return import_nnunet(result_folder, model_dir, folds=["all"], checkpoint="final")


def case_ids(images: Path, ending: str) -> list[str]:
    """Case ids of an nnU-Net images folder (``CASE_XXXX<ending>``), sorted."""
    pat = re.compile(r"^(?P<case>.+)_\d{4}" + re.escape(ending) + "$")
    return sorted({m["case"] for p in images.iterdir() if (m := pat.match(p.name))})


def subset(src: Path, dst: Path, names: list[str]) -> Path:
    """``dst`` with links to the named files of ``src``: the evaluator wants every GT case predicted."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for n in names:
        (dst / n).symlink_to(src / n)
    return dst


def score(pred: Path, gt: Path, mask: Path | None) -> dict:
    """Test accuracy from ../shared/peers/seg_eval.py, as the DRIVE and LA benchmarks report it."""
    res = peer_eval(pred, gt, mask=mask)
    if mask is not None:
        return {"pooled_f1_in_fov": res["pooled"].get("dice"), "mean_dice_in_fov": res["mean"].get("dice")}
    return {"mean_dice": res["mean"].get("dice"), "mean_hd95": res["mean"].get("hd95")}


def _guarded(rows: dict, name: str, fn: Callable[..., dict], *a: object, **kw: object) -> None:
    """Run one row; a failing row is recorded with its error and the setup goes on."""
    try:
        rows[name] = fn(*a, **kw)
    except (Exception, SystemExit) as exc:  # SystemExit: bench/_nnunet.py's failed command
        rows[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)}
    print(f"  {name}: {rows[name].get('seconds_per_case', rows[name].get('error'))}", file=sys.stderr)


def run_setup(s: Setup, nn: NnUNet, args: argparse.Namespace) -> dict:
    """Train, predict with nnU-Net, import, predict with medunet, compare, score, check."""
    from medunet.export import ensure_onnx
    from medunet.planning import Plan
    from medunet.training.loop import parse_duration

    ds = DATA / s.dataset
    ending = json.loads((ds / "dataset.json").read_text())["file_ending"]
    out: dict = {"setup": s.name, "dataset": s.dataset, "configuration": s.config, "plans": s.plans,
                 "planner": s.planner or "ExperimentPlanner"}
    work = args.work / s.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    t0 = time.perf_counter()
    preprocess(nn, s)
    out["preprocess_s"] = round(time.perf_counter() - t0, 1)
    budget_s = parse_duration(args.budget)
    tag = f"nnunet_models_{s.name}_{s.dataset_id:03d}_{s.config}_{int(budget_s)}s"
    results = nn.root / "results" / tag
    model = results / s.dataset / f"{TRAINER}__{s.plans}__{s.config}"
    if args.retrain and results.exists():
        shutil.rmtree(results)
    reused = (model / "fold_all" / "budget_summary.json").is_file()
    t0 = time.perf_counter()
    summary = nn.train(s.dataset_id, s.config, budget_s, tag, plans_name=s.plans)
    out["training"] = {"budget": args.budget, "reused": reused,
                       "process_wall_s": round(time.perf_counter() - t0, 1),
                       **{k: v for k, v in summary.items() if k not in ("epochs", "results")},
                       "model_folder": str(model)}
    out["nnunet_plan"] = plan_summary(model / "plans.json", s.config)

    ids = case_ids(ds / "imagesTs", ending)
    ids = ids[: args.cases] if args.cases else ids
    out["cases"] = len(ids)
    names = [f"{i}{ending}" for i in ids]
    gt = subset(ds / "labelsTs", work / "gt", names)
    mask = subset(ds / "masksTs", work / "masks", names) if (ds / "masksTs").is_dir() else None

    rows: dict[str, dict] = {}
    mirrors = [True, False] if args.nnunet_no_tta else [True]
    for m in mirrors:
        name = f"nnunet_fp32_{'mirror' if m else 'none'}"
        _guarded(rows, name, nnunet_row, nn, s, model, results, ids, work / name, m, args.threads)
        out["nnunet_plan"].setdefault("n_parameters", rows[name].get("n_parameters"))

    model_dir = work / "medunet_model"
    t0 = time.perf_counter()
    try:
        import_model(model, model_dir)
        plan = Plan.load(model_dir)
        out["import_s"] = round(time.perf_counter() - t0, 2)
        out["medunet_plan"] = {"patch_size": plan.patch_size, "in_channels": plan.in_channels,
                               "inference": plan.inference}
    except Exception as exc:  # nnU-Net's rows above still get scored
        out["import_error"] = f"{type(exc).__name__}: {exc}"
        out["import_traceback"] = traceback.format_exc(limit=4)
    for name, (backend, precision, tta) in MEDUNET_ROWS.items():
        if "import_error" in out:
            break
        if backend in ("onnx", "openvino") and "onnx_export_s" not in out:
            t0 = time.perf_counter()
            try:
                ensure_onnx(model_dir)
            except Exception as exc:  # the other rows stand without the export
                rows[name] = {"error": f"ensure_onnx: {type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc(limit=4)}
                continue
            out["onnx_export_s"] = round(time.perf_counter() - t0, 1)
        _guarded(rows, name, medunet_row, model_dir, ds / "imagesTs", ids, work / name, backend, precision,
                 tta)

    ref_mirror = rows.get("nnunet_fp32_mirror", {})
    for name, row in rows.items():
        if "error" in row:
            continue
        try:
            row["test"] = score(Path(row["predictions"]), gt, mask)
        except Exception as exc:
            row["test"] = {"error": f"{type(exc).__name__}: {exc}"}
        if row["engine"] != "medunet":
            continue
        same = rows.get(f"nnunet_fp32_{'mirror' if row['mirroring'] else 'none'}", {})
        ref = same if "_files" in same else ref_mirror
        if "_files" in ref:
            try:
                row["vs_nnunet"] = {"reference": next(k for k, v in rows.items() if v is ref),
                                    "same_settings": ref is same, **compare(row, ref)}
            except Exception as exc:
                row["vs_nnunet"] = {"error": f"{type(exc).__name__}: {exc}"}
        secs = row["seconds_per_case"]
        if "seconds_per_case" in ref_mirror:
            row["speedup_vs_nnunet_mirror"] = round(ref_mirror["seconds_per_case"] / secs, 2)
        if "seconds_per_case" in same:
            row["speedup_same_settings"] = round(same["seconds_per_case"] / secs, 2)
        row["check"] = row_check(name, row)
    out["rows"] = {k: {f: v for f, v in r.items() if f != "_files"} for k, r in rows.items()}
    out["checks"] = setup_checks(out["rows"])
    return out


def row_check(name: str, row: dict) -> dict:
    """fp32 rows: agreement >= 0.999 in every case; bf16 rows: Dice >= 0.995 in every case; both
    against nnU-Net with the same mirroring (``passed`` is None without such a reference)."""
    vs = row.get("vs_nnunet", {})
    if row["precision"] == "bf16":
        key, limit, what = "dice_min", DICE_MIN, f"dice_min >= {DICE_MIN}"
    else:
        key, limit, what = "agreement_min", AGREEMENT_MIN, f"agreement_min >= {AGREEMENT_MIN}"
    ok = None if not vs.get("same_settings") or key not in vs else bool(vs[key] >= limit)
    return {"rule": what, "value": vs.get(key), "passed": ok}


def setup_checks(rows: dict) -> dict:
    """The issue's pass checks for one setup."""
    fp32 = {k: r["check"]["passed"] for k, r in rows.items() if "check" in r and r["precision"] != "bf16"}
    bf16 = {k: r["check"]["passed"] for k, r in rows.items() if "check" in r and r["precision"] == "bf16"}
    fast = {k: r["speedup_same_settings"] for k, r in rows.items() if r.get("precision") == "bf16"
            and r.get("mirroring") and r.get("speedup_same_settings") is not None}
    best = max(fast, key=fast.get) if fast else None
    sp = fast.get(best)
    speed = {"speedup": sp, "row": best, "goal": SPEEDUP_GOAL,
             "passed": None if sp is None else sp >= SPEEDUP_GOAL}
    decided = [v for v in (*fp32.values(), *bf16.values(), speed["passed"]) if v is not None]
    errors = [k for k, r in rows.items() if "error" in r] + [k for k in MEDUNET_ROWS if k not in rows]
    return {f"fp32_agreement_min_ge_{AGREEMENT_MIN}": fp32, f"bf16_dice_min_ge_{DICE_MIN}": bf16,
            "speedup_bf16_mirror_ge_3x": speed, "failed_rows": errors,
            "all_passed": bool(decided) and all(decided) and not errors}


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default="drive,la,resenc", help="comma-separated: drive, la, resenc")
    ap.add_argument("--resenc-on", choices=sorted(DATASETS), default="drive",
                    help="dataset of the ResEnc M setup (drive: 2d, la: 3d_fullres)")
    ap.add_argument("--budget", default="5m", help="nnU-Net training wall-clock budget per setup (5m, 90s)")
    ap.add_argument("--cases", type=int, default=0, help="first N test cases per setup (default all)")
    ap.add_argument("--nnunet-python", type=Path, default=Path("/tmp/nnunet_venv/bin/python"),
                    help="interpreter of nnU-Net's own venv")
    ap.add_argument("--nnunet-root", type=Path, default=Path("/tmp/nnunet_root"),
                    help="nnU-Net raw/preprocessed/results root")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medunet_bench_nnunet_models"))
    ap.add_argument("--nnunet-no-tta", action="store_true",
                    help="also time nnU-Net without mirroring (the reference of the bf16 no-TTA row)")
    ap.add_argument("--retrain", action="store_true", help="train again where this budget's model exists")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads on both sides (nnUNetv2_predict -device cpu uses all cores)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    setups = make_setups(args.resenc_on)
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    bad = [k for k in keys if k not in setups]
    if bad:
        sys.exit(f"unknown setup {', '.join(bad)}: use {', '.join(setups)}")
    for k in keys:
        if not (DATA / setups[k].dataset).is_dir():
            sys.exit(f"{DATA / setups[k].dataset} not found: this benchmark needs ../shared/data")
    from medunet.training.loop import parse_duration

    parse_duration(args.budget)  # a bad budget fails before any training

    import torch

    from medunet.runtime import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    nn = NnUNet(args.nnunet_python, args.nnunet_root)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "benchmark": "nnunet_models",
        "command": shlex.join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "budget": args.budget,
        "machine": {**machine(), "threads": args.threads, "cpu_has_native_bf16": cpu_has_native_bf16(),
                    "nnunet_python": str(args.nnunet_python), "nnunet_root": str(args.nnunet_root)},
        "setups": {},
    }
    for k in keys:
        print(f"setup {k}", file=sys.stderr)
        try:
            result["setups"][k] = run_setup(setups[k], nn, args)
        except (Exception, SystemExit) as exc:  # one setup failing must not lose the others' numbers
            result["setups"][k] = {"setup": k, "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc(limit=4)}
    result["all_passed"] = {k: v.get("checks", {}).get("all_passed", False)
                            for k, v in result["setups"].items()}
    result["loadavg_end"] = os.getloadavg()
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
