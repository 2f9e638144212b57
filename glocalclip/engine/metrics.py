"""Evaluation metrics (docs/design.md §6): image AUROC / AP / F1-max, pixel AUROC / F1-max, AUPRO.

Public functions (a contract, called by test.py and outside tools)::

    image_metrics(labels, scores)  -> {"image_auroc", "image_ap", "image_f1max"}
    pixel_metrics(masks, maps)     -> {"pixel_auroc", "pixel_aupro", "pixel_aupro_exact", "pixel_f1max"}
    aupro(masks, maps)             -> float   the paper's definition (200 thresholds, see below)
    aupro_exact(masks, maps)       -> float   the standard exact AUPRO (integrated to FPR 0.3, / 0.3)
    f1_max(labels, scores)         -> float   max finite F1 over the precision-recall curve
    pro_curve(masks, maps)         -> (FPR, PRO) arrays behind aupro, or None

Inputs are numpy arrays or torch tensors (CPU or CUDA). ``labels`` [N] and ``masks`` [N,H,W] are binary:
values > 0.5 count as positive, so {0,1}, bool and {0,255} all work. ``scores`` [N] and ``maps`` [N,H,W]
are floats; float32 and float64 are used as they are, float16 / bfloat16 are upcast to float32 and other
dtypes to float64. A single [H,W] mask/map pair is treated as one image. NaN or infinite scores raise
ValueError (as scikit-learn does).

Undefined metrics. A metric that is not defined for a class is returned as ``float('nan')`` (never an
exception, never a silent 0, no warning or output); the caller prints it as "n/a":
  * image metrics: ``labels`` hold only one value (or are empty);
  * pixel metrics and both AUPROs: the masks hold no positive or no negative pixel;
  * ``aupro`` additionally when the paper's recipe itself has no value: constant maps (no threshold),
    fewer than two thresholds with FPR < 0.3, or all kept FPRs equal (the min-max rescaling is 0/0);
  * ``f1_max``: ``labels`` hold only one value.

Backends. Torch tensors that live on an accelerator are processed with torch on that device (sorting,
searchsorted, bincount, cumulative sums); only the masks go to the CPU once, to label their connected
regions. numpy inputs and CPU tensors use numpy, whose in-place sort of float32 is much faster than
torch's on CPU. ``backend="torch"`` / ``"numpy"`` overrides the choice (the tests use it to run the
device code path on CPU tensors). Both paths compute the same integer counts, so they agree to ~1e-15.

Cost. One sort of the GT-negative pixel scores (a copy of them, sorted in place on numpy) and one sort
of the GT-positive ones serve every pixel metric; the connected regions are labelled once (scipy,
8-connectivity, identical to ``skimage.measure.label(connectivity=2)``), never per threshold.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import auc as _sk_auc
from sklearn.metrics import average_precision_score, roc_auc_score

from .loaders import available_cpus

__all__ = ["image_metrics", "pixel_metrics", "aupro", "aupro_exact", "f1_max"]

NAN = float("nan")
PAPER_STEPS = 200  # the paper's AUPRO: thresholds np.arange(min, max, (max - min) / 200)
PAPER_MAX_FPR = 0.3  # ... keeps the thresholds with FPR < 0.3
EXACT_MAX_FPR = 0.3  # the exact AUPRO integrates PRO over FPR in [0, 0.3] and divides by 0.3

# Memory bounds (entries, not bytes): masks are labelled in chunks of at most this many pixels, and the
# per-region x per-threshold count matrix of the paper's AUPRO is built for blocks of regions this large.
_LABEL_CHUNK_PIXELS = 1 << 25
_LABEL_THREADS = 4  # chunks labelled at once (each holds int32 labels of its pixels)
_COUNT_CHUNK_ENTRIES = 1 << 24

# 8-connectivity inside each image, no connection between neighbouring images of the [N,H,W] stack.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True

_BACKENDS = (None, "auto", "numpy", "torch")


# --------------------------------------------------------------------------------------------------
# input handling


def _resolve_backend(values: Any, backend: str | None) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'numpy', 'torch', got {backend!r}")
    if backend in (None, "auto"):
        on_device = isinstance(values, torch.Tensor) and values.device.type != "cpu"
        return "torch" if on_device else "numpy"
    return backend


def _float_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.float16:
        return x.astype(np.float32)
    if x.dtype not in (np.float32, np.float64):
        return x.astype(np.float64)
    return x


def _float_torch(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(_float_numpy(x)))
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if x.dtype not in (torch.float32, torch.float64):
        return x.double()
    return x


def _binary_tensor(x: torch.Tensor) -> torch.Tensor:
    """Bool tensor on ``x``'s device: integers > 0, floats > 0.5."""
    x = x.detach()
    if x.dtype != torch.bool:
        x = x > 0 if not (x.is_floating_point() or x.is_complex()) else x > 0.5
    return x


