"""Pipeline benchmark: training epoch times with the feature cache, and test throughput.

    python bench/pipeline.py                 # CPU sizes (2 cores: about 2-3 minutes)
    python bench/pipeline.py --device cuda   # GPU sizes: ViT-L-14-336 (random weights) at 518 px

Speed does not depend on weight values, so the real architecture with random weights times the
real thing. Data are synthetic images written in the MVTec layout and read through the real
loader. Prints a table and writes JSON (default bench/results/pipeline_<device>.json).

Targets (issue 5): later epochs <= 15 % of the first (which includes encoding); on one H100-class
GPU: test >= 150 images/s in bf16 (smoothing and metrics included), 15 epochs over 2162 images in
fp32 under 6 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from glocalclip import GlocalCLIP, GlocalCLIPConfig  # noqa: E402
from glocalclip.datasets import AnomalyDataset, normalize_image, write_meta  # noqa: E402
from glocalclip.engine.distributed import DistContext  # noqa: E402
from glocalclip.engine.evaluation import evaluate, evaluation_loader  # noqa: E402
from glocalclip.engine.loaders import default_num_workers  # noqa: E402
from glocalclip.engine.smoothing import GaussianSmoothing  # noqa: E402
from glocalclip.datasets.synthetic import make_sample, synthetic_meta  # noqa: E402
from glocalclip.engine.training import TrainConfig, Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
MID_CONFIG = HERE / "mid_clip.json"


def _write_class(args: tuple) -> None:
    from PIL import Image

    root, cls_name, n, size, seed = args
    rng = np.random.default_rng(seed)
    for i in range(n):
        anomalous = i % 2 == 1
        specie = "blob" if anomalous else "good"
        d = Path(root) / cls_name / "test" / specie
        d.mkdir(parents=True, exist_ok=True)
        img, mask = make_sample(cls_name, size, anomalous, rng, "blob" if anomalous else None)
        Image.fromarray(img).save(d / f"{i:05d}.png")
        if anomalous:
            g = Path(root) / cls_name / "ground_truth" / specie
            g.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(g / f"{i:05d}_mask.png")


def make_dataset(root: Path, n_images: int, size: int, workers: int) -> Path:
    """n_images split over 3 classes and over worker processes (chunks of one class each)."""
    classes = ("stripes", "checker", "grain")
    per_class = [n_images // 3 + (1 if k < n_images % 3 else 0) for k in range(3)]
    jobs = []
    for k, cls_name in enumerate(classes):
        jobs.append((str(root), cls_name, per_class[k], size, 1000 + k))
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as ex:
        list(ex.map(_write_class, jobs))
    write_meta(str(root), synthetic_meta(root))
    return root


def model_config(kind: str, precision: str = "fp32") -> GlocalCLIPConfig:
    if kind == "vitl":
        return GlocalCLIPConfig(backbone="ViT-L-14-336", pretrained=None, precision=precision)
    if kind == "mid":
        return GlocalCLIPConfig(backbone=str(MID_CONFIG), pretrained=None, features_list=(3, 6, 9, 12),
                                dpam_layer=10, precision=precision)
    return GlocalCLIPConfig(backbone="tiny", pretrained=None, features_list=(2, 4, 6, 8), dpam_layer=6,
                            depth=3, t_n_ctx=2, precision=precision)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bench_training(data: Path, kind: str, epochs: int, device: torch.device, out: Path, workers: int,
                   cache: str = "auto") -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = TrainConfig(train_data_path=str(data), save_path=str(out), epoch=epochs, batch_size=8,
                      num_workers=workers, device=str(device), progress=False, feature_cache=cache,
                      save_freq=epochs)
    t0 = time.time()
    trainer = Trainer(model_config(kind), cfg, DistContext(device=device))
    build = time.time() - t0
    trainer.run()
    total = time.time() - t0
    hist = trainer.history
    encode = _encode_seconds(out)
    first = encode + hist[0]["seconds"]
    later = float(np.mean([h["seconds"] for h in hist[1:]])) if len(hist) > 1 else float("nan")
    return {"config": kind, "images": len(trainer.dataset), "epochs": epochs, "model_build_s": build,
            "encode_s": encode, "first_epoch_s": first, "later_epoch_mean_s": later,
            "later_over_first": later / first, "total_s": total, "peak_gpu_gib": peak_gib(device)}


def _encode_seconds(out: Path) -> float:
    for line in (out / "log.txt").read_text().splitlines():
        if line.startswith("encoded "):
            return float(line.split(" in ")[1].split("s;")[0])
    return 0.0


def bench_test(data: Path, kind: str, precision: str, batch_size: int, device: torch.device, workers: int,
               model: GlocalCLIP | None = None) -> tuple[dict, dict]:
    """End to end through ``evaluate`` (what test.py runs: loading, forward, smoothing, all seven
    metrics with a class's metrics overlapping the next class's scoring), then the parts alone."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if model is None:
        torch.manual_seed(0)
        model = GlocalCLIP(model_config(kind, precision)).to(device)
    model.cfg = model.cfg.replace(precision=precision)  # the same weights, another autocast
    size = model.cfg.image_size
    with torch.no_grad():  # warm-up: kernels and autotuning at this batch size
        model(torch.randn(batch_size, 3, size, size, device=device))
    sync(device)
    res = evaluate(model, str(data), None, DistContext(device=device), mode="image-pixel-level", sigma=8,
                   batch_size=batch_size, num_workers=workers, progress=False)
    sync(device)
    n, dt = res["n_images"], res["wall_time_s"]
    peak = peak_gib(device)

    # where the time goes: the test loader alone (uint8 handover, as testing uses it, and the float32
    # handover of earlier versions), and the model + smoothing alone on resident images
    loader_ips = {}
    for as_uint8 in (True, False):
        ds = AnomalyDataset(str(data), split="test", image_size=size, as_uint8=as_uint8)
        batches = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
        t1 = time.time()
        n_loaded = 0
        for batch in evaluation_loader(ds, batches, workers, device):
            n_loaded += len(batch["image"])
        loader_ips["uint8" if as_uint8 else "float32"] = n_loaded / (time.time() - t1)
    ds = AnomalyDataset(str(data), split="test", image_size=size, as_uint8=True)
    x = normalize_image(torch.stack([ds[i]["image"] for i in range(batch_size)]).to(device))
    text = model.encode_text()
    reps = max(2, 64 // batch_size)
    smooth = GaussianSmoothing(8, device)
    with torch.no_grad():
        sync(device)
        t1 = time.time()
        for _ in range(reps):
            out = model(x, text=text)
            smooth(out["anomaly_map"])
        sync(device)
    model_ips = reps * batch_size / (time.time() - t1)
    return ({"config": kind, "precision": precision, "batch_size": batch_size, "workers": workers, "images": n,
             "seconds": dt, "images_per_s": n / dt, "startup_s": res["startup_s"],
             "images_per_s_after_startup": n / (dt - res["startup_s"]), "loader_wait_s": res["loader_wait_s"],
             "device_wait_s": res["device_wait_s"], "metrics_wait_s": res["metrics_wait_s"],
             "loader_only_images_per_s": loader_ips["uint8"],
             "loader_float32_handover_images_per_s": loader_ips["float32"],
             "model_only_images_per_s": model_ips, "peak_gpu_gib": peak}, res["classes"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train_images", type=int, default=None)
    p.add_argument("--test_images", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--test_batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                   help="test precisions (default: fp32 and bf16 on a GPU, fp32 on a CPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    workers = args.workers if args.workers is not None else default_num_workers(device)  # test.py's default
    train_images = args.train_images or (2162 if gpu else 48)
    test_images = args.test_images or (512 if gpu else 24)
    epochs = args.epochs or (15 if gpu else 4)
    out_json = Path(args.json or HERE / "results" / f"pipeline_{'gpu' if gpu else 'cpu'}.json")
    report: dict = {"device": torch.cuda.get_device_name(device) if gpu else "cpu",
                    "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="glocalclip_bench_") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        if not args.skip_train:
            make_dataset(tmp / "train", train_images, 256, os.cpu_count() or 1)
        test_root = make_dataset(tmp / "test", test_images, 256, os.cpu_count() or 1) \
            if args.skip_train or test_images != train_images else tmp / "train"
        report["data_generation_s"] = time.time() - t0
        print(f"synthetic data ready in {report['data_generation_s']:.0f}s", flush=True)

        rows_train = []
        if not args.skip_train:
            kind = "vitl" if gpu else "tiny"
            r = bench_training(tmp / "train", kind, epochs, device, tmp / "ck", workers)
            rows_train.append(r)
            print(json.dumps(r), flush=True)
        report["training"] = rows_train

        rows_test, drift = [], {}
        kind = "vitl" if gpu else "mid"
        precisions = args.precisions or (("fp32", "bf16") if gpu else ("fp32",))
        per_precision = {}
        torch.manual_seed(0)
        model = GlocalCLIP(model_config(kind)).to(device)
        for prec in precisions:
            for bs in args.test_batches:
                r, m = bench_test(test_root, kind, prec, bs, device, workers, model=model)
                rows_test.append(r)
                per_precision.setdefault(prec, m)
                print(json.dumps(r), flush=True)
        if "bf16" in per_precision and "fp32" in per_precision:
            a, b = per_precision["fp32"], per_precision["bf16"]
            keys = next(iter(a.values())).keys()
            drift = {k: float(np.mean([abs(a[c][k] - b[c][k]) for c in a])) for k in keys}
        report["test"] = rows_test
        report["bf16_metric_drift"] = drift

    print()
    if rows_train:
        print(tabulate([[r["config"], r["images"], r["epochs"], f"{r['encode_s']:.1f}", f"{r['first_epoch_s']:.1f}",
                         f"{r['later_epoch_mean_s']:.2f}", f"{100 * r['later_over_first']:.1f}%", f"{r['total_s']:.1f}",
                         "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f}"] for r in rows_train],
                       headers=["train config", "images", "epochs", "encode s", "first epoch s (incl. encode)",
                                "later epoch s", "later/first", "total s", "peak GiB"], tablefmt="github"))
        print()
    print(tabulate([[r["config"], r["precision"], r["batch_size"], r["workers"], r["images"], f"{r['seconds']:.1f}",
                     f"{r['images_per_s']:.1f}", f"{r['startup_s']:.2f}", f"{r['images_per_s_after_startup']:.1f}",
                     f"{r['loader_wait_s']:.2f} / {r['device_wait_s']:.2f} / {r['metrics_wait_s']:.2f}",
                     f"{r['loader_only_images_per_s']:.0f}",
                     f"{r['loader_float32_handover_images_per_s']:.0f}", f"{r['model_only_images_per_s']:.1f}",
                     "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f}"] for r in rows_test],
                   headers=["test config", "precision", "batch", "workers", "images", "seconds",
                            "images/s (test.py path, end to end)", "start-up s (to the first batch)",
                            "images/s after start-up", "host waited s: loader / device / metrics",
                            "loader alone img/s",
                            "loader, float32 handover img/s", "model+smoothing alone img/s", "peak GiB"],
                   tablefmt="github"))
    if drift:
        print("\nbf16 vs fp32, mean |Δ| over classes (×100): " +
              ", ".join(f"{k} {100 * v:.2f}" for k, v in drift.items()))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out_json}")


if __name__ == "__main__":
    main()
