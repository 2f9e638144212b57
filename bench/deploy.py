"""Deploy benchmark: export time and file size, and CPU images/s of ONNX Runtime vs PyTorch on the
same model and the same images, in one run.

    python -m bench.deploy                        # tiny and mid configs (a few minutes on 2 cores)
    python -m bench.deploy --backbone ViT-L-14-336 --pretrained none --image_size 518 --images 0
                                                  # the real architecture: export time and size only
                                                  # (needs ~6 GB RAM; --images 2 also times it)

Each model is a checkpoint with random prompts on a seeded random backbone (speed does not depend on
the weights). Both runtimes score resized uint8 images with their ``predict_uint8`` (normalise,
forward, score, σ-smoothed map), batch ``--batch``, after one warm-up batch, on the machine's default
thread counts. The table also gives the largest score and map differences between the two.
Writes bench/results/deploy_cpu.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from tabulate import tabulate

from glocalclip import GlocalCLIP, GlocalCLIPConfig, Predictor
from glocalclip.deploy import OnnxPredictor
from glocalclip.deploy.export import export_onnx, exported_files
from glocalclip.engine.checkpoint import write_threshold

HERE = Path(__file__).resolve().parent
SIGMA = 8.0
PRESETS = {
    "tiny": dict(backbone="tiny", image_size=224),  # its layers and prompt lengths: the backbone's preset
    "mid": dict(backbone=str(HERE / "mid_clip.json"), image_size=224, features_list=(3, 6, 9, 12), dpam_layer=10),
}


def write_checkpoint(cfg: GlocalCLIPConfig, path: Path) -> Path:
    torch.manual_seed(0)
    model = GlocalCLIP(cfg)
    torch.save(model.checkpoint(0), path)
    write_threshold(path, 0.5, sigma=SIGMA)  # as test.py leaves a checkpoint
    return path


def images_per_second(predict, pixels: np.ndarray, batch: int) -> tuple[float, list]:
    """(images/s over all of ``pixels`` after one warm-up batch, the predictions)."""
    sizes = [pixels.shape[1:3]] * batch
    predict(pixels[:batch], sizes[:len(pixels[:batch])])
    t0 = time.perf_counter()
    preds = []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start:start + batch]
        preds += predict(chunk, sizes[:len(chunk)])
    return len(pixels) / (time.perf_counter() - t0), preds


def measure_export(checkpoint: Path, out: Path, half: bool) -> dict:
    t0 = time.perf_counter()
    export_onnx(checkpoint, out, half=half)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in exported_files(out))
    return {"export_s": round(seconds, 1), "file_mb": round(size / 1e6, 1),
            "external_data": len(exported_files(out)) > 1}


def measure_speed(checkpoint: Path, onnx_path: Path, cfg: GlocalCLIPConfig, n_images: int, batch: int) -> dict:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n_images, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    ort = OnnxPredictor(onnx_path, batch_size=batch)
    ort_rate, ort_preds = images_per_second(ort.predict_uint8, pixels, batch)
    del ort
    model = GlocalCLIP.from_checkpoint(checkpoint).eval()
    pt = Predictor(model, sigma=SIGMA, batch_size=batch, device="cpu")
    pt_rate, pt_preds = images_per_second(pt.predict_uint8, pixels, batch)
    return {"images": n_images, "batch": batch, "ort_img_s": round(ort_rate, 2), "torch_img_s": round(pt_rate, 2),
            "ort_speedup": round(ort_rate / pt_rate, 2),
            "score_max_diff": float(max(abs(a.pred_score - b.pred_score) for a, b in zip(ort_preds, pt_preds))),
            "map_max_diff": float(max(np.abs(a.anomaly_map - b.anomaly_map).max() for a, b in zip(ort_preds, pt_preds))),
            "map_range": float(max(np.ptp(b.anomaly_map) for b in pt_preds))}


def run_case(name: str, cfg: GlocalCLIPConfig, args: argparse.Namespace, work: Path) -> dict:
    print(f"{name}: {cfg.backbone} at {cfg.image_size} px", flush=True)
    checkpoint = write_checkpoint(cfg, work / f"{name}.pth")
    row = {"config": name, "image_size": cfg.image_size, **measure_export(checkpoint, work / f"{name}.onnx", False)}
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    if args.half:
        half = measure_export(checkpoint, work / f"{name}_half.onnx", True)
        row.update({"half_export_s": half["export_s"], "half_file_mb": half["file_mb"]})
    if args.images > 0:
        row.update(measure_speed(checkpoint, work / f"{name}.onnx", cfg, args.images, args.batch))
    for path in work.glob(f"{name}*"):
        path.unlink()
    print(json.dumps(row), flush=True)
    return row


def cases(args: argparse.Namespace) -> list[tuple[str, GlocalCLIPConfig]]:
    common = dict(pretrained=None)  # the paper's prompt settings unless a preset says otherwise
    if args.backbone:
        size = args.image_size or 518
        return [(args.backbone, GlocalCLIPConfig(backbone=args.backbone, image_size=size, **common))]
    out = []
    for name in args.configs:
        preset = dict(PRESETS[name])
        if args.image_size:
            preset["image_size"] = args.image_size
        out.append((name, GlocalCLIPConfig.for_backbone(**preset, **common)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=sorted(PRESETS), default=["tiny", "mid"],
                   help="preset models to run (default: tiny and mid)")
    p.add_argument("--backbone", default=None, help="instead of the presets: an open_clip model name with the "
                   "paper's settings (e.g. ViT-L-14-336)")
    p.add_argument("--pretrained", default="none", choices=["none"], help="random weights only: speed and size "
                   "do not depend on them")
    p.add_argument("--image_size", type=int, default=None, help="input side (default: 224 for the presets, 518 "
                   "for --backbone)")
    p.add_argument("--images", type=int, default=16, help="images to time per runtime (0: export only)")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass")
    p.add_argument("--half", action="store_true", help="also export with --half and give its time and size")
    p.add_argument("--out", default=None, help="JSON to write (default bench/results/deploy_cpu.json; with "
                   "--backbone bench/results/deploy_export_<backbone>.json)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="glocalclip_bench_deploy_") as tmp:
        rows = [run_case(name, cfg, args, Path(tmp)) for name, cfg in cases(args)]
    print(tabulate(rows, headers="keys", tablefmt="github"))
    default = f"deploy_export_{args.backbone}.json" if args.backbone else "deploy_cpu.json"
    out = Path(args.out) if args.out else HERE / "results" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                               "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
                               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