def _binary_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return _binary_tensor(x).cpu().numpy()
    x = np.asarray(x)
    if x.dtype == bool:
        return x
    return x > 0 if np.issubdtype(x.dtype, np.integer) else x > 0.5  # same rule, integer compare is faster


def _np_dtype(values: Any) -> np.dtype:
    if isinstance(values, torch.Tensor):
        return np.dtype(np.float64) if values.dtype == torch.float64 else np.dtype(np.float32)
    return values.dtype


def _check_finite(values: Any, what: str) -> None:
    ok = bool(torch.isfinite(values).all()) if isinstance(values, torch.Tensor) else bool(np.isfinite(values).all())
    if not ok:
        raise ValueError(f"{what} contain NaN or infinite values")


def _check_finite_extremes(*extremes: Any, what: str) -> None:
    """Sorting puts NaN last and min()/max() propagate it, so finite extremes mean all values are finite."""
    if not all(np.isfinite(float(v)) for v in extremes):
        raise ValueError(f"{what} contain NaN or infinite values")


# --------------------------------------------------------------------------------------------------
# small backend-agnostic helpers (numpy arrays or torch tensors, never mixed in one call)


def _searchsorted(sorted_seq: Any, values: Any, side: str) -> Any:
    if isinstance(sorted_seq, torch.Tensor):
        return torch.searchsorted(sorted_seq, values, right=(side == "right"))
    return np.searchsorted(sorted_seq, values, side=side)


