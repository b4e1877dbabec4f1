"""A single, self-contained ``report.html``: summary, plots and overlays, viewable offline.

Every figure is drawn with matplotlib's Agg canvas (no display, no global pyplot state) and
embedded as a base64 PNG, and the page has no scripts and no external URLs, so the file can
be mailed, archived or opened on an air-gapped machine and looks the same everywhere.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medunet.evaluation.result import EvaluationResult, _atomic_write_text, format_value
from medunet.io import IMAGE_SUFFIXES

GT_COLOUR = "#00e000"
PRED_COLOUR = "#ff30ff"  # magenta: visible on red fundus photographs and grey MRI
BOX_METRICS = (
    "dice", "iou", "precision", "sensitivity", "specificity", "hd95", "assd", "nsd",
    "rel_volume_diff", "roc_auc", "pr_auc",
)
CASE_TABLE_METRICS = ("dice", "iou", "sensitivity", "precision", "hd95", "assd", "nsd", "roc_auc")
N_EXTREME = 5

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:36px}h3{margin:18px 0 6px}
table{border-collapse:collapse;font-size:.9em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
.meta td{text-align:left}.note{color:#555;font-size:.9em}
figure{margin:10px 0}figcaption{font-size:.9em;color:#444}
img{max-width:100%;height:auto;border:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.grid figure{flex:1 1 520px}
"""


# --------------------------------------------------------------------------- helpers
def find_image(folder: Path | None, case: str) -> Path | None:
    """The image of a case in an nnU-Net style folder (``CASE_0000.ext`` or ``CASE.ext``)."""
    if folder is None:
        return None
    folder = Path(folder)
    if folder.is_file():
        return folder
    for stem in (f"{case}_0000", case):
        for suf in IMAGE_SUFFIXES:
            cand = folder / f"{stem}{suf}"
            if cand.is_file():
                return cand
    return None


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig, dpi: int = 90, palette: bool = False) -> str:
    """The figure as a PNG data URI; ``palette`` (256 colours) makes photo overlays ~3x smaller."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if palette:
        from PIL import Image

        buf.seek(0)
        with Image.open(buf) as im:
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        small.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{html.escape(alt)}">{cap}</figure>'


def _esc(x: object) -> str:
    return html.escape(str(x))


# --------------------------------------------------------------------------- sections
def _summary_table(res: EvaluationResult) -> str:
    head = "".join(
        f"<th>label {lab}<br>mean ± std</th><th>label {lab}<br>pooled</th>" for lab in res.labels
    )
    rows = []
    for m in res.metrics:
        name = res.metric_label(m)
        cells = []
        for lab in res.labels:
            s = res.summary["mean"][str(lab)][m]
            nan = f" <span class='note'>({s['n_nan']} NaN)</span>" if s["n_nan"] else ""
            cells.append(
                f"<td>{format_value(m, s['mean'])} ± {format_value(m, s['std'])}{nan}</td>"
            )
            p = res.summary["pooled"][str(lab)].get(m)
            cells.append(f"<td>{'-' if p is None else format_value(m, p)}</td>")
        rows.append(f"<tr><td>{_esc(name)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _box_plots(res: EvaluationResult) -> str:
    metrics = [m for m in BOX_METRICS if m in res.metrics]
    ncol = 4
    nrow = math.ceil(len(metrics) / ncol)
    fig = _new_figure(3.0 * ncol, 2.6 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    rng = np.random.default_rng(0)
    for ax, m in zip(axes, metrics, strict=False):
        data, names = [], []
        for lab in res.labels:
            v = res.case_values(lab, m)
            data.append(v[~np.isnan(v)])
            names.append(str(lab))
        if any(d.size for d in data):
            ax.boxplot(
                [d if d.size else [np.nan] for d in data],
                tick_labels=names,
                showfliers=False,
                widths=0.5,
            )
            for i, d in enumerate(data, start=1):
                ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=9, alpha=0.6,
                           color="#1f77b4", zorder=3)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(res.metric_label(m), fontsize=10)
        ax.set_xlabel("label", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return _img(_png(fig), "box plots", "Per-case values per label (box: quartiles; dot: case).")


def _roc_plots(res: EvaluationResult) -> str:
    if not res.curves:
        return ""
    fig = _new_figure(10, 4.2)
    ax_roc, ax_pr = fig.subplots(1, 2)
    for lab, c in res.curves.items():
        fpr, tpr = np.asarray(c["fpr"]), np.asarray(c["tpr"])
        if fpr.size == 0:
            continue
        sel = np.unique(np.linspace(0, fpr.size - 1, min(fpr.size, 3000)).astype(int))
        ax_roc.plot(fpr[sel], tpr[sel], label=f"label {lab}: AUC {c['roc_auc']:.4f}")
        rec, prec = np.asarray(c["recall"]), np.asarray(c["precision"])
        sel = np.unique(np.linspace(0, rec.size - 1, min(rec.size, 3000)).astype(int))
        ax_pr.plot(rec[sel], prec[sel], label=f"label {lab}: AP {c['pr_auc']:.4f}")
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (pooled)",
               xlim=(0, 1), ylim=(0, 1.01))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (pooled)",
              xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax_roc, ax_pr):
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    return _img(_png(fig), "ROC and precision-recall curves",
                "Curves over all pixels of all cases (inside the mask when given).")


def _normalise(img: np.ndarray) -> np.ndarray:
    """Grey (H, W) or RGB (H, W, 3) image scaled to [0, 1] with a 1-99 percentile window."""
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, [1, 99])
    if hi <= lo:
        lo, hi = float(img.min()), float(img.max()) or 1.0
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _agreement_rgb(gt: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Colour map of agreement: yellow = both, green = GT only (missed), red = prediction only."""
    g = np.isin(gt, labels)
    p = np.isin(pred, labels)
    same = g & p & (gt == pred)
    rgb = np.zeros(gt.shape + (3,), np.float32)
    rgb[same] = (1.0, 0.85, 0.0)
    rgb[g & ~same] = (0.0, 0.85, 0.0)
    rgb[p & ~same & ~g] = (1.0, 0.1, 0.1)
    rgb[p & g & ~same] = (0.0, 0.85, 0.0)  # wrong class: count it as missed
    return rgb


