"""Tests for medunet.evaluation: hand-computed metrics, the empty-mask conventions,
independent references (MONAI for surface distances, scikit-learn for AUCs, the peer
evaluator seg_eval.py on real data), evaluate() on PNG and NIfTI folders, errors, outputs,
and the HTML report in a real headless browser."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medunet.errors import InputError
from medunet.evaluation import (
    EvaluationResult,
    PooledCurve,
    compute_metrics,
    evaluate,
    roc_pr_auc,
    surface_distances,
)

SHARED = Path(__file__).parents[2] / "shared"
DATA = SHARED / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
nan = float("nan")


def approx(v, **kw):
    return pytest.approx(v, nan_ok=True, **kw)


def blob(shape, seed, sigma=3.0, frac=0.25):
    """A random smooth binary shape filling about ``frac`` of the array."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return f > np.quantile(f, 1 - frac)


def perturb(mask, seed):
    """A plausible imperfect prediction: shifted, dilated or eroded, with a few specks."""
    rng = np.random.default_rng(seed)
    out = np.roll(mask, 1, axis=0)
    out = ndimage.binary_dilation(out) if seed % 2 else ndimage.binary_erosion(out)
    out |= rng.random(mask.shape) > 0.998
    return out


# ------------------------------------------------------------------ hand-computed values
def test_count_metrics_and_volumes_by_hand():
    pred = np.array([[1, 1, 0, 0]])
    gt = np.array([[1, 0, 1, 0]])
    m = compute_metrics(pred, gt, (2.0, 3.0), [1])[1]
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 1)
    assert m["dice"] == 0.5 and m["iou"] == approx(1 / 3)
    assert m["precision"] == m["sensitivity"] == m["specificity"] == m["accuracy"] == 0.5
    assert (m["vol_gt"], m["vol_pred"], m["volume_diff"], m["rel_volume_diff"]) == (12, 12, 0, 0)
    m = compute_metrics(np.array([[1, 1, 1, 0]]), gt, None, [1])[1]
    assert m["volume_diff"] == 1.0 and m["rel_volume_diff"] == 0.5


def test_case_dice_and_paired_p_by_hand():
    from medunet.evaluation.metrics import case_dice, paired_p
    # counts (tp, fp, fn) per class; case 1: fg Dice 2*3/(6+1+1) = 0.75, case 2: empty -> 1
    counts = np.array([[[0, 3], [0, 1], [0, 1]], [[0, 0], [0, 0], [0, 0]]])
    assert case_dice(counts) == approx([0.75, 1.0])
    # differences 0.1, 0.2, 0.3: t = 0.2 / (0.1 / sqrt 3) = sqrt 12 with 2 degrees of freedom,
    # where the t distribution's CDF is 1/2 + t / (2 sqrt(2 + t^2)): p = 1/2 - sqrt 12 / (2 sqrt 14)
    assert paired_p([0.6, 0.7, 0.8], [0.5, 0.5, 0.5]) == approx(0.5 - math.sqrt(12) / (2 * math.sqrt(14)))
    assert paired_p([0.5, 0.5, 0.5], [0.6, 0.7, 0.8]) > 0.9  # worse: one-sided
    assert paired_p([0.9], [0.1]) == 1.0  # one case shows nothing
    assert paired_p([0.5, 0.6], [0.5, 0.6]) == 1.0  # no difference
    assert paired_p([0.7, 0.8], [0.6, 0.7]) == 0.0  # every case gains the same: no spread


