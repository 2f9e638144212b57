"""Pictures of anomaly maps and curves.

The per-class grids need OpenCV (imported where used: predict's captions come from here in the
torch-free install too, which has none); their colours are ``heatmap.py``'s, as predict's overlays.
ROC / PRO curve plots need matplotlib, an optional extra (``pip install glocalclip[plot]``), imported
only inside :func:`plot_curves`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from PIL import Image

from ..datasets.pixels import exif_upright, rgb_pixels
from .heatmap import heat_overlay, with_colour_bar
from .hooks import EvaluationHooks
from ..files import make_dirs, write_figure, write_json, write_png

PLOT_EXTRA_HINT = "ROC / PRO plots need matplotlib: pip install 'glocalclip[plot]' (or pip install matplotlib)"
CURVES_FILE = "curves.json"


def overlay(image_rgb: np.ndarray, amap: np.ndarray, mask: Optional[np.ndarray] = None,
            alpha: float = 0.5, value_range: Optional[tuple[float, float]] = None) -> np.ndarray:
    """A JET colour map of ``amap`` blended over ``image_rgb`` (uint8 [H,W,3]); the ground-truth
    ``mask`` (optional) drawn as a green contour. The map is resized to the image. The colours
    span ``value_range`` (lo, hi) if given, else the map's own min..max."""
    import cv2

    h, w = image_rgb.shape[:2]
    out = heat_overlay(image_rgb, amap, value_range, alpha)
    if mask is not None and mask.any():
        m = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), max(1, round(min(h, w) / 128)))
    return out