def _draw_panel(ax, image, gt, pred, labels, aspect: float = 1.0, origin: str = "upper") -> None:
    if image is None:
        ax.imshow(_agreement_rgb(gt, pred, labels), aspect=aspect, origin=origin,
                  interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", aspect=aspect, origin=origin, interpolation="nearest")
        for lab in labels:
            for arr, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
                m = arr == lab
                if m.any() and not m.all():
                    ax.contour(m.astype(np.float32), levels=[0.5], colors=colour,
                               linewidths=0.9)
    ax.set_xticks([])
    ax.set_yticks([])


def _load_for_overlay(res: EvaluationResult, case: str, images: Path | None):
    from medunet.io import read_image, read_label

    files = res.meta["files"][case]
    gt, _ = read_label(files["gt"])
    pred, _ = read_label(files["pred"])
    image = None
    path = find_image(images, case)
    if path is not None:
        try:
            arr, _ = read_image(path)
        except Exception:  # an unreadable image must not cost the whole report
            arr = None
        if arr is not None and arr.shape[1:] == gt.shape:
            if gt.ndim == 2 and arr.shape[0] == 3:
                rgb = np.moveaxis(arr, 0, -1)  # 8-bit colour photographs are shown as they are
                image = rgb / 255.0 if rgb.dtype == np.uint8 else _normalise(rgb)
            else:
                image = _normalise(arr[0])
    return gt, pred, image


def _overlay(res: EvaluationResult, case: str, images: Path | None) -> str:
    gt, pred, image = _load_for_overlay(res, case, images)
    spacing = list(res.meta["spacing"].get(case, [1.0] * gt.ndim))
    flat = [i for i, n in enumerate(gt.shape) if n == 1]
    if gt.ndim == 3 and flat:  # a 2D slice stored as a volume (e.g. a 2D NIfTI): draw it in 2D
        gt, pred = gt.squeeze(flat[0]), pred.squeeze(flat[0])
        image = image.squeeze(flat[0]) if image is not None else None
        spacing.pop(flat[0])
    labels = res.labels
    first = labels[0]
    row = next(c for c in res.cases if c["case"] == case)[str(first)]
    dice, hd95 = row["dice"], row["hd95"]
    unit = res.meta.get("distance_units", "")
    title = f"{case}: Dice {dice:.4f}, HD95 {format_value('hd95', hd95)} {unit} (label {first})"
    if gt.ndim == 2:
        n = 2 if image is not None else 1
        aspect = spacing[0] / spacing[1]
        h, w = gt.shape[0] * aspect, gt.shape[1]
        fig = _new_figure(4.6 * n, 4.6 * min(h / max(w, 1), 2.0) + 0.5)
        axes = np.atleast_1d(fig.subplots(1, n))
        _draw_panel(axes[0], image, gt, pred, labels, aspect=aspect)
        if image is not None:
            _draw_panel(axes[1], None, gt, pred, labels, aspect=aspect)
    else:
        fg = np.isin(gt, [first]) | np.isin(pred, [first])
        if not fg.any():
            fg = np.isin(gt, labels) | np.isin(pred, labels)
        centre = (
            [int(round(float(np.mean(ix)))) for ix in np.nonzero(fg)]
            if fg.any()
            else [s // 2 for s in gt.shape]
        )
        ext = np.array(gt.shape, float) * np.array(spacing)  # physical extent per axis
        tallest = max(ext[2] / ext[1], ext[2] / ext[0], ext[1] / ext[0])  # height / width
        fig = _new_figure(12, 4.0 * min(tallest, 1.5) + 0.6)
        axes = fig.subplots(1, 3)
        for k, ax in enumerate(axes):
            a, b = [i for i in range(3) if i != k]
            idx: list = [slice(None)] * 3
            idx[k] = centre[k]
            t = tuple(idx)
            show = image[t].T if image is not None else None
            _draw_panel(ax, show, gt[t].T, pred[t].T, labels,
                        aspect=spacing[b] / spacing[a], origin="lower")
            ax.set_title(f"axis {k} = {centre[k]}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    contours = "contours: green = ground truth, magenta = prediction"
    colours = "yellow = both, green = missed (GT only), red = false positive"
    if image is None:
        legend = colours
    elif gt.ndim == 2:
        legend = f"left: {contours}; right: {colours}"
    else:
        legend = contours
    return _img(_png(fig, palette=image is not None), f"overlay {case}", legend)


def _extremes(res: EvaluationResult, images: Path | None) -> str:
    first = str(res.labels[0])
    order = sorted(res.cases, key=lambda c: (c[first]["dice"], c["case"]))
    names = [c["case"] for c in order]
    out = []
    if len(names) <= 2 * N_EXTREME:
        groups = [(f"All cases, worst first (Dice of label {first})", names)]
    else:
        groups = [
            (f"Five worst cases (Dice of label {first})", names[:N_EXTREME]),
            (f"Five best cases (Dice of label {first})", names[::-1][:N_EXTREME]),
        ]
    for title, group in groups:
        out.append(f"<h3>{_esc(title)}</h3>")
        for case in group:
            try:
                out.append(_overlay(res, case, images))
            except Exception as exc:  # keep the rest of the report
                out.append(f"<p class='note'>{_esc(case)}: cannot draw ({_esc(exc)})</p>")
    if images is None:
        out.insert(0, "<p class='note'>No image folder given (<code>images=</code>): "
                      "masks are drawn alone.</p>")
    return "".join(out)


def read_log(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Numeric columns of a training log CSV: (x column name, {column: values})."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, np.ndarray] = {}
    if not rows:
        return "row", cols
    for name in rows[0]:
        if name is None:
            continue
        vals = []
        for r in rows:
            v = (r.get(name) or "").strip()
            try:
                vals.append(float(v) if v else float("nan"))
            except ValueError:
                vals = []
                break
        if vals and not all(math.isnan(v) for v in vals):
            cols[name] = np.asarray(vals)
    x = "epoch" if "epoch" in cols else "row"
    return x, cols


def _training_curves(model_dir: Path) -> str:
    log = model_dir / "log.csv"
    if not log.is_file():
        return f"<p class='note'>No training log at {_esc(log)}.</p>"
    x_name, cols = read_log(log)
    xs = cols.pop(x_name) if x_name in cols else None
    if not cols:
        return f"<p class='note'>{_esc(log)} has no numeric columns.</p>"
    n = len(cols)
    ncol = min(3, n)
    nrow = math.ceil(n / ncol)
    fig = _new_figure(4.0 * ncol, 2.8 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, (name, vals) in zip(axes, cols.items(), strict=False):
        x = xs if xs is not None else np.arange(1, vals.size + 1)
        ax.plot(x, vals, marker="." if vals.size < 60 else None, lw=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x_name, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    return _img(_png(fig), "training curves", f"Columns of {log}.")


def _case_table(res: EvaluationResult) -> str:
    metrics = [m for m in CASE_TABLE_METRICS if m in res.metrics]
    head = "".join(f"<th>{lab}: {m}</th>" for lab in res.labels for m in metrics)
    rows = []
    for c in res.cases:
        cells = "".join(
            f"<td>{format_value(m, c[str(lab)][m])}</td>" for lab in res.labels for m in metrics
        )
        rows.append(f"<tr><td>{_esc(c['case'])}</td>{cells}</tr>")
    return (
        f"<details><summary>Per-case values ({len(res.cases)} cases)</summary>"
        f"<table><tr><th>case</th>{head}</tr>{''.join(rows)}</table></details>"
    )


def _meta_table(res: EvaluationResult, model_dir: Path | None) -> str:
    m = res.meta
    rows = [
        ("predictions", m.get("pred")),
        ("ground truth", m.get("gt")),
        ("region mask", m.get("mask") or "none (whole image)"),
        ("probabilities", m.get("probs") or "none"),
        ("model", str(model_dir) if model_dir else "not given"),
        ("cases", m.get("n_cases")),
        ("labels", ", ".join(str(x) for x in res.labels)),
        ("distance units", m.get("distance_units")),
        ("surface Dice tolerance", f"{m.get('tolerance')} {m.get('distance_units')}"),
    ]
    if m.get("gt_without_prediction"):
        gwp = m["gt_without_prediction"]
        rows.append(("GT cases without prediction (not scored)",
                     f"{len(gwp)}: {', '.join(gwp[:10])}{' ...' if len(gwp) > 10 else ''}"))
    body = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<table class='meta'>{body}</table>"


_CONVENTIONS = (
    "Dice = IoU = 1 and HD95 = HD = ASSD = 0, NSD = 1 when ground truth and prediction are both "
    "empty; when exactly one is empty Dice = NSD = 0 and the distances are undefined (NaN), "
    "left out of the means and counted. HD95 is the 95th percentile of the surface distances "
    "of both directions pooled. Pooled = TP/FP/FN/TN summed over cases (AUC over all pixels). "
    "Standard deviations are over cases (ddof = 0)."
)


def write_report(
    result: EvaluationResult,
    path: str | Path,
    *,
    images: str | Path | None = None,
    model_dir: str | Path | None = None,
) -> Path:
    """Write the HTML report of ``result`` to ``path`` (atomically) and return the path."""
    images_p = Path(images) if images is not None else None
    model_p = Path(model_dir) if model_dir is not None else None
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>medunet evaluation: {len(result.cases)} cases</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Segmentation evaluation</h1><p class='note'>medunet, {when}</p>",
        _meta_table(result, model_p),
        "<h2>Summary</h2>",
        _summary_table(result),
        f"<p class='note'>{_esc(_CONVENTIONS)}</p>",
        "<h2>Distribution over cases</h2>",
        _box_plots(result),
    ]
    if result.curves:
        parts += ["<h2>ROC and precision-recall</h2>", _roc_plots(result)]
    parts += ["<h2>Cases</h2>", _extremes(result, images_p)]
    if model_p is not None:
        parts += ["<h2>Training curves</h2>", _training_curves(model_p)]
    parts += [_case_table(result), "</body></html>"]
    return _atomic_write_text(path, "\n".join(parts))


__all__ = ["write_report", "read_log"]