def test_surface_distances_by_hand():
    # one-row images: every foreground pixel is a surface pixel (rows above/below are outside)
    gt = np.zeros((1, 8), int)
    pred = np.zeros((1, 8), int)
    gt[0, 0:3] = 1
    pred[0, 0:5] = 1
    m = compute_metrics(pred, gt, (1.0, 1.0), [1], tolerance=1.0)[1]
    # pred->gt: 0,0,0,1,2; gt->pred: 0,0,0 -> pooled [0,0,0,0,0,0,1,2]
    assert m["hd"] == 2.0
    assert m["assd"] == pytest.approx(3 / 8)
    assert m["hd95"] == pytest.approx(1.65)  # index 0.95*7 = 6.65 between 1 and 2
    # (MONAI's hd95 would be max(p95(pred->gt), p95(gt->pred)) = 1.8: see the MONAI test)
    assert m["nsd"] == pytest.approx(7 / 8)
    # spacing scales the distances along the axis they run on
    m = compute_metrics(pred, gt, (5.0, 0.5), [1], tolerance=1.0)[1]
    assert (m["hd"], m["assd"], m["hd95"], m["nsd"]) == approx((1.0, 3 / 16, 0.825, 1.0))
    # a single pixel each, 3 columns apart, 2 units per column
    a = np.zeros((1, 5), bool)
    b = np.zeros((1, 5), bool)
    a[0, 0], b[0, 3] = True, True
    d_ab, d_ba = surface_distances(a, b, (1.0, 2.0))
    assert d_ab.tolist() == [6.0] and d_ba.tolist() == [6.0]
    assert compute_metrics(a, b, (1.0, 2.0), [1], tolerance=6.0)[1]["nsd"] == 1.0


def test_interior_is_not_surface():
    gt = np.zeros((9, 9), int)
    gt[2:7, 2:7] = 1  # 5x5 square: 16 boundary pixels, 9 interior ones
    d_pg, d_gp = surface_distances(gt, gt, (1.0, 1.0))
    assert d_pg.size == d_gp.size == 16 and not d_pg.any()
    pred = np.zeros_like(gt)
    pred[2:7, 3:8] = 1  # shifted one column right
    m = compute_metrics(pred, gt, None, [1])[1]
    assert m["hd"] == 1.0 and m["dice"] == pytest.approx(2 * 20 / 50)


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        # both empty
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]],
         dict(dice=1, iou=1, precision=nan, sensitivity=nan, specificity=1, accuracy=1,
              hd95=0, hd=0, assd=0, nsd=1, rel_volume_diff=0)),
        # GT empty, prediction not
        ([[1, 0], [0, 0]], [[0, 0], [0, 0]],
         dict(dice=0, iou=0, precision=0, sensitivity=nan, specificity=0.75, accuracy=0.75,
              hd95=nan, hd=nan, assd=nan, nsd=0, rel_volume_diff=nan)),
        # prediction empty, GT not
        ([[0, 0], [0, 0]], [[0, 1], [1, 0]],
         dict(dice=0, iou=0, precision=nan, sensitivity=0, specificity=1, accuracy=0.5,
              hd95=nan, hd=nan, assd=nan, nsd=0, rel_volume_diff=-1)),
    ],
)
def test_empty_conventions(pred, gt, expected):
    m = compute_metrics(np.array(pred), np.array(gt), None, [1])[1]
    for k, v in expected.items():
        assert m[k] == approx(v), k


def test_mask_restricts_everything():
    gt = np.zeros((6, 6), int)
    pred = np.zeros((6, 6), int)
    gt[1:3, 1:3] = 1
    pred[1:3, 1:3] = 1
    pred[5, 5] = 1  # a false positive outside the region
    region = np.zeros((6, 6), int)
    region[:4, :4] = 1
    m = compute_metrics(pred, gt, None, [1], mask=region)[1]
    assert m["dice"] == 1.0 and m["hd"] == 0.0 and m["tn"] == 16 - 4
    assert compute_metrics(pred, gt, None, [1])[1]["fp"] == 1


def test_multilabel_and_probability_channels():
    gt = np.array([[0, 1, 2, 2]])
    pred = np.array([[0, 1, 1, 2]])
    probs = np.stack([np.array([[0.9, 0.1, 0.0, 0.0]]),
                      np.array([[0.05, 0.8, 0.6, 0.1]]),
                      np.array([[0.05, 0.1, 0.4, 0.9]])])
    out = compute_metrics(pred, gt, None, [1, 2], probs=probs)
    assert out[1]["dice"] == pytest.approx(2 / 3) and out[2]["dice"] == pytest.approx(2 / 3)
    assert out[2]["roc_auc"] == 1.0 and out[1]["roc_auc"] == 1.0
    with pytest.raises(ValueError, match="channel"):
        compute_metrics(pred, gt, None, [3], probs=probs)


# ------------------------------------------------------------------ independent references
def _monai_inputs(pred, gt):
    import torch

    def onehot(m):
        m = torch.as_tensor(m, dtype=torch.float32)
        return torch.stack([1 - m, m])[None]

    return onehot(pred), onehot(gt)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal
