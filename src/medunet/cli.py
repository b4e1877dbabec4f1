"""The ``medunet`` command line: parses arguments, calls the library, prints. No logic here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from medunet.errors import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="medunet: plan, train, predict, evaluate, export and serve U-Nets for medical image segmentation.",
)
out = Console()
err = Console(stderr=True)


@app.callback()
def _global(
    max_voxels: float | None = typer.Option(
        None, "--max-voxels", help="largest image any command reads, in voxels x channels (default "
                                   "1024^3); before the command: medunet --max-voxels 2e9 predict ..."),
) -> None:
    """Options for every command."""
    if max_voxels is not None:
        from medunet.io.image import set_max_voxels

        set_max_voxels(int(max_voxels) if max_voxels == int(max_voxels) else max_voxels)


def _parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "," in text:
        return [_parse_value(t) for t in text.split(",")]
    return text


def parse_overrides(items: list[str] | None, files: list[Path] | None = None) -> dict:
    """``--set key=value`` pairs (values as JSON, or comma lists) over JSON/YAML files, merged."""
    from medunet.planning import load_overrides

    result: dict = {}
    for f in files or []:
        result.update(load_overrides(f))
    for item in items or []:
        if "=" not in item:
            raise InputError(f"cannot read --set '{item}'",
                             fix="write it as key=value, e.g. patch_size=256,256")
        key, value = item.split("=", 1)
        result[key.strip()] = _parse_value(value.strip())
    return result


def plan_options(config: str, ct_window: str | None, window: str | None) -> dict:
    """``--config``, ``--ct-window`` and ``--window LEVEL,WIDTH`` as ``make_plan`` arguments."""
    opts: dict = {"config": config, "ct_window": ct_window}
    if window is not None:
        try:
            level, width = (float(v) for v in window.split(","))
        except ValueError as exc:
            raise InputError(f"cannot read --window '{window}'",
                             fix="give LEVEL,WIDTH in HU, e.g. --window 40,400") from exc
        opts["window"] = (level, width)
    return opts


CONFIG_HELP = ("auto, 2d, 3d, cascade (3D data with thick slices also offers 2d; large objects next to "
               "thin structures offer cascade, which auto picks with a budget >= 10 min)")
CT_WINDOW_HELP = "CT window: lung, mediastinum, abdomen, bone, brain (default: foreground percentiles)"
WINDOW_HELP = "CT window LEVEL,WIDTH in HU, e.g. 40,400 (clip, then rescale to [0, 1])"


@app.command()
def plan(
    data: Path = typer.Argument(..., help="dataset folder (nnU-Net v2 raw layout or images/ + masks/)"),
    set_: list[str] | None = typer.Option(None, "--set", help="override a plan field: key=value"),
    plan_file: list[Path] | None = typer.Option(None, "--plan", help="JSON or YAML file of plan overrides"),
    preset: str = typer.Option("default", help="network preset: default, classic, large"),
    config: str = typer.Option("auto", help=CONFIG_HELP),
    ct_window: str | None = typer.Option(None, help=CT_WINDOW_HELP),
    window: str | None = typer.Option(None, help=WINDOW_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="also write plan.json here"),
) -> None:
    """Check a dataset and show the plan (patch, batch, network, normalisation) with reasons."""
    from rich.table import Table

    from medunet.planning import prepare_plan

    dataset, p = prepare_plan(data, preset, parse_overrides(set_, plan_file),
                              **plan_options(config, ct_window, window))
    table = Table(title=f"plan for {dataset.name} ({len(dataset.train)} training cases)")
    table.add_column("field")
    table.add_column("value")
    table.add_column("why")
    rows = [
        ("dim", p.dim, p.reasons.get("dim", "")),
        ("channels", ", ".join(p.channel_names), ""),
        ("labels", ", ".join(f"{v}={n}" for v, n in zip(p.label_values, p.label_names, strict=True)), ""),
        ("configuration", f"{p.configuration} (offered: {', '.join(p.configurations)})",
         p.reasons.get("configuration", "")),
        ("median shape", p.median_shape, p.reasons.get("median_shape", "")),
        ("spacing", p.spacing, p.reasons.get("spacing", "")),
        ("resolution", f"factor {p.resolution.get('factor')}" if p.resolution else "",
         p.reasons.get("resolution", "")),
        ("preprocessing", ", ".join(f"{k}={v}" for k, v in p.preprocessing.items()),
         "; ".join(v for k, v in p.reasons.items() if k.startswith("preprocessing."))),
        ("patch_size", p.patch_size, p.reasons.get("patch_size", "")),
        ("batch_size", p.batch_size, p.reasons.get("batch_size", "")),
        ("network", f"{p.network.get('arch') or 'unet'}, preset {p.network['preset']} "
                    f"{p.network['features']}",
         "; ".join(r for r in (p.reasons.get("network.arch"), p.reasons.get("network", "")) if r)),
        ("normalization", ", ".join(n["scheme"] for n in p.normalization),
         p.reasons.get("normalization", "")),
        ("training", f"{p.training['loss']}, lr {p.training['lr']}", p.reasons.get("training", "")),
    ]
    for name, value, why in rows:
        table.add_row(name, str(value), why)
    out.print(table)
    if output:
        path = p.save(output / "plan.json" if output.suffix != ".json" else output)
        out.print(f"wrote {path}")


def _torchrun(nproc: int) -> int:
    """This ``medunet train`` command again, as ``nproc`` processes under torch's elastic
    launcher (torchrun) on this machine; returns its exit code."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "medunet", *args]
    return subprocess.call(cmd)