def _to_numpy(x: Any) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _floor_to_dtype(thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest value of ``dtype`` <= each float64 threshold, so that, for scores s of that dtype,
    ``s > floor(t)`` is exactly ``s > t`` evaluated in float64 (no rounding of the threshold)."""
    if dtype == np.float64:
        return thresholds
    cut = thresholds.astype(dtype)
    above = cut.astype(np.float64) > thresholds
    cut[above] = np.nextafter(cut[above], dtype.type(-np.inf))
    return cut


# --------------------------------------------------------------------------------------------------
# sorted scores -> AUROC and F1-max (ties form one threshold, exactly as scikit-learn)


@dataclass
class _Groups:
    """The distinct values of the ascending positive scores, each with its place among the negatives."""

    starts: Any  # index in the sorted positives of the first occurrence of each distinct value
    counts: Any  # how many positives hold it
    below: Any  # negatives with a score < it
    below_eq: Any  # negatives with a score <= it
    n_neg: int
    n_pos: int


def _groups(neg: Any, pos: Any) -> _Groups:
    """``neg`` and ``pos`` ascending and non-empty; searches the negatives once per distinct positive."""
    if isinstance(pos, torch.Tensor):
        _, counts = torch.unique_consecutive(pos, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
    else:
        change = np.empty(pos.shape[0], dtype=bool)
        change[:1] = True
        np.not_equal(pos[1:], pos[:-1], out=change[1:])
        starts = np.flatnonzero(change)
        counts = np.diff(starts, append=pos.shape[0])
    values = pos[starts]
    below = _searchsorted(neg, values, "left")
    below_eq = _searchsorted(neg, values, "right")
    return _Groups(starts, counts, below, below_eq, int(neg.shape[0]), int(pos.shape[0]))


def _auroc_f1(g: _Groups) -> tuple[float, float]:
    """AUROC and F1-max (ties form one threshold, as in scikit-learn).

    AUROC = P(s+ > s-) + P(s+ = s-)/2 is exactly the area under the trapezoidal ROC curve whose thresholds
    are the distinct scores (what ``roc_auc_score`` computes); here it comes from integer counts. F1 is only
    evaluated at the distinct positive scores (predicted positive: s >= t): between two of them a lower
    threshold adds false positives only, so the maximum over all distinct scores is reached at one of them.
    """
    s_below = int((g.counts * g.below).sum())
    s_tied = int((g.counts * (g.below_eq - g.below)).sum())
    auroc = (2 * s_below + s_tied) / (2 * g.n_pos * g.n_neg)  # Python ints: exact, correctly rounded
    tp = g.n_pos - g.starts
    fp = g.n_neg - g.below
    if isinstance(tp, torch.Tensor):
        tp, fp = tp.double(), fp.double()
    else:
        tp, fp = tp.astype(np.float64), fp.astype(np.float64)
    precision = tp / (tp + fp)
    recall = tp / g.n_pos
    f1 = 2 * precision * recall / (precision + recall)  # tp >= 1 here, so always finite
    return float(auroc), float(f1.max())


def _flat_labels_scores(labels: Any, scores: Any, be: str) -> tuple[np.ndarray, Any, bool]:
    """Flat binary labels (numpy) and float scores (numpy or torch, by ``be``), checked to match in
    length and to be finite, and whether both label values occur (else the metrics are undefined)."""
    truth = _binary_numpy(labels).reshape(-1)
    values = (_float_torch(scores) if be == "torch" else _float_numpy(scores)).reshape(-1)
    if truth.shape[0] != values.shape[0]:
        raise ValueError(f"labels and scores differ in length: {truth.shape[0]} vs {values.shape[0]}")
    _check_finite(values, "scores")
    n_pos = int(truth.sum())
    return truth, values, 0 < n_pos < truth.shape[0]


def _split_sorted(labels: Any, scores: Any, backend: str | None) -> tuple[Any, Any] | None:
    """(negatives ascending, positives ascending) of flat labels/scores, or None if one class is empty."""
    be = _resolve_backend(scores, backend)
    truth, values, defined = _flat_labels_scores(labels, scores, be)
    if not defined:
        return None
    if be == "torch":
        t = torch.from_numpy(truth).to(values.device)
        return torch.sort(values[~t]).values, torch.sort(values[t]).values
    neg, pos = values[~truth], values[truth]
    neg.sort()
    pos.sort()
    return neg, pos


def f1_max(labels: Any, scores: Any, *, backend: str | None = None) -> float:
    """Maximum finite F1 = 2PR/(P+R) over scikit-learn's precision-recall curve (ties form one threshold).

    ``labels`` and ``scores`` may have any (equal) shape; they are flattened. Returns nan when the labels
    hold only one value (the F1 curve is then not defined).
    """
    split = _split_sorted(labels, scores, backend)
    if split is None:
        return NAN
    return _auroc_f1(_groups(*split))[1]


def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """Image-level metrics of one class: ``{"image_auroc", "image_ap", "image_f1max"}``, floats in [0, 1].

    AUROC and AP are scikit-learn's ``roc_auc_score`` / ``average_precision_score``; F1-max is
    :func:`f1_max`. All three are nan when ``labels`` hold only one value (e.g. a class without anomalous
    test images): the metrics are not defined there.
    """
    truth, values, defined = _flat_labels_scores(labels, scores, "numpy")
    if not defined:
        return {"image_auroc": NAN, "image_ap": NAN, "image_f1max": NAN}
    y = truth.astype(np.int64)
    return {
        "image_auroc": float(roc_auc_score(y, values)),
        "image_ap": float(average_precision_score(y, values)),
        "image_f1max": f1_max(truth, values, backend="numpy"),
    }


# --------------------------------------------------------------------------------------------------
# pixel data, prepared once per class


@dataclass
class _Pixels:
    neg: Any  # scores of GT-negative pixels, ascending (numpy array or tensor on the maps' device)
    pos: Any  # scores of GT-positive pixels (C order of the maps until groups() sorts them)
    region: Any  # region index (0..n_regions-1) of each entry of ``pos``, int64, same backend
    area: Any  # pixels per region, int64 [n_regions], same backend
    n_regions: int
    dtype: np.dtype  # float32 or float64: the dtype the scores are compared in
    vmin: np.floating  # maps.min() / maps.max() as numpy scalars of ``dtype``
    vmax: np.floating
    cached_groups: _Groups | None = None

    @property
    def n_neg(self) -> int:
        return int(self.neg.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.pos.shape[0])

    def groups(self) -> _Groups:
        """Sort ``pos`` ascending (``region`` with it) and group it; the paper's AUPRO needs neither."""
        if self.cached_groups is None:
            if isinstance(self.pos, torch.Tensor):
                self.pos, order = torch.sort(self.pos)
            else:
                order = np.argsort(self.pos)
                self.pos = self.pos[order]
            self.region = self.region[order]
            self.cached_groups = _groups(self.neg, self.pos)
        return self.cached_groups


def _label_chunk(chunk: np.ndarray) -> tuple[np.ndarray, int]:
    """1-based labels of the chunk's positive pixels (C order) and how many regions it holds."""
    labels, count = ndimage.label(chunk, structure=_STRUCTURE)
    return labels[chunk], int(count)


def _label_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region index of every positive pixel (in C order of ``mask`` [N,H,W]) and the area of each region.
    Regions are 8-connected components of one image; numbering runs over all images.

    Images are labelled in chunks (bounded memory) on up to ``_LABEL_THREADS`` threads: scipy releases
    the GIL while labelling, and after a test run the last class's labelling is on the critical path."""
    n, h, w = mask.shape
    threads = max(1, min(_LABEL_THREADS, available_cpus()))
    per_chunk = max(1, min(_LABEL_CHUNK_PIXELS // max(1, h * w), -(-n // threads)))
    chunks = [mask[start:start + per_chunk] for start in range(0, n, per_chunk)]
    if len(chunks) > 1 and threads > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
            labelled = list(pool.map(_label_chunk, chunks))
    else:
        labelled = [_label_chunk(c) for c in chunks]
    parts, offset = [], 0
    for labels, count in labelled:  # number the regions on across chunks, in image order
        if count:
            parts.append(labels.astype(np.int64) + (offset - 1))
            offset += count
    region = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return region, np.bincount(region, minlength=offset).astype(np.int64)


def _prepare(masks: Any, maps: Any, backend: str | None) -> _Pixels | None:
    be = _resolve_backend(maps, backend)
    values = _float_torch(maps) if be == "torch" else _float_numpy(maps)
    # masks already on the maps' device stay there for the device path; the host copy is for labelling
    on_device = be == "torch" and isinstance(masks, torch.Tensor) and masks.device == values.device
    mask_dev = _binary_tensor(masks) if on_device else None
    mask = mask_dev.cpu().numpy() if mask_dev is not None else _binary_numpy(masks)
    if values.ndim == 4 and values.shape[1] == 1:  # [N, 1, H, W], as the original code passed them
        values = values[:, 0]
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != tuple(values.shape):
        raise ValueError(f"masks {tuple(mask.shape)} and maps {tuple(values.shape)} differ in shape")
    if mask.ndim == 2:
        mask, values = mask[None], values[None]
    if mask.ndim != 3:
        raise ValueError(f"masks and maps must be [N,H,W] (or one [H,W]), got {tuple(mask.shape)}")
    n_pos = int(np.count_nonzero(mask))
    if n_pos == 0 or n_pos == mask.size:
        _check_finite(values, "maps")
        return None
    region, area = _label_regions(mask)
    dtype = _np_dtype(values)

    if be == "torch":
        device = values.device
        mask_t = mask_dev.reshape(mask.shape) if mask_dev is not None else torch.from_numpy(mask).to(device)
        neg = torch.sort(values[~mask_t]).values
        pos = values[mask_t]
        region_t = torch.from_numpy(region).to(device)
        area_t = torch.from_numpy(area).to(device)
        ends = [neg[0].item(), neg[-1].item(), pos.min().item(), pos.max().item()]
        _check_finite_extremes(*ends, what="maps")
        vmin = dtype.type(min(ends[0], ends[2]))  # exact: the items are floats of ``dtype``
        vmax = dtype.type(max(ends[1], ends[3]))
        return _Pixels(neg, pos, region_t, area_t, int(area.shape[0]), dtype, vmin, vmax)

    neg = values[~mask]  # a copy, sorted in place
    neg.sort()
    pos = values[mask]
    with np.errstate(invalid="ignore"):
        ends = [neg[0], neg[-1], pos.min(), pos.max()]
    _check_finite_extremes(*ends, what="maps")
    vmin, vmax = min(ends[0], ends[2]), max(ends[1], ends[3])
    return _Pixels(neg, pos, region, area, int(area.shape[0]), dtype, vmin, vmax)


# --------------------------------------------------------------------------------------------------
# AUPRO, the paper's definition


def _paper_curve(px: _Pixels) -> tuple[np.ndarray, np.ndarray] | None:
    """FPR and PRO (float64, one per threshold of the paper's 200-step grid), or None without thresholds."""
    if not px.vmax > px.vmin:
        return None
    with np.errstate(all="ignore"):
        try:  # exactly the original: np.arange on the maps' own scalars (float32 in, float64 out)
            # the step in the maps' dtype, spelled out: numpy >= 2 keeps `float32 / 200` in float32 (NEP 50),
            # numpy 1.x took it to float64, which puts thresholds exactly on scores like 0.125
            step = (px.vmax - px.vmin) / px.dtype.type(PAPER_STEPS)
            thresholds = np.arange(px.vmin, px.vmax, step)
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
    if thresholds.size == 0:
        return None
    cut = _floor_to_dtype(np.asarray(thresholds, dtype=np.float64), px.dtype)
    k = int(cut.shape[0])
    torch_path = isinstance(px.pos, torch.Tensor)
    if torch_path:
        cut_b = torch.from_numpy(cut).to(px.pos.device)
    else:
        cut_b = cut

    # false positives at threshold t: negatives with s > t
    fp = px.n_neg - _to_numpy(_searchsorted(px.neg, cut_b, "right")).astype(np.int64)

    # true positives of each region at each threshold, from the bucket of each positive pixel:
    # bucket b = number of thresholds below s, so the pixel is predicted positive for t_0 .. t_{b-1}.
    bucket = _searchsorted(cut_b, px.pos, "left")
    pro_sum = np.zeros(k, dtype=np.float64)
    rows = max(1, _COUNT_CHUNK_ENTRIES // (k + 1))
    for r0 in range(0, px.n_regions, rows):
        r1 = min(px.n_regions, r0 + rows)
        if r0 == 0 and r1 == px.n_regions:
            reg, buc = px.region, bucket
        else:
            sel = (px.region >= r0) & (px.region < r1)
            reg, buc = px.region[sel], bucket[sel]
        key = (reg - r0) * (k + 1) + buc
        if torch_path:
            counts = torch.bincount(key, minlength=(r1 - r0) * (k + 1)).view(r1 - r0, k + 1)
            area = px.area[r0:r1]
            tp = area[:, None] - torch.cumsum(counts, 1)[:, :k]  # pixels with bucket > threshold index
            pro_sum += (tp.double() / area[:, None].double()).sum(0).cpu().numpy()
        else:
            counts = np.bincount(key, minlength=(r1 - r0) * (k + 1)).reshape(r1 - r0, k + 1)
            area = px.area[r0:r1]
            tp = area[:, None] - np.cumsum(counts, 1)[:, :k]
            pro_sum += (tp / area[:, None]).sum(0)
    return fp / px.n_neg, pro_sum / px.n_regions


def _paper_aupro(px: _Pixels | None) -> float:
    if px is None:
        return NAN
    curve = _paper_curve(px)
    if curve is None:
        return NAN
    fpr, pro = curve
    keep = fpr < PAPER_MAX_FPR
    if int(keep.sum()) < 2:
        return NAN
    fpr, pro = fpr[keep], pro[keep]
    lo, hi = fpr.min(), fpr.max()
    if not hi > lo:
        return NAN
    return float(_sk_auc((fpr - lo) / (hi - lo), pro))


def aupro(masks: Any, maps: Any, *, backend: str | None = None) -> float:
    """AUPRO as the paper computed it (the numbers in its tables), in [0, 1].

    Thresholds ``np.arange(mn, mx, (mx - mn) / 200)`` with ``mn, mx = maps.min(), maps.max()`` taken as
    scalars of the maps' own dtype (float32 normally); a pixel is predicted anomalous when its score is
    > the threshold, compared exactly as numpy >= 2 compares a float32 array with a float64 scalar (numpy 1.x
    rounded the threshold to float32 first; that moves the result by ~1e-7 at most). PRO(t) is the mean over
    all connected GT regions of all images (8-connectivity) of the fraction of the region predicted
    anomalous; FPR(t) = false positives / all GT-negative pixels. Thresholds with FPR < 0.3 are kept, their
    FPRs rescaled by min-max to [0, 1], and the result is ``sklearn.metrics.auc(rescaled FPR, PRO)``.
    Regions are labelled once and every threshold is counted at once (the original looped in Python).

    Returns nan when undefined: no positive or no negative pixel, constant maps, fewer than two kept
    thresholds, or all kept FPRs equal.
    """
    return _paper_aupro(_prepare(masks, maps, backend))


def pro_curve(masks: Any, maps: Any, *, backend: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The curve behind :func:`aupro`: (FPR, PRO) at each threshold of the paper's 200-step grid
    (all thresholds, before the FPR < 0.3 cut and the rescaling), or None where it is undefined."""
    px = _prepare(masks, maps, backend)
    return None if px is None else _paper_curve(px)


# --------------------------------------------------------------------------------------------------
# AUPRO, the standard exact definition


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under (x, y), x ascending, up to ``x_max`` (interpolating y there), as in the
    MVTec AD evaluation code."""
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        if 0 < ins < x.shape[0]:
            y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    inside = x <= x_max
    x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _exact_aupro(px: _Pixels | None) -> float:
    if px is None:
        return NAN
    g = px.groups()  # one curve step per distinct positive score u (predicted positive: s >= u)
    n_neg = px.n_neg
    # weight of a positive pixel in PRO: 1 / (area of its region); PRO(u) = sum of weights of s >= u / R
    if isinstance(px.pos, torch.Tensor):
        weight = 1.0 / px.area.double()[px.region]
        suffix = torch.flip(torch.cumsum(torch.flip(weight, (0,)), 0), (0,))
        fpr_at = (n_neg - g.below).double() / n_neg
    else:
        weight = 1.0 / px.area.astype(np.float64)[px.region]
        suffix = np.cumsum(weight[::-1])[::-1]
        fpr_at = (n_neg - g.below) / n_neg
    # only the steps up to the first one past FPR 0.3 matter (the u are ascending here, FPR descending)
    first = max(0, int(fpr_at.shape[0]) - int((fpr_at <= EXACT_MAX_FPR).sum()) - 1)
    # walk the curve from FPR 0 to 1: descending u
    pro_at = _to_numpy(suffix[g.starts[first:]]).astype(np.float64)[::-1] / px.n_regions
    fpr_at = _to_numpy(fpr_at[first:])[::-1]
    fpr_before = (n_neg - _to_numpy(g.below_eq[first:]).astype(np.int64))[::-1] / n_neg
    pro_before = np.concatenate(([0.0], pro_at[:-1]))
    # Between two distinct positive scores only negatives enter: the curve is flat there, so its points
    # are (fpr_before(u), PRO before u) -> (fpr_at(u), PRO at u) for each u, from (0, 0) to (1, 1).
    m = pro_at.shape[0]
    x = np.empty(2 * m + 3, dtype=np.float64)
    y = np.empty(2 * m + 3, dtype=np.float64)
    x[0] = y[0] = 0.0
    x[1:2 * m + 1:2], y[1:2 * m + 1:2] = fpr_before, pro_before
    x[2:2 * m + 2:2], y[2:2 * m + 2:2] = fpr_at, pro_at
    x[2 * m + 1], y[2 * m + 1] = 1.0, pro_at[-1]
    x[2 * m + 2] = y[2 * m + 2] = 1.0
    np.clip(x, None, 1.0, out=x)
    np.clip(y, None, 1.0, out=y)
    return float(_trapezoid(x, y, EXACT_MAX_FPR) / EXACT_MAX_FPR)


def aupro_exact(masks: Any, maps: Any, *, backend: str | None = None) -> float:
    """The standard exact AUPRO (MVTec AD's evaluation code), in [0, 1].

    Every distinct score is a threshold (predicted anomalous: score >= it); FPR and PRO as in
    :func:`aupro` (regions: 8-connected, over all images); the PRO-over-FPR curve, from (0, 0) to (1, 1),
    is integrated with the trapezoidal rule from FPR 0 to 0.3 (interpolated at exactly 0.3) and divided by
    0.3. Returns nan when the masks hold no positive or no negative pixel.
    """
    return _exact_aupro(_prepare(masks, maps, backend))


# --------------------------------------------------------------------------------------------------


def pixel_metrics(masks: Any, maps: Any, *, backend: str | None = None) -> dict[str, float]:
    """Pixel-level metrics of one class over all pixels of all its images, floats in [0, 1]:
    ``{"pixel_auroc", "pixel_aupro", "pixel_aupro_exact", "pixel_f1max"}``.

    AUROC and F1-max equal scikit-learn's ``roc_auc_score`` and the max finite F1 of
    ``precision_recall_curve`` (computed here from one sort, without scikit-learn, so 1000 maps of
    518x518 fit); ``pixel_aupro`` is :func:`aupro` (the paper's) and ``pixel_aupro_exact`` is
    :func:`aupro_exact`. All four are nan when the masks hold no positive or no negative pixel;
    ``pixel_aupro`` also in the cases listed in :func:`aupro`.
    """
    px = _prepare(masks, maps, backend)
    if px is None:
        return {"pixel_auroc": NAN, "pixel_aupro": NAN, "pixel_aupro_exact": NAN, "pixel_f1max": NAN}
    auroc, f1 = _auroc_f1(px.groups())
    return {
        "pixel_auroc": auroc,
        "pixel_aupro": _paper_aupro(px),
        "pixel_aupro_exact": _exact_aupro(px),
        "pixel_f1max": f1,
    }