@pytest.mark.parametrize(
    ("shape", "spacing", "seed"),
    [((64, 48), (1.0, 1.0), 0), ((57, 61), (0.7, 1.3), 1),
     ((40, 36, 14), (1.25, 0.8, 2.5), 2), ((30, 34, 22), (0.6, 0.6, 1.9), 3)],
)
def test_surface_metrics_against_monai(shape, spacing, seed):
    """HD, HD95, ASSD and NSD against MONAI on random 2D and anisotropic 3D masks.

    MONAI finds edges and distances as we do (mask XOR its face-connected erosion; exact
    Euclidean distances in physical units), but its symmetric HD95 is the maximum of the two
    directed 95th percentiles, whereas ours (medpy / seg_eval.py) is the 95th percentile of
    both directions pooled. So: HD (max), ASSD (mean of both directions pooled) and NSD are
    compared directly; each directed HD95 is compared with MONAI's ``directed=True``; and our
    pooled HD95 is compared with the percentile of MONAI's own two distance arrays.
    """
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )
    from monai.metrics.utils import get_edge_surface_distance

    gt = blob(shape, seed)
    pred = perturb(gt, seed + 10)
    tol = 1.5 * min(spacing)
    ours = compute_metrics(pred.astype(int), gt.astype(int), spacing, [1], tolerance=tol)[1]
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    p, g = _monai_inputs(pred, gt)
    sp = list(spacing)
    close = dict(abs=0.1 * min(spacing))  # a tenth of a voxel
    hd = compute_hausdorff_distance(p, g, spacing=sp).item()
    assert ours["hd"] == pytest.approx(hd, **close)
    for a, b, directed in ((p, g, d_pg), (g, p, d_gp)):
        ref = compute_hausdorff_distance(a, b, percentile=95, directed=True, spacing=sp).item()
        assert np.percentile(directed, 95) == pytest.approx(ref, **close)
    sym95 = compute_hausdorff_distance(p, g, percentile=95, spacing=sp).item()
    assert max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)) == pytest.approx(sym95, **close)
    _, (m_pg, m_gp), _ = get_edge_surface_distance(
        torch.as_tensor(pred), torch.as_tensor(gt), spacing=sp, symmetric=True
    )
    pooled95 = np.percentile(np.concatenate([m_pg.numpy(), m_gp.numpy()]), 95)
    assert ours["hd95"] == pytest.approx(pooled95, **close)
    assd = compute_average_surface_distance(p, g, symmetric=True, spacing=sp).item()
    assert ours["assd"] == pytest.approx(assd, **close)
    nsd = compute_surface_dice(p, g, class_thresholds=[tol], spacing=sp).item()
    assert ours["nsd"] == pytest.approx(nsd, abs=1e-6)


def test_auc_against_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for n, decimals in ((50, 1), (2000, 2), (5000, 6)):
        y = rng.random(n) < 0.3
        s = np.round(np.clip(y * 0.3 + rng.random(n) * 0.8, 0, 1), decimals)  # with ties
        auc, ap = roc_pr_auc(y, s)
        assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert all(math.isnan(v) for v in roc_pr_auc(np.zeros(5, bool), np.arange(5.0)))
    # pooled over cases: exact, and the histogram fallback for very large sets
    ys = [rng.random(3000) < 0.2 for _ in range(3)]
    ss = [np.clip(y * 0.25 + rng.random(y.size) * 0.75, 0, 1).astype(np.float32) for y in ys]
    exact, hist = PooledCurve(), PooledCurve(exact_limit=0)
    for y, s in zip(ys, ss, strict=True):
        exact.add(y, s)
        hist.add(y, s)
    yy, sc = np.concatenate(ys), np.concatenate(ss)
    e, h = exact.curves(), hist.curves()
    assert e["method"] == "exact" and h["method"].startswith("histogram")
    assert e["roc_auc"] == pytest.approx(roc_auc_score(yy, sc), abs=1e-12)
    assert e["pr_auc"] == pytest.approx(average_precision_score(yy, sc), abs=1e-12)
    assert h["roc_auc"] == pytest.approx(e["roc_auc"], abs=1e-4)
    assert h["pr_auc"] == pytest.approx(e["pr_auc"], abs=1e-3)


