"""Pipeline benchmark: training epoch times with the feature cache, and test throughput.

    python -m bench.pipeline                 # CPU sizes (2 cores: about 2-3 minutes)
    python -m bench.pipeline --device cuda   # GPU sizes: ViT-L-14-336 (random weights) at 518 px

Speed does not depend on weight values, so the real architecture with random weights times the
real thing. Data are synthetic images written in the MVTec layout and read through the real
loader. Prints a table and writes JSON (default bench/results/pipeline_<device>.json).

Targets (docs/speed.md): later epochs <= 15 % of the first (which includes encoding); on one H100-class
GPU: test >= 150 images/s in bf16 (smoothing and metrics included), 15 epochs over 2162 images in
fp32 under 6 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from glocalclip import GlocalCLIP
from glocalclip.model.config import PRECISIONS
from glocalclip.datasets import AnomalyDataset, normalize_image
from glocalclip.engine.distributed import DistContext
from glocalclip.inference.evaluation import evaluate, evaluation_loader
from glocalclip.engine.loaders import default_num_workers
from glocalclip.engine.smoothing import GaussianSmoothing
from glocalclip.engine.training import TrainConfig, Trainer

from .common import (RESULTS_DIR, TimingHooks, device_name, make_dataset, model_config, peak_gib, reset_peak,
                     sync, write_report)


class TimedTrainer(Trainer):
    """A Trainer that also records how long encoding the training images into the cache took."""

    encode_s = 0.0

    def build_cache(self):
        t0 = time.time()
        cache = super().build_cache()
        self.encode_s = time.time() - t0
        return cache


def bench_training(data: Path, kind: str, epochs: int, device: torch.device, out: Path, workers: int,
                   cache: str = "auto") -> dict:
    """One training run: the first epoch (encoding included) against the mean of the later ones."""
    reset_peak(device)
    cfg = TrainConfig(train_data_path=str(data), save_path=str(out), epoch=epochs, batch_size=8,
                      num_workers=workers, device=str(device), progress=False, feature_cache=cache,
                      save_freq=epochs)
    t0 = time.time()
    trainer = TimedTrainer.prepare(model_config(kind), cfg, DistContext(device=device))
    build = time.time() - t0
    trainer.run()
    total = time.time() - t0
    epoch_s = [h["seconds"] for h in trainer.history]
    first = trainer.encode_s + epoch_s[0]
    later = float(np.mean(epoch_s[1:])) if len(epoch_s) > 1 else float("nan")
    return {"config": kind, "images": len(trainer.dataset), "epochs": epochs, "model_build_s": build,
            "encode_s": trainer.encode_s, "first_epoch_s": first, "later_epoch_mean_s": later,
            "later_over_first": later / first, "total_s": total, "peak_gpu_gib": peak_gib(device)}


def bench_test(data: Path, model: GlocalCLIP, batch_size: int, device: torch.device,
               workers: int, loader_ips: dict[str, float]) -> tuple[dict, dict]:
    """End to end through ``evaluate`` (what test.py runs: loading, forward, smoothing, all seven
    metrics with a class's metrics overlapping the next class's scoring), then the model alone;
    ``loader_ips``: the loader alone at this batch size (:func:`loader_rates`)."""
    reset_peak(device)
    precision = model.cfg.precision
    size = model.cfg.image_size
    with torch.no_grad():  # warm-up: kernels and autotuning at this batch size
        model(torch.randn(batch_size, 3, size, size, device=device))
    sync(device)
    clock = TimingHooks()
    res = evaluate(model, str(data), None, DistContext(device=device), mode="image-pixel-level", sigma=8,
                   batch_size=batch_size, num_workers=workers, hooks=clock, progress=False)
    sync(device)
    timing = clock.summary()
    n, dt, peak = res["n_images"], timing["wall_s"], peak_gib(device)
    row = {"precision": precision, "batch_size": batch_size, "workers": workers, "images": n,
           "seconds": dt, "images_per_s": n / dt, "startup_s": timing["startup_s"],
           "images_per_s_after_startup": n / (dt - timing["startup_s"]),
           **{k: timing[k] for k in ("loader_wait_s", "device_wait_s", "metrics_wait_s")},
           "loader_only_images_per_s": loader_ips["uint8"],
           "loader_float32_handover_images_per_s": loader_ips["float32"],
           "model_only_images_per_s": model_rate(data, model, batch_size, device), "peak_gpu_gib": peak}
    return row, res["classes"]


def loader_rates(data: Path, size: int, batch_size: int, workers: int, device: torch.device) -> dict[str, float]:
    """Images/s of the test loader alone: the uint8 handover testing uses, and the float32 handover
    of earlier versions."""
    rates = {}
    for as_uint8 in (True, False):
        ds = AnomalyDataset(str(data), split="test", image_size=size, as_uint8=as_uint8)
        batches = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
        t0 = time.time()
        n_loaded = 0
        for batch in evaluation_loader(ds, batches, workers, device):
            n_loaded += len(batch["image"])
        rates["uint8" if as_uint8 else "float32"] = n_loaded / (time.time() - t0)
    return rates


def model_rate(data: Path, model: GlocalCLIP, batch_size: int, device: torch.device) -> float:
    """Images/s of the model + σ-8 smoothing alone, on images already on the device."""
    ds = AnomalyDataset(str(data), split="test", image_size=model.cfg.image_size, as_uint8=True)
    x = normalize_image(torch.stack([ds[i]["image"] for i in range(batch_size)]).to(device))
    text = model.encode_text()
    reps = max(2, 64 // batch_size)
    smooth = GaussianSmoothing(8, device)
    with torch.no_grad():
        sync(device)
        t0 = time.time()
        for _ in range(reps):
            smooth(model(x, text=text)["anomaly_map"])
        sync(device)
    return reps * batch_size / (time.time() - t0)


def bench_tests(data: Path, kind: str, precisions: list[str], batches: list[int], device: torch.device,
                workers: int) -> tuple[list[dict], dict]:
    """Every (precision, batch) test row with one model; the bf16-vs-fp32 metric drift where both ran."""
    rows, per_precision, drift = [], {}, {}
    torch.manual_seed(0)
    base = GlocalCLIP(model_config(kind)).to(device)
    loader_ips: dict[int, dict[str, float]] = {}  # per batch size: the loader does not depend on precision
    for prec in precisions:
        # precision is fixed when a model is built: one model per precision on the same CLIP and prompts
        model = base if prec == base.cfg.precision else GlocalCLIP(base.cfg.replace(precision=prec), clip=base.clip)
        model.prompt_learner.load_state_dict(base.prompt_learner.state_dict())
        for bs in batches:
            if bs not in loader_ips:
                loader_ips[bs] = loader_rates(data, model.cfg.image_size, bs, workers, device)
            row, metrics = bench_test(data, model, bs, device, workers, loader_ips[bs])
            rows.append({"config": kind, **row})
            per_precision.setdefault(prec, metrics)
            print(json.dumps(rows[-1]), flush=True)
    if "bf16" in per_precision and "fp32" in per_precision:
        a, b = per_precision["fp32"], per_precision["bf16"]
        keys = next(iter(a.values())).keys()
        drift = {k: float(np.mean([abs(a[c][k] - b[c][k]) for c in a])) for k in keys}
    return rows, drift


def print_tables(report: dict) -> None:
    print()
    if report["training"]:
        print(tabulate([[r["config"], r["images"], r["epochs"], f"{r['encode_s']:.1f}", f"{r['first_epoch_s']:.1f}",
                         f"{r['later_epoch_mean_s']:.2f}", f"{100 * r['later_over_first']:.1f}%", f"{r['total_s']:.1f}",
                         _gib(r["peak_gpu_gib"])] for r in report["training"]],
                       headers=["train config", "images", "epochs", "encode s", "first epoch s (incl. encode)",
                                "later epoch s", "later/first", "total s", "peak GiB"], tablefmt="github"))
        print()
    print(tabulate([[r["config"], r["precision"], r["batch_size"], r["workers"], r["images"], f"{r['seconds']:.1f}",
                     f"{r['images_per_s']:.1f}", f"{r['startup_s']:.2f}", f"{r['images_per_s_after_startup']:.1f}",
                     f"{r['loader_wait_s']:.2f} / {r['device_wait_s']:.2f} / {r['metrics_wait_s']:.2f}",
                     f"{r['loader_only_images_per_s']:.0f}",
                     f"{r['loader_float32_handover_images_per_s']:.0f}", f"{r['model_only_images_per_s']:.1f}",
                     _gib(r["peak_gpu_gib"])] for r in report["test"]],
                   headers=["test config", "precision", "batch", "workers", "images", "seconds",
                            "images/s (test.py path, end to end)", "start-up s (to the first batch)",
                            "images/s after start-up", "host waited s: loader / device / metrics",
                            "loader alone img/s",
                            "loader, float32 handover img/s", "model+smoothing alone img/s", "peak GiB"],
                   tablefmt="github"))
    if report["bf16_metric_drift"]:
        print("\nbf16 vs fp32, mean |Δ| over classes (×100): " +
              ", ".join(f"{k} {100 * v:.2f}" for k, v in report["bf16_metric_drift"].items()))


def _gib(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device to time (cpu, cuda, cuda:1, ...)")
    p.add_argument("--train_images", type=int, default=None, help="training images (default: 2162 on a GPU, 48)")
    p.add_argument("--test_images", type=int, default=None, help="test images (default: 512 on a GPU, 24)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 15 on a GPU, 4)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: test.py's for the device)")
    p.add_argument("--json", default=None, help="where to write the results (default bench/results/pipeline_*.json)")
    p.add_argument("--skip_train", action="store_true", help="time testing only")
    p.add_argument("--test_batches", type=int, nargs="+", default=[1, 16], help="test batch sizes to time")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="test precisions (default: fp32 and bf16 on a GPU, fp32 on a CPU)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    workers = args.workers if args.workers is not None else default_num_workers(device)  # test.py's default
    train_images = args.train_images or (2162 if gpu else 48)
    test_images = args.test_images or (512 if gpu else 24)
    report: dict = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="glocalclip_bench_") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        if not args.skip_train:
            make_dataset(tmp / "train", train_images, 256, os.cpu_count() or 1)
        test_root = make_dataset(tmp / "test", test_images, 256, os.cpu_count() or 1) \
            if args.skip_train or test_images != train_images else tmp / "train"
        report["data_generation_s"] = time.time() - t0
        print(f"synthetic data ready in {report['data_generation_s']:.0f}s", flush=True)
        report["training"] = []
        if not args.skip_train:
            epochs = args.epochs or (15 if gpu else 4)
            report["training"].append(bench_training(tmp / "train", "vitl" if gpu else "tiny", epochs, device,
                                                     tmp / "ck", workers))
            print(json.dumps(report["training"][-1]), flush=True)
        precisions = args.precisions or (["fp32", "bf16"] if gpu else ["fp32"])
        report["test"], report["bf16_metric_drift"] = bench_tests(test_root, "vitl" if gpu else "mid", precisions,
                                                                  args.test_batches, device, workers)
    print_tables(report)
    write_report(report, args.json or RESULTS_DIR / f"pipeline_{'gpu' if gpu else 'cpu'}.json")


if __name__ == "__main__":
    main()
