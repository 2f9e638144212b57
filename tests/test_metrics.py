"""glocalclip.engine.metrics against scikit-learn and straightforward implementations written here (docs/design.md §6)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from glocalclip import metrics

SEEDS = (0, 1, 2)
BACKENDS = ("numpy", "torch")
PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_aupro_exact", "pixel_f1max")


# ------------------------------------------------------------------------------------------ data


def make_masks(rng: np.random.Generator, n: int = 6, size: int = 40) -> np.ndarray:
    """1-4 rectangular or elliptic blobs per mask; every other mask also gets two squares that touch only
    at a corner (one region under 8-connectivity, two under 4-connectivity)."""
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.integers(4, size - 4, 2)
            ry, rx = rng.integers(1, 6, 2)
            if rng.random() < 0.5:
                masks[i, max(cy - ry, 0):cy + ry, max(cx - rx, 0):cx + rx] = 1
            else:
                masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        if i % 2 == 0:
            y, x = rng.integers(0, size - 9, 2)
            a, b = rng.integers(2, 5, 2)
            masks[i, y:y + a, x:x + a] = 1
            masks[i, y + a:y + a + b, x + a:x + a + b] = 1
    return masks


def make_maps(rng: np.random.Generator, masks: np.ndarray, levels: int | None = 48) -> np.ndarray:
    """Noisy maps, higher inside the masks (unevenly, so regions differ); quantized to give ties."""
    noise = rng.random(masks.shape)
    gain = rng.random(masks.shape) * 0.8
    maps = 0.7 * noise + masks * gain
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32)


def has_diagonal_contacts(masks: np.ndarray) -> bool:
    return any(measure.label(m, connectivity=1).max() > measure.label(m, connectivity=2).max() for m in masks)


# ------------------------------------------------------------------------------------------ references


def ref_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Every distinct score as threshold (predicted positive: score >= t), F1 = 2TP / (2TP + FP + FN)."""
    best = -1.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        if tp > 0:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def ref_paper_aupro(masks: np.ndarray, amaps: np.ndarray) -> float:
    """The original code's loop: 200 thresholds, regions labelled per threshold per image."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()  # float32 scalars, as in the original
    delta = (max_th - min_th) / amaps.dtype.type(200)  # float32 too, on numpy 1.x as well (numpy >= 2 by itself)
    amaps64 = amaps.astype(np.float64)  # score > th compared exactly (numpy >= 2 does this by itself)
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[:] = amaps64 > th
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask, connectivity=2)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        pros.append(np.array(pro).mean())
        fprs.append(fp_pixels / inverse_masks.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < 0.3
    fprs = fprs[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[keep])


def ref_exact_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """All distinct thresholds (predicted: score >= t), curve from (0,0) to (1,1), area to FPR 0.3
    (interpolated), divided by 0.3."""
    regions = []
    for i, mask in enumerate(masks):
        lab = measure.label(mask, connectivity=2)
        regions += [(i, lab == k) for k in range(1, lab.max() + 1)]
    negative = masks == 0
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append((pred & negative).sum() / negative.sum())
        ys.append(np.mean([pred[i][region].mean() for i, region in regions]))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for j in range(1, len(xs)):
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < max_fpr:
                y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
                area += (max_fpr - x0) * (y0 + y_cut) / 2
            break
    return area / max_fpr


def as_input(x: np.ndarray, backend: str):
    return torch.from_numpy(x) if backend == "torch" else x


@pytest.fixture(scope="module", params=SEEDS)
def tied_case(request):
    rng = np.random.default_rng(request.param)
    masks = make_masks(rng)
    maps = make_maps(rng, masks, levels=48)
    return masks, maps, ref_paper_aupro(masks, maps), ref_exact_aupro(masks, maps)


# ------------------------------------------------------------------------------------------ image level


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(80) < 0.4).astype(np.int64)
    scores = np.round(rng.random(80) + 0.5 * labels, 1).astype(np.float32)  # ties
    assert len(np.unique(scores)) < 40
    got = metrics.image_metrics(labels, scores)
    assert set(got) == {"image_auroc", "image_ap", "image_f1max"}
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["image_f1max"] == pytest.approx(ref_f1_max(labels, scores), abs=1e-9)
    assert all(isinstance(v, float) for v in got.values())
    got_t = metrics.image_metrics(torch.from_numpy(labels), torch.from_numpy(scores))
    assert got_t == pytest.approx(got, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", BACKENDS)
def test_f1_max_matches_straightforward(seed, backend):
    rng = np.random.default_rng(100 + seed)
    labels = (rng.random(300) < 0.3).astype(np.int64)
    scores = np.round(rng.random(300) + 0.4 * labels, 2)  # float64, ties
    expected = ref_f1_max(labels, scores)
    got = metrics.f1_max(as_input(labels, backend), as_input(scores, backend), backend=backend)
    assert got == pytest.approx(expected, abs=1e-9)
    # and it is the max finite F1 of scikit-learn's precision-recall curve
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(all="ignore"):
        f1 = 2 * p * r / (p + r)
    assert got == pytest.approx(np.max(f1[np.isfinite(f1)]), abs=1e-12)


# ------------------------------------------------------------------------------------------ pixel level


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_auroc_f1_match_sklearn(tied_case, backend):
    masks, maps = tied_case[:2]
    got = metrics.pixel_metrics(as_input(masks, backend), as_input(maps, backend), backend=backend)
    assert set(got) == set(PIXEL_KEYS)
    y, s = masks.ravel(), maps.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(all="ignore"):
        f1 = 2 * p * r / (p + r)
    assert got["pixel_f1max"] == pytest.approx(np.max(f1[np.isfinite(f1)]), abs=1e-9)


def test_pixel_auroc_without_ties():
    rng = np.random.default_rng(7)
    masks = make_masks(rng, n=3, size=32)
    maps = make_maps(rng, masks, levels=None)
    got = metrics.pixel_metrics(masks, maps)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert got["pixel_f1max"] == pytest.approx(ref_f1_max(masks.ravel(), maps.ravel()), abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aupro_paper_matches_per_threshold_loop(tied_case, backend):
    masks, maps, expected, _ = tied_case
    assert has_diagonal_contacts(masks)  # the 8-connectivity is exercised
    got = metrics.aupro(as_input(masks, backend), as_input(maps, backend), backend=backend)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-9)
    full = metrics.pixel_metrics(as_input(masks, backend), as_input(maps, backend), backend=backend)
    assert full["pixel_aupro"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aupro_paper_continuous_maps(backend):
    rng = np.random.default_rng(11)
    masks = make_masks(rng, n=5, size=36)
    maps = make_maps(rng, masks, levels=None)
    got = metrics.aupro(as_input(masks, backend), as_input(maps, backend), backend=backend)
    assert got == pytest.approx(ref_paper_aupro(masks, maps), abs=1e-9)


def test_aupro_paper_thresholds_are_not_rounded_to_float32():
    """Scores equal to float32(threshold) sit just above or below the float64 threshold: only an exact
    comparison (no rounding of the threshold to float32) matches the loop."""
    rng = np.random.default_rng(3)
    masks = make_masks(rng, n=4, size=32)
    maps = make_maps(rng, masks, levels=None)
    lo, hi = maps.min(), maps.max()
    ths = np.arange(lo, hi, (hi - lo) / 200)
    rounded = ths.astype(np.float32)
    assert (rounded > ths).sum() > 20 and (rounded < ths).sum() > 20
    # put those float32 values (all within [lo, hi]) on many negative and positive pixels
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    for sel in (np.flatnonzero(flat_masks == 0), np.flatnonzero(flat_masks == 1)):
        sel = sel[(flat_maps[sel] != lo) & (flat_maps[sel] != hi)]
        picks = rng.choice(sel, size=min(len(sel) // 2, 3 * len(rounded)), replace=False)
        flat_maps[picks] = rng.choice(rounded[1:], size=len(picks))
    assert (maps.min(), maps.max()) == (lo, hi)
    expected = ref_paper_aupro(masks, maps)
    for backend in BACKENDS:
        got = metrics.aupro(as_input(masks, backend), as_input(maps, backend), backend=backend)
        assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_aupro_paper_thresholds_use_float32_min_max(dtype, backend):
    """min, max and step are float32 scalars (float16 maps are upcast to float32 first): with min 0 and
    max 1 the float32 step is 0.004999999888, so scores 0.125, 0.25, 0.5, 0.75 lie above thresholds 25, 50,
    100, 150, whereas float64 arithmetic would put those thresholds exactly on them."""
    rng = np.random.default_rng(4)
    masks = make_masks(rng, n=4, size=32)
    maps = make_maps(rng, masks, levels=None) / 1.5
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 1.0
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    for sel in (np.flatnonzero(flat_masks == 0)[2:], np.flatnonzero(flat_masks == 1)):
        picks = rng.choice(sel, size=min(len(sel) // 2, 120), replace=False)
        flat_maps[picks] = rng.choice([0.125, 0.25, 0.5, 0.75], size=len(picks))
    maps = maps.astype(dtype)
    as32 = maps.astype(np.float32)
    expected = ref_paper_aupro(masks, as32)
    assert abs(expected - ref_paper_aupro(masks, maps.astype(np.float64))) > 1e-4  # the test can tell
    got = metrics.aupro(as_input(masks, backend), as_input(maps, backend), backend=backend)
    assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aupro_exact_matches_straightforward(tied_case, backend):
    masks, maps, _, expected = tied_case
    got = metrics.aupro_exact(as_input(masks, backend), as_input(maps, backend), backend=backend)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aupro_exact_continuous_maps(backend):
    rng = np.random.default_rng(5)
    masks = make_masks(rng, n=4, size=24)
    maps = make_maps(rng, masks, levels=None)
    got = metrics.aupro_exact(as_input(masks, backend), as_input(maps, backend), backend=backend)
    assert got == pytest.approx(ref_exact_aupro(masks, maps), abs=1e-9)


def test_torch_path_equals_numpy_path_and_default_backends(tied_case):
    masks, maps = tied_case[:2]
    ref = metrics.pixel_metrics(masks, maps)
    dev = metrics.pixel_metrics(torch.from_numpy(masks), torch.from_numpy(maps), backend="torch")
    auto = metrics.pixel_metrics(torch.from_numpy(masks).bool(), torch.from_numpy(maps))  # CPU -> numpy
    for key in PIXEL_KEYS:
        assert dev[key] == pytest.approx(ref[key], abs=1e-12)
        assert auto[key] == ref[key]


def test_labelling_on_threads_equals_labelling_at_once(monkeypatch):
    """Chunks labelled on several threads number their regions on in image order: the same region of
    every pixel, and the same areas, as one call over the whole stack with the per-image structure."""
    rng = np.random.default_rng(21)
    masks = rng.random((11, 30, 40)) > 0.7  # many small regions, some spanning an image's whole height
    labels, count = ndimage.label(masks, structure=metrics._STRUCTURE)
    expected_region = labels[masks].astype(np.int64) - 1
    assert count > 100
    for threads, chunk_images in ((1, 11), (4, 11), (4, 2), (3, 1)):
        monkeypatch.setattr(metrics, "_LABEL_THREADS", threads)
        monkeypatch.setattr(metrics, "_LABEL_CHUNK_PIXELS", chunk_images * 30 * 40)
        region, area = metrics._label_regions(masks)
        assert np.array_equal(region, expected_region)
        assert np.array_equal(area, np.bincount(expected_region, minlength=count))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_labelling_and_counting(tied_case, backend, monkeypatch):
    masks, maps, paper, exact = tied_case
    monkeypatch.setattr(metrics, "_LABEL_CHUNK_PIXELS", 2 * masks.shape[1] * masks.shape[2])
    monkeypatch.setattr(metrics, "_COUNT_CHUNK_ENTRIES", 3 * 201)  # blocks of 3 regions
    got = metrics.pixel_metrics(as_input(masks, backend), as_input(maps, backend), backend=backend)
    assert got["pixel_aupro"] == pytest.approx(paper, abs=1e-9)
    assert got["pixel_aupro_exact"] == pytest.approx(exact, abs=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_equals_cpu(tied_case):
    masks, maps = tied_case[:2]
    ref = metrics.pixel_metrics(masks, maps)
    got = metrics.pixel_metrics(torch.from_numpy(masks).cuda(), torch.from_numpy(maps).cuda())
    for key in PIXEL_KEYS:
        assert got[key] == pytest.approx(ref[key], abs=1e-6)


def test_float16_maps_are_upcast_to_float32():
    rng = np.random.default_rng(9)
    masks = make_masks(rng, n=3, size=32)
    maps16 = make_maps(rng, masks, levels=None).astype(np.float16)
    ref = metrics.pixel_metrics(masks, maps16.astype(np.float32))
    assert metrics.pixel_metrics(masks, maps16) == ref
    got_t = metrics.pixel_metrics(torch.from_numpy(masks), torch.from_numpy(maps16), backend="torch")
    for key in PIXEL_KEYS:
        assert got_t[key] == pytest.approx(ref[key], abs=1e-12)
    assert metrics.aupro(masks, maps16) == pytest.approx(ref_paper_aupro(masks, maps16.astype(np.float32)), abs=1e-9)


# ------------------------------------------------------------------------------------------ undefined cases


def _quietly(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    assert not caught, [str(w.message) for w in caught]
    return out


@pytest.mark.parametrize("value", [0, 1])
def test_image_metrics_with_one_label_value_are_nan(value, capsys):
    labels = np.full(10, value)
    scores = np.linspace(0, 1, 10)
    got = _quietly(metrics.image_metrics, labels, scores)
    assert set(got) == {"image_auroc", "image_ap", "image_f1max"}
    assert all(np.isnan(v) for v in got.values())
    assert np.isnan(_quietly(metrics.f1_max, labels, scores))
    assert np.isnan(_quietly(metrics.image_metrics, np.zeros(0), np.zeros(0))["image_auroc"])
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("value", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_metrics_without_both_classes_are_nan(value, backend, capsys):
    masks = np.full((2, 16, 16), value, dtype=np.uint8)
    maps = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    m, s = as_input(masks, backend), as_input(maps, backend)
    got = _quietly(metrics.pixel_metrics, m, s, backend=backend)
    assert set(got) == set(PIXEL_KEYS)
    assert all(np.isnan(v) for v in got.values())
    assert np.isnan(_quietly(metrics.aupro, m, s, backend=backend))
    assert np.isnan(_quietly(metrics.aupro_exact, m, s, backend=backend))
    assert capsys.readouterr() == ("", "")


def test_constant_maps_give_nan_paper_aupro_only(capsys):
    masks = make_masks(np.random.default_rng(0), n=2, size=16)
    maps = np.full(masks.shape, 0.25, dtype=np.float32)
    got = _quietly(metrics.pixel_metrics, masks, maps)
    assert np.isnan(got["pixel_aupro"])  # no threshold: np.arange(c, c, 0) has none
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert got["pixel_f1max"] == pytest.approx(ref_f1_max(masks.ravel(), maps.ravel()))
    assert got["pixel_aupro_exact"] == pytest.approx(ref_exact_aupro(masks, maps), abs=1e-12)
    assert capsys.readouterr() == ("", "")


def test_bad_inputs_raise():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[:, 2:4, 2:4] = 1
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_metrics(masks, maps[:, :7])
    for where in ((0, 0, 0), (1, 2, 2), (1, 3, 3)):  # a negative pixel, then positive ones
        for bad in (np.nan, np.inf, -np.inf):
            broken = maps.copy()
            broken[where] = bad
            for backend in BACKENDS:
                with pytest.raises(ValueError, match="NaN"):
                    metrics.pixel_metrics(as_input(masks, backend), as_input(broken, backend), backend=backend)
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_metrics(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match="length"):
        metrics.image_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2]))


def test_pro_curve_is_the_curve_behind_aupro():
    from sklearn.metrics import auc

    rng = np.random.default_rng(42)
    masks = np.zeros((3, 32, 32), dtype=np.uint8)
    masks[0, 4:10, 4:12] = 1
    masks[1, 20:28, 2:6] = 1
    masks[2, 10:14, 10:30] = 1
    maps = (rng.random(masks.shape) + masks * 0.6).astype(np.float32)
    fpr, pro = metrics.pro_curve(masks, maps)
    assert fpr.shape == pro.shape and fpr.shape[0] == 200
    keep = fpr < 0.3
    f = fpr[keep]
    f = (f - f.min()) / (f.max() - f.min())
    assert auc(f, pro[keep]) == pytest.approx(metrics.aupro(masks, maps), abs=1e-12)
    assert metrics.pro_curve(np.zeros_like(masks), maps) is None


def test_pixel_metrics_accept_a_singleton_channel_axis():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 24, 24), dtype=np.uint8)
    masks[:, 5:12, 6:15] = 1
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    flat = metrics.pixel_metrics(masks, maps)
    chan = metrics.pixel_metrics(masks[:, None], maps[:, None])
    assert flat == chan
    # tensors on the maps' device: the device path takes the masks as they are ([N,1,H,W], one [H,W])
    for m, v in ((masks[:, None], maps[:, None]), (masks[0], maps[0])):
        dev = metrics.pixel_metrics(torch.from_numpy(m), torch.from_numpy(v), backend="torch")
        ref = metrics.pixel_metrics(m, v)
        assert dev == pytest.approx(ref, abs=1e-12)


def test_masks_as_0_255_bool_or_float_are_the_same_masks():
    """Documented: values > 0.5 are positive, so {0,1}, bool, {0,255} uint8 and float masks all work."""
    rng = np.random.default_rng(12)
    masks = make_masks(rng, n=3, size=20)
    maps = make_maps(rng, masks, levels=None)
    ref = metrics.pixel_metrics(masks, maps)
    assert not any(np.isnan(v) for v in ref.values())
    for variant in (masks.astype(bool), (masks * 255).astype(np.uint8), masks.astype(np.float32),
                    torch.from_numpy((masks * 255).astype(np.uint8))):
        assert metrics.pixel_metrics(variant, maps) == ref
    labels = masks.reshape(3, -1).max(1)
    labels[0] = 1 - labels[0] if labels.min() == labels.max() else labels[0]
    scores = maps.reshape(3, -1).mean(1)
    assert metrics.image_metrics(labels * 255, scores) == metrics.image_metrics(labels, scores)