# ------------------------------------------------------------------ evaluate() on files
def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def png_set(tmp_path_factory):
    """Six 2D cases (labels 0/1/2, case 'c5' has no label 2), FOV masks, probabilities,
    RGB images and a training log (shared by the tests of this module: read-only)."""
    tmp_path = tmp_path_factory.mktemp("png")
    cases = {}
    rng = np.random.default_rng(1)
    for i in range(6):
        gt = blob((48, 52), 100 + i).astype(np.uint8)
        if i != 5:
            gt[blob((48, 52), 200 + i, frac=0.08)] = 2
        pred = gt.copy()
        pred[perturb(gt > 0, i) & (gt == 0)] = 1
        pred[np.roll(gt == 2, 2, axis=1)] = 2 if i != 5 else 0
        if i == 3:
            pred[:] = 0  # an empty prediction: distances NaN
        fov = np.zeros((48, 52), np.uint8)
        fov[2:-2, 3:-3] = 1
        p = np.stack([(pred == k) * 0.6 + rng.random(pred.shape) * 0.4 for k in range(3)])
        p = (p / p.sum(0)).astype(np.float32)
        case = f"c{i}"
        _write_png(tmp_path / "gt" / f"{case}.png", gt)
        _write_png(tmp_path / "pred" / f"{case}.png", pred)
        _write_png(tmp_path / "mask" / f"{case}.png", fov)
        (tmp_path / "probs").mkdir(exist_ok=True)
        np.savez_compressed(tmp_path / "probs" / f"{case}.npz", probabilities=p)
        img = (rng.random((48, 52, 3)) * 60 + gt[..., None] * 80).astype(np.uint8)
        _write_png(tmp_path / "images" / f"{case}_0000.png", img)
        cases[case] = (gt, pred, fov, p)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "log.csv").write_text(
        "epoch,train_loss,val_dice,lr,time,note\n"
        + "".join(f"{e},{1 / (e + 1):.4f},{0.5 + e / 40:.4f},0.01,{e * 3.1},x\n" for e in range(12))
    )
    return tmp_path, cases


def test_evaluate_png_folder(png_set, tmp_path):
    root, cases = png_set
    res = evaluate(root / "pred", root / "gt", mask=root / "mask", probs=root / "probs",
                   json_path=tmp_path / "out" / "m.json", csv_path=tmp_path / "out" / "m.csv",
                   workers=1, progress=False)
    assert isinstance(res, EvaluationResult)
    assert res.labels == [1, 2] and [c["case"] for c in res.cases] == sorted(cases)
    for row in res.cases:
        gt, pred, fov, p = cases[row["case"]]
        ref = compute_metrics(pred, gt, (1.0, 1.0), [1, 2], mask=fov, probs=p)
        for lab in (1, 2):
            for k, v in ref[lab].items():
                assert row[str(lab)][k] == approx(v), (row["case"], lab, k)
    # case c5 has no label 2 anywhere: both-empty conventions
    c5 = res.cases[5]["2"]
    assert c5["dice"] == 1.0 and c5["hd95"] == 0.0 and math.isnan(c5["precision"])
    # NaN-aware mean: c3's empty prediction has no HD95 and is counted
    s = res.summary["mean"]["1"]["hd95"]
    assert s["n_nan"] == 1 and s["n"] == 5
    vals = [r["1"]["hd95"] for r in res.cases if not math.isnan(r["1"]["hd95"])]
    assert s["mean"] == pytest.approx(np.mean(vals)) and s["std"] == pytest.approx(np.std(vals))
    assert res.metric(1, "hd95") == pytest.approx(np.mean(vals))
    # pooled: counts summed over cases
    tp = sum(r["1"]["tp"] for r in res.cases)
    fp = sum(r["1"]["fp"] for r in res.cases)
    fn = sum(r["1"]["fn"] for r in res.cases)
    assert res.metric("1", "dice", kind="pooled") == pytest.approx(2 * tp / (2 * tp + fp + fn))
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([(cases[c][0] == 1)[cases[c][2] > 0] for c in sorted(cases)])
    sc = np.concatenate([cases[c][3][1][cases[c][2] > 0] for c in sorted(cases)])
    assert res.metric(1, "roc_auc", kind="pooled") == pytest.approx(roc_auc_score(y, sc))
    # outputs
    data = json.loads((tmp_path / "out" / "m.json").read_text())
    assert data["summary"]["mean"]["1"]["dice"]["mean"] == pytest.approx(res.metric(1, "dice"))
    assert data["cases"][3]["1"]["hd95"] is None  # NaN -> null: strict JSON
    rows = list(csv.DictReader((tmp_path / "out" / "m.csv").open()))
    assert len(rows) == 12 and rows[0]["case"] == "c0" and float(rows[0]["dice"]) == approx(
        res.cases[0]["1"]["dice"])
    assert rows[6]["hd95"] == "nan"
    table = res.table()
    assert table.row_count > 10 and len(table.columns) == 5
    # the process pool gives the same numbers, with a progress bar
    res2 = evaluate(root / "pred", root / "gt", mask=root / "mask", probs=root / "probs",
                    workers=2, progress=True)
    assert json.dumps(res2.to_dict()["cases"]) == json.dumps(res.to_dict()["cases"])
    assert res2.summary["pooled"] == res.summary["pooled"]


