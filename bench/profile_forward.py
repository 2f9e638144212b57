"""Where one test forward spends its time: the diagnosis to take home from a lent GPU.

    python -m bench.profile_forward --device cuda            # ViT-L-14-336, random weights, 518 px, bf16
    python -m bench.profile_forward                          # CPU: the mid config (a smoke run)

Three measurements of the model + σ-8 smoothing on images already on the device (no loader):
  1. throughput at several batch sizes;
  2. host time to *enqueue* one batch vs the device time to run it: if the host takes longer, the
     GPU starves whatever the loader does (then CUDA graphs or torch.compile are the remedy);
  3. a torch.profiler table of the operators that take the device time (which attention kernel
     SDPA picked, how much goes to elementwise work a compiler would fuse, how much to smoothing).
Prints tables and writes JSON (default bench/results/profile_forward_<device>.json).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.ndimage import correlate1d
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

from glocalclip import GlocalCLIP
from glocalclip.model.config import PRECISIONS
from glocalclip.engine.smoothing import GaussianSmoothing, gaussian_kernel1d

from .common import RESULTS_DIR, device_name, model_config, peak_gib, reset_peak, sync, write_report


def step(model: GlocalCLIP, x: torch.Tensor, text, smooth: GaussianSmoothing) -> None:
    out = model(x, text=text)
    smooth(out["anomaly_map"])


def throughput(model: GlocalCLIP, batch: int, text, smooth, device: torch.device, reps: int) -> dict:
    size = model.cfg.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        step(model, x, text, smooth)  # kernels and autotuning at this batch size
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            step(model, x, text, smooth)
        enqueued = time.perf_counter() - t0  # the host is done; the device may still be working
        sync(device)
        total = time.perf_counter() - t0
    return {"batch": batch, "images_per_s": reps * batch / total, "host_enqueue_ms_per_batch": 1e3 * enqueued / reps,
            "wall_ms_per_batch": 1e3 * total / reps, "peak_gpu_gib": peak_gib(device)}


def host_vs_device(model: GlocalCLIP, batch: int, text, smooth, device: torch.device, reps: int) -> dict:
    """Host time to enqueue a batch while the device is idle (no queue to hide behind) vs the time
    the batch then takes to finish."""
    size = model.cfg.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    host, full = [], []
    with torch.no_grad():
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            step(model, x, text, smooth)
            host.append(time.perf_counter() - t0)
            sync(device)
            full.append(time.perf_counter() - t0)
    return {"batch": batch, "host_enqueue_ms": 1e3 * min(host), "batch_ms": 1e3 * min(full)}


def band_matrix(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """[n, n] matrix of the 1-D correlation with ``kernel`` under scipy's "reflect" padding: scipy's
    own correlation of the identity, column j being the response to the unit vector e_j."""
    band = correlate1d(np.eye(n), kernel.cpu().numpy(), axis=0, mode="reflect")  # [n, n] float64
    return torch.from_numpy(band).to(device=kernel.device, dtype=kernel.dtype)


def banded_smooth(maps: torch.Tensor, band_h: torch.Tensor, band_w: torch.Tensor) -> torch.Tensor:
    """The alternative to the convolution: two float64 matrix products with the band matrices, rounded
    to float32 between the passes as scipy does (equal to scipy on the CPU in every test)."""
    x = torch.matmul(band_h, maps.to(band_h.dtype)).float().to(band_h.dtype)
    return torch.matmul(x, band_w.t()).float()


def smoothing_alone(batch: int, size: int, smooth: GaussianSmoothing, device: torch.device, reps: int) -> dict:
    """σ-8 smoothing of one batch of maps: what testing runs (on a GPU, the float64 separable
    convolution) and, for comparison, the banded float64 matrix products (cuBLAS DGEMM)."""
    maps = torch.rand(batch, size, size, device=device)
    out: dict = {"batch": batch}
    kernel = gaussian_kernel1d(8, 4.0, device, torch.float64)
    band = band_matrix(size, kernel)
    variants = {"ms_per_batch": lambda: smooth(maps),
                "banded_matmul_ms_per_batch": lambda: banded_smooth(maps, band, band)}
    for key, fn in variants.items():
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        out[key] = 1e3 * (time.perf_counter() - t0) / reps
    out["banded_equals_testing"] = bool(torch.equal(smooth(maps), banded_smooth(maps, band, band)))
    return out


def op_table(model: GlocalCLIP, batch: int, text, smooth, device: torch.device, top: int) -> list[dict]:
    size = model.cfg.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        step(model, x, text, smooth)
        sync(device)
        with profile(activities=acts) as prof:
            for _ in range(2):
                step(model, x, text, smooth)
            sync(device)
    gpu = device.type == "cuda"

    def self_time(e) -> float:  # microseconds
        if gpu:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_time(e) > 0]
    total = sum(self_time(e) for e in events) or 1.0
    events.sort(key=self_time, reverse=True)
    return [{"op": e.key, "calls": int(e.count) // 2, "self_ms_per_batch": self_time(e) / 2e3,
             "share": self_time(e) / total} for e in events[:top]]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device to profile (cpu, cuda, cuda:1, ...)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default: 8 16 32 64 on a GPU, 1 2 on a CPU")
    p.add_argument("--profile_batch", type=int, default=None, help="default: 16 on a GPU, 2 on a CPU")
    p.add_argument("--top", type=int, default=25, help="operators listed in the profile table")
    p.add_argument("--json", default=None,
                   help="where to write the results (default bench/results/profile_forward_<device>.json)")
    return p.parse_args()


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """The throughput rows, host vs device for one batch, smoothing alone and the operator table."""
    gpu = device.type == "cuda"
    precision = args.precision or ("bf16" if gpu else "fp32")
    prof_batch = args.profile_batch or (16 if gpu else 2)
    reps = 8 if gpu else 2
    torch.manual_seed(0)
    model = GlocalCLIP(model_config("vitl" if gpu else "mid", precision)).to(device).eval()
    smooth = GaussianSmoothing(8, device)
    with torch.no_grad():
        text = model.encode_text()
    report = {"device": device_name(device), "torch": torch.__version__, "precision": precision,
              "image_size": model.cfg.image_size, "profile_batch": prof_batch, "throughput": []}
    for b in args.batches or ([8, 16, 32, 64] if gpu else [1, 2]):
        reset_peak(device)
        report["throughput"].append(throughput(model, b, text, smooth, device, reps))
        print(json.dumps(report["throughput"][-1]), flush=True)
    report["host_vs_device"] = host_vs_device(model, prof_batch, text, smooth, device, 3)
    report["smoothing_alone"] = smoothing_alone(prof_batch, model.cfg.image_size, smooth, device, reps)
    report["ops"] = op_table(model, prof_batch, text, smooth, device, args.top)
    return report


def print_report(report: dict, gpu: bool) -> None:
    print()
    print(tabulate([[r["batch"], f"{r['images_per_s']:.1f}", f"{r['host_enqueue_ms_per_batch']:.1f}",
                     f"{r['wall_ms_per_batch']:.1f}", "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f}"]
                    for r in report["throughput"]],
                   headers=["batch", "model+smoothing img/s", "host enqueue ms/batch (queued)", "wall ms/batch",
                            "peak GiB"], tablefmt="github"))
    hv = report["host_vs_device"]
    print(f"\nbatch {hv['batch']}, device idle before it: host enqueues it in {hv['host_enqueue_ms']:.1f} ms, "
          f"it finishes after {hv['batch_ms']:.1f} ms"
          + (" (the host is slower than the device: it cannot keep the GPU fed)"
             if gpu and hv["host_enqueue_ms"] > 0.9 * hv["batch_ms"] else ""))
    sm = report["smoothing_alone"]
    print(f"smoothing alone: {sm['ms_per_batch']:.2f} ms per batch of {sm['batch']} (banded float64 matmul: "
          f"{sm['banded_matmul_ms_per_batch']:.2f} ms, "
          f"{'the same' if sm['banded_equals_testing'] else 'other'} values)")
    print()
    print(tabulate([[r["op"][:70], r["calls"], f"{r['self_ms_per_batch']:.2f}", f"{100 * r['share']:.1f}%"]
                    for r in report["ops"]],
                   headers=[f"operator (batch {report['profile_batch']})", "calls",
                            f"self {'device' if gpu else 'CPU'} ms", "share"], tablefmt="github"))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    report = measure(args, device)
    print_report(report, gpu)
    write_report(report, args.json or RESULTS_DIR / f"profile_forward_{'gpu' if gpu else 'cpu'}.json")


if __name__ == "__main__":
    main()
