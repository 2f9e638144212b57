"""Benchmark: the paper's AUPRO, ours (regions labelled once, all thresholds counted at once) against the
original per-threshold loop (regions labelled per threshold per image), plus pixel_metrics as a whole.

    python -m bench.metrics [--n 200 --size 256 --seed 0 --repeat 3 --json bench/results/metrics.json]

Prints a table and writes JSON. When CUDA is available the device path is timed too.
"""
from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc
from tabulate import tabulate

from glocalclip import metrics

from .common import RESULTS_DIR, timed, write_report


def make_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n masks with 1-4 elliptic blobs each, and smooth float32 anomaly maps that are higher on them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.integers(size // 10, size - size // 10, 2)
            ry, rx = rng.integers(max(2, size // 64), max(3, size // 10), 2)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 4, 4))
    signal = ndimage.gaussian_filter(masks * rng.uniform(0.5, 2.0, (n, 1, 1)), sigma=(0, 2, 2))
    maps = (noise / noise.std() + 2.0 * signal).astype(np.float32)
    return masks, maps


def loop_aupro(masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The original code's cal_pro_score: a Python loop over 200 thresholds, labelling the GT regions of
    every image at every threshold."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs = np.array(pros), np.array(fprs)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(auc(fprs, pros[idxes]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="number of maps")
    ap.add_argument("--size", type=int, default=256, help="map side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random masks and maps")
    ap.add_argument("--repeat", type=int, default=3, help="runs of our functions (best time is kept)")
    ap.add_argument("--json", default=str(RESULTS_DIR / "metrics.json"), help="where to write the results")
    return ap.parse_args(argv)


def cpu_rows(masks: np.ndarray, maps: np.ndarray, repeat: int) -> tuple[list[dict], dict]:
    """The per-threshold loop (the reference of every other row), ``metrics.aupro`` and
    ``metrics.pixel_metrics`` on the CPU; with pixel_metrics' values."""
    t_loop, v_loop = timed(lambda: loop_aupro(masks, maps), 1)
    t_ours, v_ours = timed(lambda: metrics.aupro(masks, maps), repeat)
    t_pix, v_pix = timed(lambda: metrics.pixel_metrics(masks, maps), repeat)
    rows = [
        {"what": "AUPRO (paper), per-threshold loop", "device": "cpu", "seconds": t_loop,
         "speedup_vs_loop": 1.0, "value": v_loop, "abs_diff_vs_loop": 0.0},
        {"what": "AUPRO (paper), metrics.aupro", "device": "cpu", "seconds": t_ours,
         "speedup_vs_loop": t_loop / t_ours, "value": v_ours, "abs_diff_vs_loop": abs(v_ours - v_loop)},
        {"what": "metrics.pixel_metrics (all four)", "device": "cpu", "seconds": t_pix,
         "speedup_vs_loop": None, "value": v_pix["pixel_aupro"],
         "abs_diff_vs_loop": abs(v_pix["pixel_aupro"] - v_loop)},
    ]
    return rows, v_pix


def cuda_rows(masks: np.ndarray, maps: np.ndarray, repeat: int, loop: dict, v_pix: dict) -> tuple[list[dict], dict]:
    """``metrics.aupro`` and ``pixel_metrics`` on the GPU against the loop's row and the CPU values."""
    dev = torch.device("cuda")
    masks_d, maps_d = torch.from_numpy(masks).to(dev), torch.from_numpy(maps).to(dev)
    metrics.pixel_metrics(masks_d, maps_d)  # warm-up (kernels, allocator)
    t_cu, v_cu = timed(lambda: metrics.aupro(masks_d, maps_d), repeat, dev)
    t_cu_pix, v_cu_pix = timed(lambda: metrics.pixel_metrics(masks_d, maps_d), repeat, dev)
    rows = [
        {"what": "AUPRO (paper), metrics.aupro", "device": "cuda", "seconds": t_cu,
         "speedup_vs_loop": loop["seconds"] / t_cu, "value": v_cu, "abs_diff_vs_loop": abs(v_cu - loop["value"])},
        {"what": "metrics.pixel_metrics (all four)", "device": "cuda", "seconds": t_cu_pix,
         "speedup_vs_loop": None, "value": v_cu_pix["pixel_aupro"],
         "abs_diff_vs_loop": abs(v_cu_pix["pixel_aupro"] - loop["value"])},
    ]
    cuda = {"device_name": torch.cuda.get_device_name(0), "pixel_metrics": v_cu_pix,
            "max_abs_diff_vs_cpu": max(abs(v_cu_pix[k] - v_pix[k]) for k in v_pix)}
    return rows, cuda


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    masks, maps = make_data(args.n, args.size, args.seed)
    regions = sum(int(measure.label(m, connectivity=2).max()) for m in masks)
    print(f"{args.n} maps of {args.size}x{args.size}, {regions} GT regions, "
          f"{masks.mean() * 100:.1f}% anomalous pixels; running the per-threshold loop ...", flush=True)
    rows, v_pix = cpu_rows(masks, maps, args.repeat)
    cuda = {}
    if torch.cuda.is_available():
        more, cuda = cuda_rows(masks, maps, args.repeat, rows[0], v_pix)
        rows += more
    print(tabulate(
        [[r["what"], r["device"], f"{r['seconds']:.3f}",
          "" if r["speedup_vs_loop"] is None else f"{r['speedup_vs_loop']:.0f}x",
          f"{r['value']:.10f}", f"{r['abs_diff_vs_loop']:.1e}"] for r in rows],
        headers=["", "device", "time [s]", "speed-up", "pixel AUPRO (paper)", "|diff| vs loop"]))
    print("pixel_metrics:", {k: round(v, 6) for k, v in v_pix.items()})
    if cuda:
        print(f"CUDA ({cuda['device_name']}) vs CPU, max |diff| over the four metrics: "
              f"{cuda['max_abs_diff_vs_cpu']:.1e}")
    ok = rows[1]["abs_diff_vs_loop"] <= 1e-9 and rows[1]["speedup_vs_loop"] >= 100
    print(f"target (same value to 1e-9, >= 100x faster): {'met' if ok else 'NOT met'}")
    result = {
        "config": vars(args) | {"regions": regions, "anomalous_pixel_fraction": float(masks.mean())},
        "rows": rows, "pixel_metrics_cpu": v_pix, "cuda": cuda or None, "target_met": ok,
        "env": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "cpu_count": os.cpu_count(), "machine": platform.machine()},
    }
    write_report(result, args.json)
    return result


if __name__ == "__main__":
    main()