def test_evaluate_label_subset_and_single_files(png_set, tmp_path):
    root, cases = png_set
    res = evaluate(root / "pred", root / "gt", labels=[2], workers=1, progress=False)
    assert res.labels == [2] and "1" not in res.cases[0]
    one = evaluate(root / "pred" / "c1.png", root / "gt" / "c1.png", progress=False)
    gt, pred = cases["c1"][:2]
    assert one.cases[0]["1"]["dice"] == compute_metrics(pred, gt, None, [1])[1]["dice"]
    # a predictions subset against the whole GT folder is fine; the rest is listed
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.copy(root / "pred" / "c2.png", sub)
    res = evaluate(sub, root / "gt", progress=False)
    assert res.meta["gt_without_prediction"] == ["c0", "c1", "c3", "c4", "c5"]


def _write_nifti(path: Path, arr: np.ndarray, spacing) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.diag([*spacing, 1.0])), path)


@pytest.fixture(scope="module")
def nifti_set(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("nii")
    spacing = (0.9, 1.1, 2.5)
    cases = {}
    for i in range(3):
        gt = blob((32, 28, 12), 300 + i, sigma=2.5).astype(np.uint8)
        pred = perturb(gt > 0, i).astype(np.uint8)
        _write_nifti(tmp_path / "gt" / f"v{i}.nii.gz", gt, spacing)
        _write_nifti(tmp_path / "pred" / f"v{i}.nii.gz", pred, spacing)
        img = ndimage.gaussian_filter(gt * 100.0, 1) + np.random.default_rng(i).random(gt.shape)
        import nibabel as nib

        (tmp_path / "img").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.diag([*spacing, 1.0])),
                 tmp_path / "img" / f"v{i}_0000.nii.gz")
        cases[f"v{i}"] = (gt, pred)
    return tmp_path, cases, spacing


def test_evaluate_nifti_folder(nifti_set):
    root, cases, spacing = nifti_set
    res = evaluate(root / "pred", root / "gt", tolerance=2.0, workers=1, progress=False)
    assert res.meta["distance_units"] == "mm" and res.labels == [1]
    for row in res.cases:
        gt, pred = cases[row["case"]]
        ref = compute_metrics(pred, gt, spacing, [1], tolerance=2.0)[1]
        iso = compute_metrics(pred, gt, None, [1], tolerance=2.0)[1]
        assert row["1"]["hd95"] == pytest.approx(ref["hd95"]) != pytest.approx(iso["hd95"])
        assert row["1"]["nsd"] == pytest.approx(ref["nsd"])
        assert row["1"]["vol_gt"] == pytest.approx(gt.sum() * np.prod(spacing))


def test_probabilities_in_reversed_axis_order(nifti_set, tmp_path):
    """nnU-Net writes NIfTI probabilities in SimpleITK (z, y, x) order; they are turned round."""
    root, cases, spacing = nifti_set
    for case, (gt, _) in cases.items():
        p = ndimage.gaussian_filter(gt.astype(np.float32), 1.0)
        np.savez(tmp_path / f"{case}.npz", probabilities=np.stack([1 - p, p]).transpose(0, 3, 2, 1))
    res = evaluate(root / "pred", root / "gt", probs=tmp_path, progress=False)
    for row in res.cases:
        gt, pred = cases[row["case"]]
        p = ndimage.gaussian_filter(gt.astype(np.float32), 1.0)
        ref = compute_metrics(pred, gt, spacing, [1], probs=np.stack([1 - p, p]))[1]
        assert row["1"]["roc_auc"] == pytest.approx(ref["roc_auc"]) and ref["roc_auc"] > 0.99