@app.command()
def train(
    data: Path = typer.Argument(..., help="dataset folder"),
    output: Path = typer.Option(..., "--output", "-o", help="model directory to write"),
    epochs: int | None = typer.Option(None, help="number of epochs (default from the plan)"),
    time_budget: str | None = typer.Option(None, help="wall-clock budget: 90s, 30m, 1h (per fold)"),
    resume: bool = typer.Option(False, help="continue (or extend) the run in the model directory"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    precision: str = typer.Option("auto", help="auto, fp32, bf16, fp16"),
    seed: int = typer.Option(0, help="random seed (split, sampling, augmentation)"),
    preset: str = typer.Option("default", help="network preset: default, classic, large"),
    arch: str | None = typer.Option(None, help="network variant (see 'medunet archs'): unet (default), "
                                    "classic, resenc, attention, cbam, scse, unetpp, transunet, mednext; "
                                    "the same as --set network.arch=NAME"),
    fold: str | None = typer.Option(None, help="train one cross-validation fold (0..N-1) or 'all' "
                                    "into OUTPUT/fold_<k>/; folds are kept in OUTPUT/splits.json"),
    folds: int | None = typer.Option(None, help="train every fold of an N-fold cross-validation "
                                     "(then predict with OUTPUT: the fold ensemble)"),
    loss: str | None = typer.Option(None, help="dice_ce (default), dice, bce, focal, tversky, lovasz, "
                                    "cldice"),
    optimizer: str | None = typer.Option(None, help="adamw (default) or sgd (Nesterov)"),
    schedule: str | None = typer.Option(None, help="cosine (default, with warm-up), poly, step"),
    lr: float | None = typer.Option(None, help="peak learning rate"),
    ema: float | None = typer.Option(None, help="EMA decay of the weights (0 turns it off)"),
    patience: int | None = typer.Option(None, help="early stopping: epochs without a better "
                                        "smoothed validation Dice (0 turns it off)"),
    tensorboard: bool = typer.Option(False, help="also write TensorBoard events to MODEL/tensorboard"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the training network"),
    config: str = typer.Option("auto", help=CONFIG_HELP),
    ct_window: str | None = typer.Option(None, help=CT_WINDOW_HELP),
    window: str | None = typer.Option(None, help=WINDOW_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help="override a plan field: key=value"),
    plan_file: list[Path] | None = typer.Option(None, "--plan", help="JSON or YAML file of plan overrides"),
    report: bool = typer.Option(True, "--report/--no-report",
                                help="score the validation cases and write validation/report.html"),
    nproc: int = typer.Option(1, help="data-parallel processes (torch.distributed: Gloo on a CPU, NCCL "
                              "on GPUs); the same as torchrun --nproc-per-node N -m medunet train ..."),
    unlabeled: str | None = typer.Option(
        None, "--unlabeled", metavar="[DIR]",
        help="semi-supervised: unlabelled images in DIR (laid out like imagesTr), or, given alone, the "
             "images in imagesTr without a label"),
    semi: str | None = typer.Option(None, help="semi-supervised method: mean-teacher (default), uamt, "
                                    "cps, bcp, pseudo (settings: --set training.semi.KEY=VALUE)"),
    pseudo_threshold: float | None = typer.Option(None, help="--semi pseudo: probability above which a "
                                                  "prediction becomes a target (default 0.9)"),
    quiet: bool = typer.Option(False, help="no progress display"),
) -> None:
    """Train a U-Net on DATA and write a self-describing model directory."""
    from medunet.training import train as run_train
    from medunet.training.trainer import train_folds

    if nproc > 1 and (unlabeled is not None or semi is not None):
        raise InputError("semi-supervised training runs in one process", fix="drop --nproc")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from medunet.runtime import resolve_device
        from medunet.training.distributed import check_gpus

        check_gpus(nproc, resolve_device(device))
        raise typer.Exit(_torchrun(nproc))
    if nproc < 1:
        raise InputError(f"--nproc {nproc} is not a positive number", fix="use 1 or more")
    overrides = parse_overrides(set_, plan_file)
    shortcuts = {"loss": loss, "optimizer": optimizer, "schedule": schedule, "lr": lr, "ema": ema,
                 "patience": patience}
    overrides.update({f"training.{k}": v for k, v in shortcuts.items() if v is not None})
    if arch is not None:
        overrides["network.arch"] = arch
    kwargs = dict(epochs=epochs, time_budget=time_budget, device=device, precision=precision, seed=seed,
                  preset=preset, overrides=overrides, progress=not quiet, report=report,
                  tensorboard=tensorboard, compile=compile_,
                  plan_options=plan_options(config, ct_window, window),
                  unlabeled=None if unlabeled is None else (True if unlabeled == "" else Path(unlabeled)),
                  semi=semi, pseudo_threshold=pseudo_threshold)
    if folds is not None:
        if fold is not None:
            raise InputError("--fold and --folds exclude each other",
                             fix="--folds N trains all N folds; --fold K trains one")
        results = train_folds(data, output, n_folds=folds, resume=resume, **kwargs)
        for r in results:
            out.print(f"{r.model_dir.name}: {r.summary}")
        out.print(f"{len(results)} folds in {output}; predict with it to ensemble them")
        return
    result = run_train(data, output, resume=resume, fold=fold, **kwargs)
    out.print(f"{result.summary} ({result.iterations} steps, {result.seconds:.0f}s); "
              f"model in {result.model_dir}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="model directory written by 'medunet train' (a directory "
                                 "of fold_*/ model directories is an ensemble of the folds), or an nnU-Net "
                                 "v2 trained-model folder (imported for the run: see import-nnunet)"),
    inputs: Path = typer.Argument(..., help="an image file, a folder of images, or a folder of DICOM "
                                  "series (folders of slices)"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for the label maps"),
    extra_models: list[Path] | None = typer.Option(
        None, "--model", "-m", help="another model directory to ensemble with MODEL (repeatable)"),
    save_probabilities: bool = typer.Option(False, help="also write {case}.npz with class probabilities"),
    checkpoint: str = typer.Option("best", help="best or last"),
    tta: str = typer.Option("auto", help="test-time augmentation: auto (the plan's: flip for 3D models, "
                            "none for 2D), none, flip (mirror every axis), full (flips + +-10 degree "
                            "in-plane rotations)"),
    overlap: float | None = typer.Option(None, help="sliding-window overlap in [0, 1) (default: the "
                                         "plan's, 0.5)"),
    postprocess: str = typer.Option("auto", help="auto (the choice made on the validation cases), none, "
                                    "or steps: largest_component, fill_holes, remove_small=N, each "
                                    "optionally LABEL:step, comma-separated"),
    backend: str = typer.Option("torch", help="torch, onnx (ONNX Runtime) or openvino (OpenVINO, the "
                                "fastest on CPUs; pip install 'medunet[openvino]'); the last two export "
                                "the model first when MODEL/export/ has no up-to-date export"),
    int8: bool = typer.Option(False, help="with --backend onnx or openvino: the int8 (static QDQ) model"),
    calibration: Path | None = typer.Option(None, help="with --int8 and no int8 export yet: images to "
                                            "calibrate on (default: the model's validation inputs)"),
    overlay: bool = typer.Option(False, help="also draw OUTPUT/overlays/{case}.png (contours on the image)"),
    dicom_seg: bool = typer.Option(True, "--dicom-seg/--no-dicom-seg",
                                   help="for DICOM series input, also write {case}.seg.dcm (DICOM-SEG)"),
    fill_nonfinite: bool = typer.Option(False, "--fill-nonfinite",
                                        help="replace NaN/inf voxels with the channel's lowest finite value "
                                        "(default: refuse such images)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N (torch backend)"),
    precision: str = typer.Option("auto", help="auto, fp32, bf16, fp16 (torch); auto, fp32, bf16 "
                                  "(openvino); auto, fp32 (onnx)"),
    workers: int | None = typer.Option(None, help="processes predicting side by side (default: one per "
                                       "visible GPU on CUDA, else 1); on a CPU they share the cores"),
    overwrite: bool = typer.Option(False, help="redo cases a previous run into OUTPUT already finished "
                                   "with the same models and settings (default: skip them)"),
    quiet: bool = typer.Option(False, help="no progress display"),
) -> None:
    """Segment images with trained models (sliding window, Gaussian-weighted; TTA, ensembles)."""
    import tempfile
    import time

    from medunet.inference import Predictor
    from medunet.inference.predictor import EXPORT_BACKENDS, check_backend
    from medunet.nnunet import import_nnunet, is_nnunet_folder

    check_backend(backend, precision, int8)  # before anything is imported or exported for it
    models = [model, *(extra_models or [])]
    scratch = None
    if any(is_nnunet_folder(m) for m in models):  # an nnU-Net result folder: import it for this run
        scratch = tempfile.TemporaryDirectory(prefix="medunet-nnunet-")
        models = [import_nnunet(m, Path(scratch.name) / f"m{i}") if is_nnunet_folder(m) else m
                  for i, m in enumerate(models)]
    try:
        if backend in EXPORT_BACKENDS:  # export first where there is no up-to-date export
            from medunet.export import ensure_onnx_all

            ensure_onnx_all(models, checkpoint, int8, calibration)
        predictor = Predictor.load(models, checkpoint=checkpoint, device=device, precision=precision,
                                   backend=backend, int8=int8, overlap=overlap, postprocess=postprocess)
        t0 = time.perf_counter()
        predictor.predict(inputs, output, save_probabilities=save_probabilities, progress=not quiet, tta=tta,
                          overlay=overlay, dicom_seg=dicom_seg, fill_nonfinite_values=fill_nonfinite,
                          workers=workers, overwrite=overwrite)
        dt = time.perf_counter() - t0
        n = len(predictor.members)
        run = predictor.last_run
        skipped = (f"; {run['skipped']} finished earlier, skipped (--overwrite redoes them)"
                   if run["skipped"] else "")
        per_case = dt / max(1, run["predicted"])
        out.print(f"wrote {run['predicted']} label map(s) to {output} ({per_case:.2f}s per case; "
                  f"{n} model{'s' if n > 1 else ''}, {backend} {predictor.precision}, tta {tta}{skipped})")
        if scratch is not None and backend == "torch" and predictor.device.type == "cpu":
            # BENCHMARKS.md (issue 18): OpenVINO bf16 is 1.5-1.9x PyTorch bf16 on nnU-Net's networks
            out.print("tip: nnU-Net's networks predict 1.5-1.9x faster on a CPU with --backend openvino "
                      "(pip install 'medunet[openvino]')")
    finally:
        if scratch is not None:
            scratch.cleanup()


@app.command()
def export(
    model: Path = typer.Argument(..., help="model directory written by 'medunet train'"),
    format_: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
    int8: bool = typer.Option(False, help="ONNX only: static int8 (QDQ) quantisation"),
    output: Path | None = typer.Option(None, "--output", "-o",
                                       help="file to write (default: MODEL/export/model[_int8].onnx)"),
    calibration: Path | None = typer.Option(None, help="images to calibrate int8 on (default: the "
                                            "model's validation inputs, found via validation/scores.json)"),
    checkpoint: str = typer.Option("best", help="best or last"),
) -> None:
    """Export a model to ONNX (fp32 or int8) or TorchScript and check it against PyTorch."""
    from medunet.export import export_model

    res = export_model(model, format_, int8=int8, output=output, calibration=calibration,
                       checkpoint=checkpoint)
    out.print(f"wrote {res.path}")
    out.print(f"check vs PyTorch: {res.summary()} (stored in {model / 'export' / 'export_check.json'})")


@app.command()
def evaluate(
    pred: Path = typer.Argument(..., help="folder (or file) of predicted label maps"),
    gt: Path = typer.Argument(..., help="folder (or file) of ground-truth label maps"),
    mask: Path | None = typer.Option(None, help="folder of region masks: score only inside them"),
    probs: Path | None = typer.Option(None, help="folder of {case}.npz probabilities (ROC/PR-AUC)"),
    labels: str | None = typer.Option(None, help="label values to score, e.g. 1,2 (default: all)"),
    tolerance: float = typer.Option(1.0, help="surface Dice tolerance in mm"),
    json_path: Path | None = typer.Option(None, "--json", help="write all results as JSON"),
    csv_path: Path | None = typer.Option(None, "--csv", help="write the per-case table as CSV"),
    report: Path | None = typer.Option(None, help="write a self-contained HTML report"),
    model: Path | None = typer.Option(None, help="model directory: add its training curves to the report"),
    images: Path | None = typer.Option(None, help="image folder: draw overlays in the report"),
    workers: int | None = typer.Option(None, help="processes over cases"),
) -> None:
    """Score predictions against ground truth: Dice, IoU, distances; per case, mean and pooled."""
    from medunet.evaluation import evaluate as run_eval

    label_list = None
    if labels:
        try:
            label_list = [int(v) for v in labels.split(",")]
        except ValueError as exc:
            raise InputError(f"cannot read --labels '{labels}'", fix="write integers, e.g. 1,2") from exc
    res = run_eval(pred, gt, mask=mask, probs=probs, labels=label_list, tolerance=tolerance,
                   json_path=json_path, csv_path=csv_path, report=report, model_dir=model,
                   images=images, workers=workers)
    out.print(res.table())
    for path in (json_path, csv_path, report):
        if path:
            out.print(f"wrote {path}")


@app.command()
def distill(
    teacher: Path = typer.Argument(..., help="trained model directory (the teacher)"),
    output: Path = typer.Option(..., "--output", "-o", help="student model directory to write"),
    data: Path | None = typer.Option(None, help="dataset the teacher was trained on (default: the one "
                                     "its splits.json records)"),
    width: float = typer.Option(0.5, help="student channels per level as a share of the teacher's, (0, 1]"),
    epochs: int | None = typer.Option(None, help="number of epochs (default from the plan)"),
    time_budget: str | None = typer.Option(None, help="wall-clock budget: 90s, 10m, 1h"),
    temperature: float = typer.Option(2.0, help="softens both models' outputs in the distillation term"),
    alpha: float = typer.Option(0.5, help="share of the distillation term; the rest is the plan's "
                                "loss on the labels"),
    init: str = typer.Option("prune", help="prune (L1-norm channel pruning of the teacher; unet and classic "
                             "archs) or random (any arch)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    precision: str = typer.Option("auto", help="auto, fp32, bf16, fp16"),
    seed: int = typer.Option(0, help="random seed (sampling, augmentation, initialisation)"),
    resume: bool = typer.Option(False, help="continue (or extend) the distillation in the student directory"),
    quiet: bool = typer.Option(False, help="no progress display"),
) -> None:
    """Shrink a trained model: a thinner student, pruned from TEACHER and distilled on its outputs."""
    from medunet.training.distill import distill as run_distill

    r = run_distill(teacher, output, data, width=width, epochs=epochs, time_budget=time_budget,
                    temperature=temperature, alpha=alpha, init=init, device=device, precision=precision,
                    seed=seed, progress=not quiet, resume=resume)
    out.print(f"student ({r.student_params:,} parameters, {r.student_params / r.teacher_params:.0%} of the "
              f"teacher's, init {r.init_used}): validation Dice {r.student_dice:.4f} vs teacher "
              f"{r.teacher_dice:.4f}; {r.student_seconds_per_image:.3f} vs {r.teacher_seconds_per_image:.3f} "
              f"s per image ({r.speedup:.2f}x); model in {r.student_dir}")


@app.command()
def archs() -> None:
    """List the network variants (--arch) with their parameter counts at the planned sizes."""
    from rich.table import Table

    from medunet.nets import arch_table

    table = Table(title="network variants: medunet train --arch NAME (default preset, 1 channel, 2 classes, "
                        "4 down-samplings; 3D with deep supervision)")
    for col in ("arch", "2D params", "3D params", "what it is"):
        table.add_column(col, justify="right" if "params" in col else "left")
    for row in arch_table():
        table.add_row(row["arch"], f"{row['params_2d'] / 1e6:.2f} M", f"{row['params_3d'] / 1e6:.2f} M",
                      row["summary"])
    out.print(table)


@app.command("augment-preview")
def augment_preview(
    data: Path = typer.Argument(..., help="dataset folder"),
    output: Path = typer.Option(..., "--output", "-o", help="PNG to write"),
    n: int = typer.Option(16, "--n", help="number of augmented patches to draw"),
    seed: int = typer.Option(0, help="random seed (cases, patches, augmentation)"),
    set_: list[str] | None = typer.Option(None, "--set",
                                          help="override a plan field, e.g. training.augment.rotation.p=1"),
    plan_file: list[Path] | None = typer.Option(None, "--plan", help="JSON or YAML file of plan overrides"),
) -> None:
    """Draw a grid of augmented training patches with their labels: what the network sees."""
    from medunet.training.preview import augment_preview as draw

    path = draw(data, output, n=n, seed=seed, overrides=parse_overrides(set_, plan_file))
    out.print(f"wrote {path}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="a Medical Segmentation Decathlon task folder, or a folder with "
                               "images/ and masks/"),
    dst: Path = typer.Argument(..., help="dataset folder to create (with --id: the raw folder that "
                               "receives DatasetNNN_NAME/)"),
    name: str | None = typer.Option(None, help="dataset name (default: the task or folder name)"),
    id_: int | None = typer.Option(None, "--id", help="nnU-Net dataset id 1-999: write DST/DatasetNNN_NAME"),
) -> None:
    """Convert an MSD task or an images/ + masks/ folder into the nnU-Net v2 raw layout."""
    from medunet.datasets.convert import convert_dataset

    path = convert_dataset(src, dst, name=name, dataset_id=id_, progress=True)
    out.print(f"wrote {path}")


@app.command()
def demo(
    output: Path = typer.Option(Path("medunet_demo"), "--output", "-o",
                                help="folder for data, model, results"),
    time_budget: str = typer.Option("60s", help="training budget"),
    seed: int = typer.Option(0, help="random seed"),
    quiet: bool = typer.Option(False, help="no progress display"),
) -> None:
    """Generate a synthetic dataset, train, predict, evaluate and draw an overlay."""
    from medunet.demo import run_demo

    res = run_demo(output, time_budget=time_budget, seed=seed, progress=not quiet)
    out.print(res.evaluation.table())
    out.print(f"demo test Dice {res.dice:.4f}  (trained {res.seconds_train:.0f}s)")
    out.print(f"overlay: {res.overlay}")


@app.command()
def serve(
    model: Path = typer.Argument(..., help="model directory written by 'medunet train'"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, help="TCP port"),
    workers: int = typer.Option(1, help="prediction threads sharing the model (1 is best on a CPU)"),
    max_upload_mb: float = typer.Option(512, help="largest accepted upload in MB (413 above it)"),
    queue_size: int = typer.Option(8, help="requests that may wait for a worker (503 beyond them)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    precision: str = typer.Option("auto", help="auto, fp32, bf16, fp16"),
    backend: str = typer.Option("torch", help="torch, onnx or openvino (as in 'medunet predict')"),
    upload_timeout: float = typer.Option(120, help="seconds a client may take to send an upload (408 after)"),
    job_timeout: float = typer.Option(600, help="seconds from a received upload to the answer (504 after)"),
    tmp_dir: Path | None = typer.Option(None, help="folder for the uploads being processed (default: the "
                                                    "system's); stale ones left by a crash are removed"),
    token: str | None = typer.Option(None, help="require 'Authorization: Bearer TOKEN' on the API; the page "
                                                "is opened as /?token=TOKEN"),
    token_file: Path | None = typer.Option(None, help="read the token from this file's first line "
                                                      "(other users cannot see it in 'ps')"),
    max_voxels: int | None = typer.Option(None, help="largest image the server reads, in voxels x "
                                                     "channels (422 above; default 1024^3)"),
) -> None:
    """Serve a web page and a REST API (docs at /docs) that segment uploaded images."""
    from medunet.serve import run
    from medunet.serve.auth import read_token_file

    if token is not None and token_file is not None:
        raise InputError("give --token or --token-file, not both")
    if token_file is not None:
        token = read_token_file(token_file)
    page = f"http://{host}:{port}/" + ("?token=..." if token else "")
    out.print(f"serving {model} on {page} (API docs at /docs); Ctrl+C stops")
    run(model, host=host, port=port, workers=workers, max_upload_mb=max_upload_mb,
        queue_size=queue_size, device=device, precision=precision, tmp_dir=tmp_dir,
        upload_timeout=upload_timeout, job_timeout=job_timeout, token=token, max_voxels=max_voxels,
        backend=backend)


@app.command("import-nnunet")
def import_nnunet_cmd(
    result_folder: Path = typer.Argument(..., help="an nnU-Net v2 trained-model folder: nnUNet_results/"
                                         "DatasetXXX/TRAINER__PLANS__CONFIGURATION"),
    output: Path = typer.Option(..., "--output", "-o", help="the new model directory"),
    folds: str | None = typer.Option(None, help="folds to import, e.g. --folds 0 1 2 3 4, or all (nnU-Net's "
                                     "fold_all); default: every numbered fold (several: an ensemble)"),
    checkpoint: str = typer.Option("final", help="final (nnU-Net's default) or best"),
) -> None:
    """Turn a trained nnU-Net v2 model into a medunet model directory (predict, export, serve it)."""
    from medunet.nnunet import import_nnunet

    chosen = [f for f in folds.replace(",", " ").split() if f] if folds else None
    path = import_nnunet(result_folder, output, folds=chosen, checkpoint=checkpoint)
    n = len(list(path.glob("fold_*/plan.json"))) or 1
    out.print(f"imported {n} fold{'s' if n > 1 else ''} of {result_folder} into {path}; predict with "
              f"'medunet predict {path} IMAGES -o OUT'")


# options whose value may be left out (typer options always take one): given alone, last or
# before another option, they are passed on as ``--option=`` (an empty value)
OPTIONAL_VALUES = ("--unlabeled",)
# options that take several values in a row (``--folds 0 1 2``): joined into one (``0,1,2``);
# only fold-like tokens are taken, so a positional argument after them stays one
MULTI_VALUES = {"--folds": lambda v: v.isdigit() or v == "all"}


def optional_values(args: list[str]) -> list[str]:
    """``--unlabeled`` without a folder becomes ``--unlabeled=``, which ``train`` reads as
    "the images in imagesTr that have no label"."""
    out = list(args)
    for i, a in enumerate(out):
        if a in OPTIONAL_VALUES and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = f"{a}="
    for opt, takes in MULTI_VALUES.items():
        if opt in out:
            i = out.index(opt)
            j = i + 1
            while j < len(out) and takes(out[j]):
                j += 1
            if j > i + 2:
                out[i + 1 : j] = [",".join(out[i + 1 : j])]
    return out


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(args=optional_values(sys.argv[1:]))
    except InputError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