def annotate(image_rgb: np.ndarray, text: str | Sequence[str], color: tuple[int, int, int] = (255, 255, 255)
             ) -> np.ndarray:
    """``text`` (a line, or several, each wrapped to the picture's width) written in the top-left
    corner, outlined so it reads on any background. OpenCV's fonts are ASCII only."""
    import cv2

    out = np.ascontiguousarray(image_rgb).copy()
    scale = max(0.35, min(out.shape[:2]) / 560)
    thick = max(1, round(scale * 1.5))
    lines = [part for line in ([text] if isinstance(text, str) else text) if line
             for part in _wrapped(line, out.shape[1] - 8, scale, thick + 2)]
    (_, height), baseline = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    step = height + baseline + thick + 2  # one line under the other, outlines not touching
    for i, line in enumerate(lines):
        x, y = 4, 4 + height + i * step
        for dx, dy in ((-1, -1), (-1, 1), (1, -1), (1, 1), (0, 2), (2, 0), (0, -2), (-2, 0)):  # a black rim
            cv2.putText(out, line, (x + dx, y + dy), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
        cv2.putText(out, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)
    return out


# ---------------------------------------------------------------------------- what a picture says
def truth_caption(score: float, true_label: int) -> list[str]:
    """A test grid's tile: the model's score, and the ground-truth label said to be the truth (the
    grid shows known labels, not predictions)."""
    return [f"score {score:.3f}", f"truth: {'anomalous' if true_label else 'normal'}"]


def grid_legend(value_range: Optional[tuple[float, float]], has_masks: bool) -> str:
    """The key under a test grid: what the numbers, the outline and the colours are."""
    parts = ["score = the model's image score", "truth = the ground-truth label"]
    if has_masks:
        parts.append("green outline = the ground-truth defect mask")
    if value_range is not None:
        parts.append(f"colours = anomaly map, blue {value_range[0]:.2f} .. red {value_range[1]:.2f} for the whole class")
    return "; ".join(parts)


def threshold_caption(threshold: float, source: Optional[str], ascii_only: bool = False) -> str:
    """``threshold 0.42 (best F1 on the test set of mvtec, σ 8)``: a threshold with the scores it was derived
    from (``source``, see ``engine.checkpoint.threshold_source``). ``ascii_only`` for pictures."""
    text = f"threshold {threshold:.4g}" + (f" ({source})" if source else "")
    return text.replace("σ", "sigma") if ascii_only else text


def prediction_caption(score: float, predicted: Optional[int], threshold: Optional[float],
                       source: Optional[str], sigma: Optional[float] = None) -> list[str]:
    """A predict overlay: the predicted label said to be a prediction, with the score and the
    threshold (and its origin) it was decided by; without a threshold, no label. ``sigma``: the
    smoothing of the map actually drawn."""
    smoothing = [] if sigma is None else [f"map smoothed with sigma {sigma:g}"]
    if predicted is None or threshold is None:
        return [f"score {score:.3f}", "no prediction: no threshold"] + smoothing
    relation = ">=" if predicted else "<"
    lines = [f"predicted: {'anomalous' if predicted else 'normal'}", f"score {score:.3f} {relation} threshold {threshold:.4g}"]
    return lines + ([f"threshold: {source}".replace("σ", "sigma")] if source else []) + smoothing


def read_rgb(path: str, upright: bool = False) -> np.ndarray:
    """A picture file as uint8 RGB, grey levels as the model saw them; ``upright``: turned as its EXIF
    orientation says (as folder-mode datasets and predict read images), so a map drawn over it lines up."""
    with Image.open(path) as im:
        return rgb_pixels(exif_upright(im) if upright else im)


def _tile(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def _wrapped(text: str, width: int, scale: float, thickness: int = 1) -> list[str]:
    """``text`` cut at spaces into lines that fit ``width`` pixels in OpenCV's font."""
    import cv2

    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        fits = cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] <= width
        if lines and fits:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def image_grid(rows: Sequence[Sequence[np.ndarray]], tile: int = 160, pad: int = 4,
               row_titles: Optional[Sequence[str]] = None, legend: str = "") -> np.ndarray:
    """Tiles [H,W,3] uint8 laid out in rows (each resized to ``tile``²) on a white background,
    with ``legend`` (wrapped to the grid's width) underneath."""
    import cv2

    n_cols = max((len(r) for r in rows), default=0)
    title_h = 22 if row_titles else 0
    w = max(1, n_cols) * (tile + pad) + pad
    legend_lines = _wrapped(legend, w - 2 * pad, 0.4) if legend else []
    h = len(rows) * (tile + pad + title_h) + pad + 16 * len(legend_lines)
    grid = np.full((h, w, 3), 255, np.uint8)
    y = pad
    for r, row in enumerate(rows):
        if row_titles:
            cv2.putText(grid, row_titles[r], (pad, y + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
            y += title_h
        for c, img in enumerate(row):
            x = pad + c * (tile + pad)
            grid[y:y + tile, x:x + tile] = _tile(img, tile)
        y += tile + pad
    for line in legend_lines:
        cv2.putText(grid, line, (pad, y + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
        y += 16
    return grid


def class_grid(cs, k: int = 6, tile: int = 160, upright: bool = False) -> np.ndarray:
    """The ``k`` highest- and ``k`` lowest-scoring images of a class (``ClassScores``), overlays on one
    colour scale (the class's map range), ground truth as a green contour; each tile says its score
    and its ground-truth label, a legend underneath says what is what, and a colour bar the scale."""
    scores = np.asarray(cs.scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    k = max(1, min(k, len(order)))
    top = order[:k].tolist()
    bottom = order[::-1][:k].tolist() if len(order) > k else []
    maps = cs.maps.float() if cs.maps is not None else None
    vr = (float(maps.min()), float(maps.max())) if maps is not None and maps.numel() else None

    def tile_of(i: int) -> np.ndarray:
        img = read_rgb(cs.img_paths[i], upright)
        if maps is not None:
            mask = cs.masks[i].cpu().numpy() if cs.masks is not None else None
            img = overlay(img, maps[i].cpu().numpy(), mask, value_range=vr)
        img = _tile(img, tile)
        anomalous = int(cs.labels[i])
        return annotate(img, truth_caption(scores[i], anomalous), (255, 80, 80) if anomalous else (255, 255, 255))

    rows = [[tile_of(i) for i in top]]
    titles = [f"{cs.cls_name}: highest scores"]
    if bottom:
        rows.append([tile_of(i) for i in bottom])
        titles.append(f"{cs.cls_name}: lowest scores")
    legend = grid_legend(vr if maps is not None else None, has_masks=cs.masks is not None and maps is not None)
    grid = image_grid(rows, tile=tile, row_titles=titles, legend=legend)
    if vr is None:
        return grid

    return with_colour_bar(grid, vr, "anomaly map, one scale for the class")


def save_class_visuals(out_dir: Path, cs, k: int = 6, upright: bool = False) -> list[Path]:
    """``test.py --save_vis``: per class, ``<cls>_grid.png`` (highest- and lowest-scoring images)
    and the class's ROC / PRO curve points added to ``curves.json``; with matplotlib installed,
    ``roc.png`` / ``pro.png`` of all classes so far are (re)drawn. ``upright``: the images were read
    turned by their EXIF orientation (folder-mode data). A file that cannot be written raises
    :class:`glocalclip.files.OutputError`: a requested picture is never silently missing."""
    out_dir = make_dirs(out_dir)
    name = cs.cls_name.replace(" ", "_").replace("/", "_")
    written = [write_png(out_dir / f"{name}_grid.png", class_grid(cs, k=k, upright=upright))]
    curves_path = out_dir / CURVES_FILE
    curves = json.loads(curves_path.read_text()) if curves_path.is_file() else {}
    curves[cs.cls_name] = class_curves(cs)
    written.append(write_json(curves_path, curves, indent=None))
    try:
        written += plot_curves(curves, out_dir)
    except ImportError:
        pass  # the optional extra is missing: curves.json holds the points
    return written


class VisualWriter(EvaluationHooks):
    """Hooks for ``evaluate()`` that save each finished class's pictures and curves in ``out_dir``
    (``test.py --save_vis``); they need the maps even where only image metrics are computed."""

    needs_maps = True

    def __init__(self, out_dir: Path, upright: bool = False):
        self.out_dir = Path(out_dir)
        self.upright = upright  # the images were read turned by their EXIF orientation (folder mode)

    def class_done(self, scores, metrics: dict[str, float]) -> None:
        save_class_visuals(self.out_dir, scores, upright=self.upright)


def _thin(x: np.ndarray, y: np.ndarray, n: int = 400) -> tuple[list[float], list[float]]:
    """At most ``n`` points of a curve (end points kept), as lists for JSON."""
    if len(x) > n:
        idx = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
        x, y = x[idx], y[idx]
    return [float(v) for v in x], [float(v) for v in y]


def class_curves(cs) -> dict[str, Any]:
    """Image ROC (FPR, TPR) and pixel PRO (FPR, PRO on the paper's 200-threshold grid) of one class;
    a curve is missing where it is undefined (one label only, no masks)."""
    out: dict[str, Any] = {}
    labels = np.asarray(cs.labels)
    if len(np.unique(labels)) == 2:
        from sklearn.metrics import roc_auc_score, roc_curve

        fpr, tpr, _ = roc_curve(labels, np.asarray(cs.scores))
        fx, ty = _thin(fpr, tpr)
        out["roc"] = {"fpr": fx, "tpr": ty, "auc": float(roc_auc_score(labels, np.asarray(cs.scores)))}
    if cs.maps is not None and cs.masks is not None:
        from ..engine import metrics as M

        # the metric's own curve: the same thresholds as the AUPRO number
        curve = M.pro_curve(cs.masks, cs.maps)
        if curve is not None:
            fpr, pro = curve
            order = np.argsort(fpr, kind="stable")
            fx, py = _thin(fpr[order], pro[order])
            aupro = M.aupro(cs.masks, cs.maps)
            out["pro"] = {"fpr": fx, "pro": py, "aupro": None if math.isnan(aupro) else float(aupro)}
    return out


def plot_curves(curves: dict[str, dict[str, Any]] | str | Path, out_dir: str | Path,
                title: str = "") -> list[Path]:
    """``roc.png`` (image-level ROC per class) and ``pro.png`` (PRO over FPR per class, FPR < 0.3
    marked) in ``out_dir`` from ``class_curves`` results (a dict class -> curves, or a curves.json).
    Needs matplotlib (``pip install glocalclip[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(PLOT_EXTRA_HINT) from e
    if not isinstance(curves, dict):
        curves = json.loads(Path(curves).read_text())
    out = make_dirs(out_dir)
    written = []
    for kind, ykey, xlabel, ylabel, fname in (("roc", "tpr", "false positive rate", "true positive rate", "roc.png"),
                                              ("pro", "pro", "false positive rate (pixels)", "per-region overlap",
                                               "pro.png")):
        have = {c: v[kind] for c, v in curves.items() if kind in v}
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
        for cls_name, cv in have.items():
            metric = cv.get("auc", cv.get("aupro"))
            label = cls_name if metric is None or (isinstance(metric, float) and math.isnan(metric)) \
                else f"{cls_name} ({100 * metric:.1f})"
            ax.plot(cv["fpr"], cv[ykey], lw=1.2, label=label)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        else:
            ax.axvline(0.3, ls=":", c="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title or ("image ROC (AUROC)" if kind == "roc" else "pixel PRO (AUPRO)"))
        if len(have) <= 20:
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        try:
            written.append(write_figure(out / fname, fig))
        finally:
            plt.close(fig)
    return written