def test_small_jobs_stay_in_process(png_set, monkeypatch):
    """By default, work too small to pay for starting processes runs in-process."""
    import medunet.evaluation.runner as runner

    def no_pool(*a, **k):
        raise AssertionError("a process pool was started")

    monkeypatch.setattr(runner, "ProcessPoolExecutor", no_pool)
    root, _ = png_set
    res = evaluate(root / "pred", root / "gt", progress=False)  # workers=None: adaptive
    assert len(res.cases) == 6
    with pytest.raises(AssertionError, match="pool"):
        evaluate(root / "pred", root / "gt", workers=2, progress=False)


# ------------------------------------------------------------------ errors
def test_input_errors(png_set, tmp_path):
    root, _ = png_set
    orphan = tmp_path / "orphan"
    shutil.copytree(root / "pred", orphan)
    _write_png(orphan / "zz.png", np.zeros((48, 52)))
    with pytest.raises(InputError, match="no ground truth.*zz"):
        evaluate(orphan, root / "gt", progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_png(bad / "c0.png", np.zeros((40, 52)))
    with pytest.raises(InputError, match=r"shape \(40, 52\) does not match"):
        evaluate(bad, root / "gt", workers=1, progress=False)
    with pytest.raises(InputError, match=r"shape \(40, 52\) does not match"):  # from a worker
        shutil.copy(root / "pred" / "c1.png", bad)
        evaluate(bad, root / "gt", workers=2, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no prediction files"):
        evaluate(tmp_path / "empty", root / "gt", progress=False)
    with pytest.raises(InputError, match="not found"):
        evaluate(tmp_path / "nope", root / "gt", progress=False)
    nomask = tmp_path / "nomask"
    nomask.mkdir()
    with pytest.raises(InputError, match="no mask for case 'c0'"):
        evaluate(root / "pred", root / "gt", mask=nomask, progress=False)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="junk.png"):
        evaluate(tmp_path / "junk.png", root / "gt" / "c0.png", progress=False)


# ------------------------------------------------------------------ report
def _check_self_contained(html: str) -> None:
    assert not re.search(r"(?:src|href)\s*=\s*['\"]?(?:https?:)?//", html)
    assert "<script" not in html
    srcs = re.findall(r"<img src=\"([^\"]{0,40})", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


@pytest.fixture(scope="module")
def report_2d(png_set, tmp_path_factory):
    root, _ = png_set
    rep = tmp_path_factory.mktemp("r2d") / "report.html"
    evaluate(root / "pred", root / "gt", mask=root / "mask", probs=root / "probs",
             images=root / "images", model_dir=root / "model", report=rep, progress=False,
             workers=1)
    return rep


def test_report_2d_and_3d(report_2d, nifti_set, tmp_path):
    text = report_2d.read_text()
    _check_self_contained(text)
    for part in ("Summary", "ROC", "Training curves", "All cases, worst first", "c3"):
        assert part in text
    assert text.count("<img") == 1 + 1 + 6 + 1  # box plots, ROC, 6 overlays, curves
    root3, _, _ = nifti_set
    rep3 = tmp_path / "r3d.html"
    evaluate(root3 / "pred", root3 / "gt", images=root3 / "img", report=rep3, progress=False)
    _check_self_contained(rep3.read_text())
    rep3b = tmp_path / "r3d_noimg.html"
    evaluate(root3 / "pred", root3 / "gt", report=rep3b, model_dir=tmp_path, progress=False)
    assert "masks are drawn alone" in rep3b.read_text()
    assert "No training log" in rep3b.read_text()


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(
    not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None,
    reason="needs /usr/bin/chromium and the playwright package",
)
def test_report_opens_in_headless_chromium(report_2d, tmp_path):
    from playwright.sync_api import sync_playwright

    rep = report_2d
    errors: list[str] = []
    outside: list[str] = []
    shot = tmp_path / "report.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith(("file:", "data:")) else None)
            page.goto(rep.as_uri(), wait_until="load")
            n_img = page.eval_on_selector_all(
                "img", "els => els.filter(e => e.complete && e.naturalWidth > 0).length")
            assert n_img == page.locator("img").count() == 9
            assert "Segmentation evaluation" in page.title() + page.inner_text("h1")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert not outside, outside
    assert shot.stat().st_size > 10_000


# ------------------------------------------------------------------ real data (shared)
@pytest.mark.shared_data
@needs_data
def test_drive_second_observer():
    d = DATA / "Dataset001_DRIVE"
    res = evaluate(d / "labelsTs_2ndObserver", d / "labelsTs", mask=d / "masksTs",
                   progress=False)
    assert res.metric(1, "accuracy", kind="pooled") == pytest.approx(0.9473, abs=5e-5)
    assert res.metric(1, "dice", kind="pooled") == pytest.approx(0.789, abs=5e-4)
    assert res.metric(1, "sensitivity", kind="pooled") == pytest.approx(0.775, abs=5e-4)


def _seg_eval():
    path = SHARED / "peers" / "seg_eval.py"
    if not path.exists():
        pytest.skip("peer evaluator seg_eval.py is absent")
    spec = importlib.util.spec_from_file_location("seg_eval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.shared_data
@needs_data
def test_agrees_with_peer_evaluator(tmp_path):
    """Per-case and summary numbers equal those of the independent seg_eval.py."""
    peer = _seg_eval()
    d = DATA / "Dataset001_DRIVE"
    from medunet.io import read_label

    pred, gt, fov, probs = (tmp_path / n for n in ("pred", "gt", "fov", "probs"))
    for f in sorted((d / "labelsTs_2ndObserver").glob("*.png"))[:4]:
        for src, dst in ((f, pred), (d / "labelsTs" / f.name, gt), (d / "masksTs" / f.name, fov)):
            dst.mkdir(exist_ok=True)
            shutil.copy(src, dst)
        lab, _ = read_label(f)
        p = ndimage.gaussian_filter(lab.astype(np.float32), 1.5)
        probs.mkdir(exist_ok=True)
        np.savez_compressed(probs / f"{f.stem}.npz", probabilities=np.stack([1 - p, p]))
    ours = evaluate(pred, gt, mask=fov, probs=probs, progress=False)
    ref = peer.evaluate(str(gt), str(pred), str(fov), str(probs), verbose=False)
    names = {"dice": "dice", "iou": "iou", "sensitivity": "sensitivity", "precision": "precision",
             "specificity": "specificity", "accuracy": "accuracy", "hd95": "hd95",
             "assd": "asd", "roc_auc": "auc"}
    for row in ours.cases:
        for k, pk in names.items():
            assert row["1"][k] == approx(ref["per_case"][row["case"]][pk], rel=1e-9), k
    for k, pk in names.items():
        assert ours.metric(1, k) == approx(ref["mean"][pk], rel=1e-9)
    for k in ("dice", "accuracy", "sensitivity"):
        assert ours.metric(1, k, "pooled") == approx(ref["pooled"][k], rel=1e-12)
    assert ours.metric(1, "roc_auc", "pooled") == approx(ref["pooled"]["auc"], rel=1e-9)

    import nibabel as nib

    la, la_pred = tmp_path / "la_gt", tmp_path / "la_pred"
    la.mkdir()
    la_pred.mkdir()
    for i, f in enumerate(sorted((DATA / "Dataset003_LeftAtrium" / "labelsTs").iterdir())[:3]):
        shutil.copy(f, la)
        img = nib.load(f)
        m = np.asanyarray(img.dataobj) > 0
        m = np.roll(ndimage.binary_dilation(m) if i % 2 else ndimage.binary_erosion(m), 1, 2)
        nib.save(nib.Nifti1Image(m.astype(np.uint8), img.affine), la_pred / f.name)
    ours = evaluate(la_pred, la, progress=False)
    ref = peer.evaluate(str(la), str(la_pred), verbose=False)
    for row in ours.cases:
        for k in ("dice", "hd95", "assd"):
            assert row["1"][k] == approx(ref["per_case"][row["case"]][names[k]], rel=1e-9), k
